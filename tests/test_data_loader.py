"""PackedLoader / ValLoader on a token stream whose values are their own positions, so every batch
row says exactly which window it came from."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from moetron.data import DataError, PackedLoader, ValLoader

SEQ_LEN = 8
NUM_TOKENS = 8 * 50 + 5  # 50 windows and a tail too short for another


@pytest.fixture
def tokens_path(tmp_path: Path) -> Path:
    path = tmp_path / "train.bin"
    np.arange(NUM_TOKENS, dtype=np.uint16).tofile(path)
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    return path


def _window_ids(inputs: torch.Tensor) -> list[int]:
    return (inputs[:, 0] // SEQ_LEN).tolist()


def _flat(lists: Iterable[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(lists))


def test_windows_and_shift(tokens_path: Path) -> None:
    loader = PackedLoader(tokens_path, SEQ_LEN, batch_size=4, seed=0)
    inputs, targets = loader.next_batch()
    assert inputs.shape == targets.shape == (4, SEQ_LEN) and inputs.dtype == targets.dtype == torch.int64
    starts = inputs[:, :1]
    assert torch.equal(inputs, starts + torch.arange(SEQ_LEN)) and torch.equal(targets, inputs + 1)
    assert (starts % SEQ_LEN == 0).all()


def test_epoch_is_a_permutation_of_all_windows(tokens_path: Path) -> None:
    loader = PackedLoader(tokens_path, SEQ_LEN, batch_size=5, seed=0)
    assert loader.num_windows == 50 and loader.steps_per_epoch == 10
    epochs = [_flat(_window_ids(loader.next_batch()[0]) for _ in range(10)) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(50))
    assert epochs[0] != epochs[1] and epochs[0] != list(range(50))
    assert loader.state_dict() == {"epoch": 1, "position": 50}


def test_deterministic_per_seed(tokens_path: Path) -> None:
    def first_batches(seed: int) -> list[list[int]]:
        loader = PackedLoader(tokens_path, SEQ_LEN, batch_size=4, seed=seed)
        return [_window_ids(loader.next_batch()[0]) for _ in range(5)]

    assert first_batches(3) == first_batches(3) != first_batches(4)


def test_ranks_are_disjoint(tokens_path: Path) -> None:
    world = 3
    loaders = [PackedLoader(tokens_path, SEQ_LEN, 4, seed=0, rank=r, world_size=world) for r in range(world)]
    assert loaders[0].steps_per_epoch == 50 // 12
    for _ in range(loaders[0].steps_per_epoch):
        step = [_window_ids(loader.next_batch()[0]) for loader in loaders]
        assert len(set(_flat(step))) == 12
    # Together the ranks see what one rank with the whole batch would.
    single = PackedLoader(tokens_path, SEQ_LEN, 12, seed=0)
    together = [PackedLoader(tokens_path, SEQ_LEN, 4, seed=0, rank=r, world_size=world) for r in range(world)]
    assert _window_ids(single.next_batch()[0]) == _flat(_window_ids(ld.next_batch()[0]) for ld in together)


@pytest.mark.parametrize("steps_before", [0, 3, 9, 10, 23])
def test_exact_resume(tokens_path: Path, steps_before: int) -> None:
    original = PackedLoader(tokens_path, SEQ_LEN, batch_size=5, seed=7, rank=1, world_size=2)
    for _ in range(steps_before):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # as a checkpoint stores it
    expected = [original.next_batch() for _ in range(12)]  # crosses epoch boundaries (5 steps/epoch)
    restored = PackedLoader(tokens_path, SEQ_LEN, batch_size=5, seed=7, rank=1, world_size=2)
    restored.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (restored.next_batch() for _ in range(12)), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert restored.state_dict() == original.state_dict()


def test_bad_state(tokens_path: Path) -> None:
    loader = PackedLoader(tokens_path, SEQ_LEN, 4, seed=0)
    with pytest.raises(ValueError, match="must be ints >= 0"):
        loader.load_state_dict({"epoch": -1, "position": 0})
    with pytest.raises(ValueError, match="exceeds this shard's 50 windows"):
        loader.load_state_dict({"epoch": 0, "position": 51})


def test_errors(tokens_path: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="one step needs batch_size \\* world_size = 64"):
        PackedLoader(tokens_path, SEQ_LEN, batch_size=32, seed=0, world_size=2)
    with pytest.raises(ValueError, match=r"rank=2 must lie in \[0, world_size=2\)"):
        PackedLoader(tokens_path, SEQ_LEN, 4, seed=0, rank=2, world_size=2)
    with pytest.raises(DataError, match="does not exist; run prepare"):
        PackedLoader(tmp_path / "nope.bin", SEQ_LEN, 4, seed=0)
    bare = tmp_path / "bare" / "x.bin"
    bare.parent.mkdir()
    np.arange(100, dtype=np.uint32).tofile(bare)
    with pytest.raises(DataError, match=r"no meta\.json beside it"):
        PackedLoader(bare, SEQ_LEN, 4, seed=0)
    inputs, _ = PackedLoader(bare, SEQ_LEN, 4, seed=0, dtype="uint32").next_batch()
    assert (inputs[:, 1:] - inputs[:, :-1] == 1).all()
    (tmp_path / "bare" / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        PackedLoader(tmp_path / "bare" / "empty.bin", SEQ_LEN, 4, seed=0, dtype="uint32")


def test_val_loader(tokens_path: Path) -> None:
    val = ValLoader(tokens_path, SEQ_LEN, batch_size=4, num_batches=3)
    batches = list(val)
    assert len(val) == len(batches) == 3
    assert [[x.tolist() for x in b] for b in batches] == [[x.tolist() for x in b] for b in val]  # fixed
    ids = _flat(_window_ids(x) for x, _ in batches)
    assert len(set(ids)) == 12 and ids[0] == 0 and ids[-1] > 40  # spread over the whole shard
    for x, y in batches:
        assert torch.equal(y, x + 1)


def test_val_loader_ranks_and_small_shards(tokens_path: Path) -> None:
    per_rank = [
        _flat(_window_ids(x) for x, _ in ValLoader(tokens_path, SEQ_LEN, 4, 100, r, 3)) for r in range(3)
    ]
    assert [len(ids) for ids in per_rank] == [16, 16, 16]  # 50 windows, 48 usable by 3 ranks
    assert len(set(_flat(per_rank))) == 48
    assert len(ValLoader(tokens_path, SEQ_LEN, 4, 100, 0, 3)) == 4  # the last batch is smaller
    with pytest.raises(DataError, match="too few for one window"):
        ValLoader(tokens_path, seq_len=500, batch_size=1, num_batches=1)
