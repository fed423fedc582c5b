"""LoRA on a moetron model, applied from outside (the model code knows nothing of it), in PEFT's
own parametrisation so that an adapter moves between moetron and `peft` unchanged (peft_format.py).

    Linear (attention q/k/v/o, router gate, dense / shared FFNs)
        y = W x + s · B (A dropout(x))                      A [r, in], B [out, r], s = alpha / r
    GroupedExperts (each routed expert's SwiGLU), as peft's `target_parameters` on transformers'
    fused expert weights gate_up_proj = cat(w1, w3) [E, 2I, D] and down_proj = w2 [E, D, I]:
        [ΔW1; ΔW3]_e = s · B_gu,e A_gu,e                     A_gu [E, r, D], B_gu [E, 2I, r]
        ΔW2_e        = s · B_d,e A_d,e                       A_d  [E, r, I], B_d  [E, D, r]
    so w1 and w3 share their A per expert, as they share it under peft.

B starts at zero (the adapted model is the base model until trained); A as peft initialises it
(kaiming-uniform with a = √5). The base weights are frozen: only lora_A / lora_B require grad.
`merge_lora` folds the deltas into the base weights and restores the plain modules.

Legend: E experts, I expert width, D model width, r rank, N rows routed to experts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moetron.config import LoRAConfig
from moetron.model.moe import FeedForward, GroupedExperts, MoELayer
from moetron.model.ops import Linear, linear
from moetron.model.transformer import Attention, Transformer


class LoRALinear(Linear):
    """A moetron Linear with a low-rank update; `weight` stays the frozen base."""

    lora_A: nn.Parameter  # [r, in]
    lora_B: nn.Parameter  # [out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x)
        low = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)  # a bf16 base, fp32 adapter
        return base + (self.lora_scaling * F.linear(low, self.lora_B)).to(base.dtype)


class LoRAGroupedExperts(GroupedExperts):
    """GroupedExperts with peft's expert LoRA (module doc); the loop of grouped_swiglu, each expert
    with its update."""

    lora_A_gate_up: nn.Parameter  # [E, r, D]
    lora_B_gate_up: nn.Parameter  # [E, 2I, r]
    lora_A_down: nn.Parameter  # [E, r, I]
    lora_B_down: nn.Parameter  # [E, D, r]

    def forward(self, x_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        s, hidden = self.lora_scaling, self.w1.shape[1]
        outputs = []
        for expert, x in enumerate(x_ND.split(num_tokens_per_expert_E.tolist())):
            if x.shape[0] == 0:
                continue
            low = F.linear(self.lora_dropout(x).to(self.lora_A_gate_up.dtype), self.lora_A_gate_up[expert])
            up = F.linear(low, self.lora_B_gate_up[expert]) * s  # [n, 2I]
            a = linear(x, self.w1[expert]) + up[:, :hidden].to(
                x.dtype
            )  # training's matmul kernel (model/ops.py)
            b = linear(x, self.w3[expert]) + up[:, hidden:].to(x.dtype)
            h = F.silu(a) * b
            low_down = F.linear(self.lora_dropout(h).to(self.lora_A_down.dtype), self.lora_A_down[expert])
            down = F.linear(low_down, self.lora_B_down[expert])
            outputs.append(linear(h, self.w2[expert]) + (s * down).to(h.dtype))
        return torch.cat(outputs) if outputs else x_ND.new_zeros(0, x_ND.shape[-1])


def _targets(model: Transformer, targets: list[str]) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module a target names."""
    for name, module in model.named_modules():
        if "attention" in targets and isinstance(module, Attention):
            yield from ((f"{name}.{n}", getattr(module, n)) for n in ("wq", "wk", "wv", "wo"))
        elif isinstance(module, MoELayer):
            if "router" in targets:
                yield f"{name}.router.gate", module.router.gate
            if "experts" in targets:
                yield f"{name}.experts", module.experts
            if "shared" in targets and module.shared_experts is not None:
                shared = module.shared_experts
                yield from ((f"{name}.shared_experts.{n}", getattr(shared, n)) for n in ("w1", "w2", "w3"))
        elif "dense" in targets and isinstance(module, FeedForward) and ".shared_experts" not in name:
            yield from ((f"{name}.{n}", getattr(module, n)) for n in ("w1", "w2", "w3"))


def apply_lora(model: Transformer, cfg: LoRAConfig, seed: int = 0, device: str | None = None) -> list[str]:
    """Freeze `model` and give the modules `cfg.targets` name a LoRA update (B = 0: the outputs are
    the base model's). Returns the adapted modules' names; a target matching nothing is an error.
    `device`: where the adapter lives (float32), if not beside each base weight (a model on meta
    whose adapter only is read, infer/adapters.py)."""
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    names = []
    for name, module in list(_targets(model, cfg.targets)):
        _add_lora(module, cfg, generator, device)
        names.append(name)
    found = {t for t in cfg.targets if any(_target_of(n) == t for n in names)}
    if missing := sorted(set(cfg.targets) - found):
        raise ValueError(f"finetune.lora.targets {missing} match no module of this model")
    return names


def _target_of(name: str) -> str:
    if ".attention." in name:
        return "attention"
    if name.endswith(".router.gate"):
        return "router"
    if name.endswith(".experts"):
        return "experts"
    return "shared" if ".shared_experts." in name else "dense"


def _add_lora(module: nn.Module, cfg: LoRAConfig, generator: torch.Generator, device: str | None) -> None:
    r, like = cfg.rank, next(module.parameters())

    def param(*shape: int, zero: bool = False) -> nn.Parameter:
        t = torch.zeros(*shape, dtype=torch.float32 if device else like.dtype, device=device or like.device)
        if not zero:
            bound = 1.0 / math.sqrt(shape[-1])  # kaiming-uniform, a = √5: U(-1/√fan_in, 1/√fan_in)
            t.uniform_(-bound, bound, generator=generator)
        return nn.Parameter(t)

    module.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
    module.lora_scaling = cfg.scaling
    if isinstance(module, GroupedExperts):
        num_experts, hidden, dim = module.w1.shape
        module.lora_A_gate_up = param(num_experts, r, dim)
        module.lora_B_gate_up = param(num_experts, 2 * hidden, r, zero=True)
        module.lora_A_down = param(num_experts, r, hidden)
        module.lora_B_down = param(num_experts, dim, r, zero=True)
        module.__class__ = LoRAGroupedExperts
    else:
        module.lora_A = param(r, module.in_features)
        module.lora_B = param(module.out_features, r, zero=True)
        module.__class__ = LoRALinear


def lora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The adapter's parameters (what the optimizer trains and the adapter file holds)."""
    return ((n, p) for n, p in model.named_parameters() if ".lora_" in n)


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight and restore the plain module classes."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            delta = module.lora_scaling * (module.lora_B.float() @ module.lora_A.float())
            module.weight += delta.to(module.weight.dtype)
            _strip(module, ("lora_A", "lora_B"), Linear)
        elif isinstance(module, LoRAGroupedExperts):
            s, hidden = module.lora_scaling, module.w1.shape[1]
            gate_up = s * torch.bmm(module.lora_B_gate_up.float(), module.lora_A_gate_up.float())
            module.w1 += gate_up[:, :hidden].to(module.w1.dtype)
            module.w3 += gate_up[:, hidden:].to(module.w3.dtype)
            module.w2 += (s * torch.bmm(module.lora_B_down.float(), module.lora_A_down.float())).to(
                module.w2.dtype
            )
            _strip(module, ("lora_A_gate_up", "lora_B_gate_up", "lora_A_down", "lora_B_down"), GroupedExperts)


def _strip(module: nn.Module, names: tuple[str, ...], cls: type[nn.Module]) -> None:
    for name in names:
        delattr(module, name)
    del module.lora_dropout, module.lora_scaling
    module.__class__ = cls
