"""LoRA adapters served per request (`moetron serve BASE --lora-modules NAME=DIR`), vLLM's multi-LoRA.

Adapters in PEFT's format (moetron/finetune/peft_format.py) are read once at start into banks kept
beside the base weights, which stay as they are. A request whose `model` names an adapter runs its
rows through that adapter; others run the base; rows of different adapters share a step. The
engine then serves on the module path (the fused decoder layers know nothing of adapters) with
these classes installed from outside, like every serving kernel (serving_kernels.py):

    AdapterLinear      base row kernel, + s · B (A x) for the rows of each adapter that targets it
    AdapterMoELayer    rows without an expert adapter: the one-call routed-expert kernel; rows with
                       one: each chosen expert's SwiGLU with its update (w1/w3 and w2's, peft's
                       parametrisation), combined in k order

Every product is moetron's row kernel (batch_invariant.invariant_linear) on the rows of one adapter,
and every combination is elementwise, so a row's bits depend only on its own token, its adapter and
its context: a request's tokens and logprobs are the same alone or beside any other requests and
adapters (tested), and within 1e-4 of the merged model's. The prefix cache is keyed by adapter
(a block's keys and values depend on it).

Legend: T tokens of the step, D width, K experts per token, I expert width, r rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moetron.infer.batch_invariant import invariant_linear, invariant_silu
from moetron.infer.serving_kernels import InvariantLinear, KernelMoELayer, ServingKernels
from moetron.model.moe import GroupedExperts, MoELayer
from moetron.model.ops import Linear
from moetron.model.transformer import Transformer
from moetron.quant.quantize import quantized_format


class AdapterLoadError(ValueError):
    """A --lora-modules entry moetron cannot serve, with the reason."""


@dataclass
class LinearUpdate:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scaling: float


@dataclass
class ExpertUpdate:
    A_gate_up: torch.Tensor  # [E, r, D]
    B_gate_up: torch.Tensor  # [E, 2I, r]
    A_down: torch.Tensor  # [E, r, I]
    B_down: torch.Tensor  # [E, D, r]
    scaling: float


@dataclass
class StepAdapters:
    """Which rows of this step belong to which adapter (index ≥ 1; 0 is the base), set by the
    runner before each forward and read by the adapter modules."""

    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (adapter, token rows)

    def set_step(self, token_adapters: list[int]) -> None:
        rows: dict[int, list[int]] = {}
        for row, adapter in enumerate(token_adapters):
            if adapter:
                rows.setdefault(adapter, []).append(row)
        self.groups = [(a, torch.tensor(r, dtype=torch.long)) for a, r in sorted(rows.items())]


@dataclass
class AdapterSet:
    """The served adapters: their names (index i + 1 is names[i]) and, per module of the model,
    each adapter's update of it."""

    names: list[str]
    updates: dict[int, dict[int, LinearUpdate | ExpertUpdate]]  # id(module) -> adapter -> update
    step: StepAdapters = field(default_factory=StepAdapters)

    def index(self, name: str | None) -> int:
        if name is None:
            return 0
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise ValueError(f"unknown LoRA adapter {name!r}; served: {self.names}") from None


def parse_lora_modules(entries: list[str]) -> dict[str, Path]:
    """vLLM's `NAME=PATH` entries → {name: path}."""
    specs: dict[str, Path] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise AdapterLoadError(f"--lora-modules entry {entry!r}: expected NAME=ADAPTER_DIR")
        if name in specs:
            raise AdapterLoadError(f"--lora-modules: the name {name!r} is given twice")
        specs[name] = Path(path)
    return specs


def load_adapters(model: Transformer, entries: list[str], max_loras: int) -> AdapterSet:
    """Read every adapter of `entries` for `model` (a clear error for a malformed one, or one made
    for another base); the base weights are not touched."""
    from moetron.finetune.lora import LoRAGroupedExperts, LoRALinear
    from moetron.finetune.peft_format import AdapterError, load_adapter

    specs = parse_lora_modules(entries)
    if len(specs) > max_loras:
        raise AdapterLoadError(f"{len(specs)} --lora-modules but --max-loras={max_loras}")
    if quantized_format(model) is not None or any(p.dtype != torch.float32 for p in model.parameters()):
        raise AdapterLoadError("LoRA adapters are served over float32 weights (not quantized or bf16 ones)")
    modules = dict(model.named_modules())
    updates: dict[int, dict[int, LinearUpdate | ExpertUpdate]] = {}
    for index, (name, path) in enumerate(specs.items(), start=1):
        with torch.device("meta"):
            skeleton = Transformer(model.cfg)  # shapes only: the adapter's own tensors are real
        try:  # the skeleton's base weights stay meta (never allocated); its adapter is real
            cfg = load_adapter(skeleton, path, device="cpu")
        except AdapterError as e:
            raise AdapterLoadError(f"--lora-modules {name}={path}: {e}") from None
        for module_name, module in skeleton.named_modules():
            if isinstance(module, LoRALinear):
                target = modules[module_name]
                update = LinearUpdate(module.lora_A.detach(), module.lora_B.detach(), cfg.scaling)
            elif isinstance(module, LoRAGroupedExperts):
                update = ExpertUpdate(
                    module.lora_A_gate_up.detach(), module.lora_B_gate_up.detach(),
                    module.lora_A_down.detach(), module.lora_B_down.detach(), cfg.scaling,
                )  # fmt: skip
                target = modules[module_name.rsplit(".", 1)[0]]  # the MoELayer runs the experts
            else:
                continue
            updates.setdefault(id(target), {})[index] = update
    return AdapterSet(list(specs), updates)


class AdapterLinear(InvariantLinear):
    """The base row kernel, plus each adapter's update on its rows."""

    adapter_updates: dict[int, LinearUpdate] | None = None
    step_adapters: StepAdapters | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if not self.adapter_updates or self.step_adapters is None or not self.step_adapters.groups:
            return out
        x_TD, out_TO = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        for adapter, rows in self.step_adapters.groups:
            update = self.adapter_updates.get(adapter)
            if update is not None:
                low = invariant_linear(x_TD.index_select(0, rows), update.A)
                delta = invariant_linear(low, update.B) * update.scaling
                out_TO.index_copy_(0, rows, out_TO.index_select(0, rows) + delta)
        return out


class AdapterMoELayer(KernelMoELayer):
    adapter_updates: dict[int, ExpertUpdate] | None = None
    step_adapters: StepAdapters | None = None

    def routed_experts(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        groups = [] if self.step_adapters is None else self.step_adapters.groups
        adapted = [(a, rows) for a, rows in groups if self.adapter_updates and a in self.adapter_updates]
        if not adapted:
            return super().routed_experts(x_TD, weights_TK, expert_ids_TK)
        out_TD = torch.empty_like(x_TD)
        taken = torch.zeros(x_TD.shape[0], dtype=torch.bool)
        for adapter, rows in adapted:
            taken[rows] = True
            out_TD.index_copy_(
                0,
                rows,
                self._adapted(
                    x_TD[rows], weights_TK[rows], expert_ids_TK[rows], self.adapter_updates[adapter]
                ),
            )
        base_rows = (~taken).nonzero().flatten()
        if base_rows.numel():  # the base path counts its own rows' expert choices
            out_TD.index_copy_(
                0,
                base_rows,
                super().routed_experts(x_TD[base_rows], weights_TK[base_rows], expert_ids_TK[base_rows]),
            )
        if self.record_stats:
            taken_ids = expert_ids_TK[taken]
            self.tokens_per_expert += torch.bincount(taken_ids.flatten(), minlength=self.cfg.num_experts)
        return out_TD

    def _adapted(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor, update: ExpertUpdate
    ) -> torch.Tensor:
        """Each token's chosen experts with the adapter's update, combined in k order."""
        experts: GroupedExperts = self.experts
        hidden, s = experts.w1.shape[1], update.scaling
        num_tokens, top_k = expert_ids_TK.shape
        y_TKD = x_TD.new_empty(num_tokens, top_k, x_TD.shape[1])
        for expert in expert_ids_TK.unique().tolist():
            tokens, slots = (expert_ids_TK == expert).nonzero(as_tuple=True)
            x = x_TD.index_select(0, tokens)
            up = invariant_linear(invariant_linear(x, update.A_gate_up[expert]), update.B_gate_up[expert]) * s
            a = invariant_linear(x, experts.w1[expert]) + up[:, :hidden]
            b = invariant_linear(x, experts.w3[expert]) + up[:, hidden:]
            h = invariant_silu(a) * b
            down = invariant_linear(invariant_linear(h, update.A_down[expert]), update.B_down[expert]) * s
            y_TKD[tokens, slots] = invariant_linear(h, experts.w2[expert]) + down
        out_TD = y_TKD[:, 0] * weights_TK[:, :1].to(y_TKD.dtype)
        for k in range(1, top_k):
            out_TD = out_TD + y_TKD[:, k] * weights_TK[:, k : k + 1].to(y_TKD.dtype)
        return out_TD


def adapter_kernels(base: ServingKernels, adapters: AdapterSet) -> ServingKernels:
    """`base` with Linear → AdapterLinear and MoELayer → AdapterMoELayer, each given its updates."""

    def prepare(model: nn.Module, module: nn.Module) -> None:
        if isinstance(module, AdapterLinear | AdapterMoELayer):
            module.adapter_updates = adapters.updates.get(id(module))
            module.step_adapters = adapters.step
        if base.prepare is not None:
            base.prepare(model, module)

    classes = {**base.classes, Linear: AdapterLinear, MoELayer: AdapterMoELayer}
    return ServingKernels(f"{base.name}+lora", classes, prepare=prepare)
