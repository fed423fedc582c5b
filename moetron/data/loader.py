"""Batches from a flat token shard (train.bin / val.bin written by `prepare`).

The stream is cut into windows of seq_len + 1 tokens starting every seq_len tokens: window w is
tokens[w*T : w*T + T + 1], its first T tokens the inputs and its last T the targets. Consecutive
windows share one token, so every token after the first is a target exactly once per epoch and
no input position is seen twice. Windows cross document boundaries (the EOS between documents
teaches where one ends), as in GPT-2/nanoGPT-style packed pre-training.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from moetron.data.errors import DataError


def open_tokens(path: str | Path, dtype: str | None = None) -> np.memmap:
    """Memory-map a .bin shard; its dtype comes from the meta.json beside it unless given."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file {path} does not exist; run prepare() first")
    if dtype is None:
        meta_path = path.parent / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{path}: no meta.json beside it to give the token dtype; pass dtype=")
        dtype = json.loads(meta_path.read_text())["dtype"]
    if path.stat().st_size == 0:
        raise DataError(f"token file {path} is empty")
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


def _windows(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([tokens[w * seq_len : w * seq_len + seq_len + 1] for w in window_ids]).astype(np.int64)
    rows_BT1 = torch.from_numpy(rows)
    return rows_BT1[:, :-1].contiguous(), rows_BT1[:, 1:].contiguous()


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")


class PackedLoader:
    """Endless training batches. Each epoch visits the windows in a permutation seeded by
    (seed, epoch); each step takes the next batch_size * world_size windows of it and rank r gets
    slice r, so ranks never share a window. An epoch's tail shorter than one step is skipped (all
    ranks always step together). The state is just (epoch, position in the permutation)."""

    def __init__(
        self,
        tokens_path: str | Path,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        dtype: str | None = None,
    ) -> None:
        _check_rank(rank, world_size)
        self.tokens = open_tokens(tokens_path, dtype)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_windows = (len(self.tokens) - 1) // seq_len
        self.windows_per_step = batch_size * world_size
        if self.num_windows < self.windows_per_step:
            raise DataError(
                f"{tokens_path}: {len(self.tokens)} tokens make {self.num_windows} windows of {seq_len}+1; "
                f"one step needs batch_size * world_size = {self.windows_per_step}"
            )
        self.epoch = 0
        self.position = 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_windows // self.windows_per_step

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_BT, targets_BT), int64 on the CPU; targets are inputs shifted left by one."""
        if self.position + self.windows_per_step > self.num_windows:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.rank * self.batch_size
        window_ids = self._permutation(self.epoch)[start : start + self.batch_size]
        self.position += self.windows_per_step
        return _windows(self.tokens, window_ids, self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where the saved loader was: the next batch is the one it would give."""
        epoch, position = state["epoch"], state["position"]
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(position, int) and position >= 0):
            raise ValueError(f"bad loader state {state!r}: epoch and position must be ints >= 0")
        if position > self.num_windows:
            raise ValueError(
                f"loader state position={position} exceeds this shard's {self.num_windows} windows"
            )
        self.epoch, self.position = epoch, position


class ValLoader:
    """A fixed evaluation set: up to num_batches batches per rank from windows spread evenly over
    the whole shard (so a small eval budget still samples every part of the validation text),
    dealt round-robin to ranks. Iterating again yields the same batches; the last may be smaller."""

    def __init__(
        self,
        tokens_path: str | Path,
        seq_len: int,
        batch_size: int,
        num_batches: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        dtype: str | None = None,
    ) -> None:
        _check_rank(rank, world_size)
        self.tokens = open_tokens(tokens_path, dtype)
        self.seq_len, self.batch_size = seq_len, batch_size
        num_windows = (len(self.tokens) - 1) // seq_len
        wanted = min(num_batches * batch_size, num_windows // world_size) * world_size
        if wanted == 0:
            raise DataError(
                f"{tokens_path}: {len(self.tokens)} tokens are too few for one window of {seq_len}+1 per rank "
                f"(world_size={world_size})"
            )
        chosen = np.linspace(0, num_windows, wanted, endpoint=False).astype(np.int64)
        self.window_ids = chosen[rank::world_size]

    def __len__(self) -> int:
        return -(-len(self.window_ids) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.window_ids), self.batch_size):
            yield _windows(self.tokens, self.window_ids[i : i + self.batch_size], self.seq_len)
