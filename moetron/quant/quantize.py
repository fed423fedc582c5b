"""Quantize a model's matmul weights for serving (`--quantization q8_0|q4_0|q4_k`), from outside.

Each Linear (attention projections, dense and shared-expert FFNs, the head) becomes a
`QuantizedLinear` and each `GroupedExperts` a `QuantizedGroupedExperts`: the float weights are
replaced by uint8 buffers of GGML blocks (ggml_blocks.py) and the module records each one's format
in `weight_formats`. Their forward is moetron's quantized kernel (moetron/kernels/quant_tiles.h),
batch-invariant like the float ones; the engine's fused layers read the same buffers.

What stays in float, as llama.cpp's quantizer does it: the embedding (rows are gathered, not
multiplied), the norms, the routers (a few KB; their top-k choices are the most sensitive numbers
of an MoE). The head takes q8_0 under the 4-bit formats (llama.cpp keeps it at 6+ bits). A weight
whose input width is not whole blocks of the format falls back to the next wider format that
holds it (q4_k → q8_0 → float32), and the report says so once per (format, fallback).

The model is float32 afterwards (a bf16 checkpoint is widened first): serving only, not training.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moetron.kernels import cpu_kernels
from moetron.model.moe import GroupedExperts, Router
from moetron.model.ops import Linear
from moetron.model.transformer import Transformer
from moetron.quant import ggml_blocks
from moetron.quant.interleave import INTERLEAVED, ROWS, to_r8

log = logging.getLogger(__name__)

QUANTIZATIONS = ("q8_0", "q4_0", "q4_k")
# The format a weight takes when its width is not whole blocks of the one asked for.
WIDER = {"q4_k": "q8_0", "q4_0": "q8_0", "q8_0": "f32"}
HEAD_FORMAT = {"q8_0": "q8_0", "q4_0": "q8_0", "q4_k": "q8_0"}


@dataclass
class QuantizationReport:
    fmt: str
    weights: Counter = field(default_factory=Counter)  # format -> tensors
    fallbacks: Counter = field(default_factory=Counter)  # (asked, used) -> tensors
    bytes_before: int = 0
    bytes_after: int = 0

    def summary(self) -> str:
        counts = ", ".join(f"{n} {fmt}" for fmt, n in sorted(self.weights.items()))
        line = (
            f"quantized to {self.fmt}: {counts}; matmul weights {self.bytes_before / 2**20:.1f} MiB -> "
            f"{self.bytes_after / 2**20:.1f} MiB"
        )
        for (asked, used), n in sorted(self.fallbacks.items()):
            line += f"; {n} weight(s) kept in {used} (width not a multiple of {asked}'s block)"
        return line


def usable_format(fmt: str, width: int) -> str:
    """`fmt`, or the next wider format (WIDER) whose blocks rows of `width` hold; float formats as is."""
    while fmt not in ("f32", "bf16") and width % ggml_blocks.block_format(fmt).block_size:
        fmt = WIDER[fmt]
    return fmt


def pack(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """[..., rows, width] float → [..., rows, bytes per row] uint8 GGML blocks."""
    flat = weight.detach().float().reshape(-1, weight.shape[-1])
    return ggml_blocks.quantize(flat, fmt).reshape(*weight.shape[:-1], -1)


def _matmul(x: torch.Tensor, weight: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "f32":
        return cpu_kernels.linear_f32(x, weight)
    return cpu_kernels.quantized_linear(x, weight, fmt)


class QuantizedLinear(Linear):
    """A Linear whose `weight` is uint8 GGML blocks [out, bytes per row] of weight_formats['weight']."""

    weight_formats: dict[str, str]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(x, self.weight, self.weight_formats["weight"])


class QuantizedGroupedExperts(GroupedExperts):
    """GroupedExperts whose w1/w2/w3 are uint8 GGML blocks [E, rows, bytes per row]. The engine runs
    them in its routed-expert kernel (KernelMoELayer, the fused layers); this forward, expert by
    expert with the same matmul kernel, serves the model's own forward."""

    weight_formats: dict[str, str]

    def forward(self, x_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        formats = self.weight_formats
        out_ND = torch.empty_like(x_ND)
        start = 0
        for e, count in enumerate(num_tokens_per_expert_E.tolist()):
            x = x_ND[start : start + count]
            h = F.silu(_matmul(x, self.w1[e], formats["w1"])) * _matmul(x, self.w3[e], formats["w3"])
            out_ND[start : start + count] = _matmul(h, self.w2[e], formats["w2"])
            start += count
        return out_ND


def set_quantized_weight(module: nn.Module, name: str, packed: torch.Tensor, fmt: str) -> None:
    """Put `packed` (GGML blocks of `fmt`, or a float32 tensor for "f32") in place of `module`'s
    weight `name`; a Linear or GroupedExperts becomes its quantized class on its first one. Q8_0 and
    Q4_0 rows in groups of 8 are stored interleaved (interleave.py), which the kernels stream fastest."""
    if fmt in INTERLEAVED and packed.shape[-2] % ROWS == 0:
        flat = packed.reshape(-1, packed.shape[-1])
        packed, fmt = to_r8(flat, fmt).reshape(packed.shape), INTERLEAVED[fmt]
    if type(module) is Linear:
        module.__class__ = QuantizedLinear
        module.weight_formats = {}
    elif type(module) is GroupedExperts:
        module.__class__ = QuantizedGroupedExperts
        module.weight_formats = {}
    if not isinstance(module, QuantizedLinear | QuantizedGroupedExperts):
        raise TypeError(f"{type(module).__name__} has no quantized form")
    delattr(module, name)  # the Parameter (a tied head leaves the embedding's in place)
    module.register_buffer(name, packed)
    module.weight_formats[name] = fmt


def _replace(module: nn.Module, name: str, fmt: str, report: QuantizationReport) -> None:
    weight = getattr(module, name)
    report.bytes_before += weight.numel() * 4
    packed = weight.detach().float().contiguous() if fmt == "f32" else pack(weight, fmt)
    report.bytes_after += packed.numel() * packed.element_size()
    report.weights[fmt] += 1
    set_quantized_weight(module, name, packed, fmt)


def _assign(asked: str, width: int, report: QuantizationReport) -> str:
    used = usable_format(asked, width)
    if used != asked:
        report.fallbacks[asked, used] += 1
    return used


def quantize_model(model: Transformer, fmt: str) -> QuantizationReport:
    """Quantize `model`'s matmul weights in place to `fmt` (see the module doc); logs the summary."""
    if fmt not in QUANTIZATIONS:
        raise ValueError(f"quantization {fmt!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if not cpu_kernels.available():
        raise RuntimeError(
            f"quantization={fmt} runs on moetron's CPU kernels, which are not available here "
            "(they need an x86 CPU with AVX2+FMA+F16C and a C++ compiler)"
        )
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError(f"quantization={fmt} serves on the CPU; load the model with device='cpu'")
    if quantized_format(model) is not None:
        raise ValueError(f"the model is already quantized ({quantized_format(model)}); load it again")
    model.float()
    report = QuantizationReport(fmt)
    model.__dict__["quantization"] = fmt  # a plain attribute: not state, read by quantized_format
    routers = {id(m.gate) for m in model.modules() if isinstance(m, Router)}
    for module in list(model.modules()):
        if type(module) is GroupedExperts:
            for name in ("w1", "w2", "w3"):
                weight = getattr(module, name)
                _replace(module, name, _assign(fmt, weight.shape[-1], report), report)
        elif type(module) is Linear and id(module) not in routers:
            asked = HEAD_FORMAT[fmt] if module is model.output else fmt
            _replace(module, "weight", _assign(asked, module.in_features, report), report)
    log.info("%s", report.summary())
    return report


def weight_format(module: nn.Module, name: str) -> str:
    """The kernels' format name of `module`'s weight `name`: its quantized format (an "_r8" one when
    interleaved), else its dtype's."""
    formats = getattr(module, "weight_formats", None)
    if formats is not None and name in formats:
        return formats[name]
    return cpu_kernels.DTYPE_FORMATS[getattr(module, name).dtype]


def quantized_format(model: nn.Module) -> str | None:
    """The format quantize_model gave `model`, or None."""
    return model.__dict__.get("quantization")
