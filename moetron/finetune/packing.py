"""Examples packed into rows of seq_len tokens, each kept to itself.

An example of n ids gives n - 1 (input, target) positions. With `pack`, whole examples are laid one
after another in a row until the next would not fit; without it, one example per row. Every row is
padded to seq_len. Per position: the input id, the target (−100 where it is not trained: context,
padding), the RoPE position counted from the example's start, and the example's index in the row.
`DocumentCausalAttention` lets a position attend only to earlier positions of its own example, so
a packed example computes exactly what it would alone (the same keys, the same positions; tested).
Examples longer than seq_len + 1 ids are cut to it (counted).

Legend: B rows, T = seq_len positions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moetron.finetune.data import Example

IGNORE = -100  # cross_entropy's ignore_index


@dataclass
class Row:
    inputs: list[int]
    targets: list[int]
    positions: list[int]
    documents: list[int]


def pack_examples(examples: list[Example], seq_len: int, pack: bool, pad_id: int) -> tuple[list[Row], int]:
    """Rows of seq_len positions; returns them and the number of examples cut to fit."""
    rows: list[Row] = []
    current = Row([], [], [], [])
    num_cut = 0
    for example in examples:
        ids, trained = example.ids[: seq_len + 1], example.trained[: seq_len + 1]
        num_cut += len(example.ids) > seq_len + 1
        length = len(ids) - 1
        if length < 1:
            continue
        if current.inputs and (not pack or len(current.inputs) + length > seq_len):
            rows.append(current)
            current = Row([], [], [], [])
        document = current.documents[-1] + 1 if current.documents else 0
        current.inputs += ids[:-1]
        current.targets += [t if keep else IGNORE for t, keep in zip(ids[1:], trained[1:], strict=True)]
        current.positions += list(range(length))
        current.documents += [document] * length
    if current.inputs:
        rows.append(current)
    for row in rows:
        padding = seq_len - len(row.inputs)
        row.inputs += [pad_id] * padding
        row.targets += [IGNORE] * padding
        row.positions += list(range(padding))
        row.documents += [-1] * padding  # padding attends among itself, never to an example
    return rows, num_cut


@dataclass
class Batch:
    inputs_BT: torch.Tensor
    targets_BT: torch.Tensor
    positions_BT: torch.Tensor
    documents_BT: torch.Tensor

    @property
    def num_trained(self) -> int:
        return int((self.targets_BT != IGNORE).sum())


def make_batch(rows: list[Row]) -> Batch:
    def stack(field: str) -> torch.Tensor:
        return torch.tensor([getattr(r, field) for r in rows], dtype=torch.long)

    return Batch(stack("inputs"), stack("targets"), stack("positions"), stack("documents"))


class DocumentCausalAttention:
    """The model's attention backend for packed rows: causal within each example only."""

    def __init__(self, documents_BT: torch.Tensor) -> None:
        same = documents_BT[:, :, None] == documents_BT[:, None, :]
        causal = torch.ones(same.shape[-2:], dtype=torch.bool, device=same.device).tril()
        self.mask_B1TT = (same & causal).unsqueeze(1)

    def __call__(
        self, q_BHTd: torch.Tensor, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor, layer_id: int
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q_BHTd, k_BGTd, v_BGTd, attn_mask=self.mask_B1TT, enable_gqa=True
        )


class RowSampler:
    """Rows in a seeded order, reshuffled each epoch; its state is (epoch, position) for resume."""

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(self.num_rows))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        picked = []
        while len(picked) < count:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled()
            picked.append(self._order[self.position])
            self.position += 1
        return picked

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffled()
