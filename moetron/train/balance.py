"""Auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2; torchtitan's `load_balance_coeff`).

Each router chooses its experts on probabilities plus a per-expert bias (model/moe.py `Router`).
Once per optimizer step, before `optimizer.step()`, the trainer moves every MoE layer's bias
towards the experts that received fewer tokens:

    expert_bias_E += bias_update_rate * sign(mean(load_E) - load_E)

load_E: the (token, expert) assignments each expert kept over the whole step, summed over the
step's micro-batches and over the data-parallel ranks (trainer._expert_load), counted in the first
forward only (activation-checkpoint recomputes and pipeline shape inference pause the counters).
So the update is one function of the global batch: the same with gradient accumulation as with
one big batch, and the same on every rank of every layout, which keeps the (replicated) bias
identical everywhere without communicating it. sign() makes the step exact: ±rate or 0 in fp32.

Unlike torchtitan we do not subtract the step's mean: a common shift of every bias changes no
top-k choice, and the formula stays the paper's.

Legend: L MoE layers, E experts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from moetron.model.moe import MoELayer


def bias_step(load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """rate * sign(mean(load_E) - load_E), fp32 [E]: +rate for an expert below the mean load,
    -rate above it, 0 at it."""
    load_E = load_E.double()
    return (rate * torch.sign(load_E.mean() - load_E)).float()


@torch.no_grad()
def update_expert_bias(layers: Iterable[tuple[int, MoELayer]], load_LE: torch.Tensor, rate: float) -> None:
    """Move each (row, layer)'s router bias by `bias_step` of its row of the global load [L, E]."""
    for row, layer in layers:
        bias_E = layer.router.expert_bias
        bias_E += bias_step(load_LE[row], rate).to(bias_E.device)


def max_load_ratio(load_LE: torch.Tensor) -> float:
    """max over layers of (busiest expert's load / mean load): 1.0 is perfect balance, E / K the
    worst (every token sent to the same K experts). 0.0 when nothing was routed."""
    load_LE = load_LE.double()
    mean_L = load_LE.mean(dim=-1)
    if load_LE.numel() == 0 or not bool((mean_L > 0).all()):
        return 0.0
    return float((load_LE.max(dim=-1).values / mean_L).max())


def max_abs_bias(layers: Iterable[MoELayer]) -> float:
    """The largest |expert_bias| over `layers` (0.0 for none)."""
    return max((float(layer.router.expert_bias.abs().max()) for layer in layers), default=0.0)
