"""moetron's own CPU kernels (the *.cpp beside this file), compiled on first use, loaded with ctypes.

  * linear_avx2.cpp: x @ w.T (fp32 x; fp32, bf16 or GGML-quantized w: weights.h), batch-invariant,
    fast at the few rows of a decode step;
  * attention_avx2.cpp: causal attention of packed query rows over the paged KV cache;
  * moe_avx2.cpp: a whole routed-expert SwiGLU layer (dispatch, experts, combine) in one call;
  * norm_avx2.cpp: RMSNorm rows;
  * layer_avx2.cpp: a decoder layer's attention half and MoE half, one call each;
  * moe_train_avx2.cpp: a MoE layer's row moves in CPU training (dispatch, combine, their gradients);
  * attention_train_avx2.cpp: causal attention's forward and backward (fp32 or bf16) for CPU training;
  * lm_loss_avx2.cpp: the language-model loss's per-row work (its value, its gradient in place);
  * norm_train_avx2.cpp: RMSNorm's forward and backward for CPU training;
  * rope_train_avx2.cpp: the rotary embedding's rotation and its inverse (its gradient);
  * grouped_sgemm.cpp: groups of fp32 matmuls spread over the threads whole, each a call of the
    BLAS torch uses (MKL's, reached through torch's library: `grouped_sgemm`).

Plain C++ with AVX2 intrinsics and no torch headers: one `c++` call takes a few seconds, and
the library is cached under ~/.cache/moetron/kernels (or $MOETRON_CACHE_DIR/kernels) by a hash of
its source and flags. It is built once per instruction set the CPU has (ISAS: AVX2+FMA; AVX-512 with
VNNI, whose dpbusd replaces AVX2's two-step int8 dot product; and with AVX512-BF16 too, whose
dpbf16ps the training attention multiplies bf16 pairs with); `library()` loads the widest, or the
one $MOETRON_CPU_ISA names. Every build computes the same bits (quant_blocks.h), but for the
training attention's products (two FMAs per bf16 pair elsewhere). It links the OpenMP runtime by its soname, which resolves to the libgomp
torch has already loaded, so kernel and torch share one thread pool.

Everything here is optional: without AVX2+FMA+F16C, without a compiler, or with MOETRON_CPU_KERNELS=0,
`available()` is False and callers keep their torch path (a warning says why a build failed).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from moetron import hardware

if TYPE_CHECKING:
    from moetron.model.grouped_swiglu_cpu import Product

KERNEL_DIR = Path(__file__).parent
SOURCES = (
    "abi.cpp",
    "linear_avx2.cpp",
    "attention_avx2.cpp",
    "moe_avx2.cpp",
    "norm_avx2.cpp",
    "layer_avx2.cpp",
    "moe_train_avx2.cpp",
    "attention_train_avx2.cpp",
    "lm_loss_avx2.cpp",
    "norm_train_avx2.cpp",
    "rope_train_avx2.cpp",
    "grouped_sgemm.cpp",
)
HEADERS = (
    "simd_avx2.h", "linear_tiles.h", "attention_item.h", "moe.h", "export.h", "quant_blocks.h",
    "quant_tiles.h", "weights.h",
)  # fmt: skip
# The C interface's version, compiled in (abi.cpp reports it back). Bump it when an entry point's
# arguments or meaning change: a library built for another version is refused as stale.
ABI_VERSION = 25  # 25: grouped sgemm; 24: fp32 training attention; 23: bf16 token rows in the MoE moves; 22: rope rows; 21: the training RMSNorm; 20: the LM loss rows; 19: training attention
# -ffp-contract=off: the kernel's FMAs are explicit; the compiler must not fuse anything else, or a
# scalar tail could round differently from the vector body.
FLAGS = [
    "-O3", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c++17", f"-DMOETRON_KERNELS_ABI={ABI_VERSION}",
]  # fmt: skip
# The builds, narrowest first, each with the CPU flags (hardware.CPU_FLAGS) it needs.
ISAS = {
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
    "avx512_vnni": (
        ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
        ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
    ),
    "avx512_bf16": (
        ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"),
        [
            "-mavx2",
            "-mfma",
            "-mf16c",
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512vnni",
            "-mavx512bf16",
        ],
    ),
}
# Weight format codes of the C interface (weights.h): GGML's type ids.
# "_r8": the same blocks in moetron's 8-row interleaved layout (moetron/quant/interleave.py).
FORMAT_CODES = {
    "f32": 0,
    "bf16": 30,
    "q8_0": 8,
    "q4_0": 2,
    "q4_k": 12,
    "q5_k": 13,
    "q6_k": 14,
    "q8_0_r8": 1008,
    "q4_0_r8": 1002,
    "q4_k_r8": 1012,
    "q5_k_r8": 1013,
    "q6_k_r8": 1014,
}
DTYPE_FORMATS = {torch.float32: "f32", torch.bfloat16: "bf16"}
# The argument codes the library exports for each entry point (export.h): the C signatures are the
# only declaration.
ARG_TYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "n": ctypes.c_int, "f": ctypes.c_float}


def _cache_dir() -> Path:
    root = os.environ.get("MOETRON_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "moetron") / "kernels"


def supported_isas() -> list[str]:
    """The builds this CPU runs, narrowest first."""
    return list(_isas_for(hardware.detect().cpu))


@functools.cache
def _isas_for(cpu: hardware.CpuInfo) -> tuple[str, ...]:
    # Cached: library() asks on every kernel call (a decode step makes a dozen), and the flags
    # walk cost ~20 µs a time, a few percent of a 4-bit decode step.
    return tuple(name for name, (needs, _) in ISAS.items() if all(cpu.has(flag) for flag in needs))


def selected_isa() -> str | None:
    """$MOETRON_CPU_ISA if set (an error if this CPU cannot run it), else the widest supported."""
    isas = _isas_for(hardware.detect().cpu)
    wanted = os.environ.get("MOETRON_CPU_ISA")
    if wanted:
        if wanted not in ISAS:
            raise ValueError(f"MOETRON_CPU_ISA={wanted!r}: not one of {', '.join(ISAS)}")
        if wanted not in isas:
            raise ValueError(
                f"MOETRON_CPU_ISA={wanted!r}: this CPU lacks {ISAS[wanted][0]} (it runs {list(isas)})"
            )
        return wanted
    return isas[-1] if isas else None


def _build(compiler: str, isa: str) -> Path:
    flags = [*FLAGS, *ISAS[isa][1]]
    digest = hashlib.sha256(" ".join([compiler, *flags]).encode())
    for name in (*SOURCES, *HEADERS):
        digest.update((KERNEL_DIR / name).read_bytes())
    target = _cache_dir() / f"moetron_kernels-{isa}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first uses (test workers, torchrun ranks)
    # never load a half-written library. One compiler process per source, in parallel, then a link.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = [Path(tmp) / f"{name}.o" for name in SOURCES]
        compiles = [
            subprocess.Popen(
                [compiler, *flags, "-c", str(KERNEL_DIR / name), "-o", str(obj)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, obj in zip(SOURCES, objects, strict=True)
        ]
        errors = [err for proc in compiles if (err := proc.communicate()[1]) and proc.returncode != 0]
        built = Path(tmp) / target.name
        if not errors:
            link = subprocess.run(
                [compiler, *flags, *map(str, objects), "-o", str(built)],
                capture_output=True,
                text=True,
                check=False,
            )
            errors = [link.stderr] if link.returncode != 0 else []
        if errors:
            raise RuntimeError(f"{compiler} failed: {errors[0].strip()[-2000:]}")
        os.replace(built, target)
    return target


@functools.cache
def _library(isa: str | None) -> SimpleNamespace | None:
    if os.environ.get("MOETRON_CPU_KERNELS", "1") == "0" or isa is None:
        return None
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        warnings.warn("no C++ compiler found: moetron's CPU kernels are off (torch's are used)", stacklevel=3)
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler, isa)))
    except (OSError, RuntimeError) as err:
        warnings.warn(f"moetron's CPU kernels are off (torch's are used): {err}", stacklevel=3)
        return None
    if lib.moetron_kernels_abi() != ABI_VERSION:
        warnings.warn("stale moetron CPU kernel library; torch's kernels are used", stacklevel=3)
        return None
    lib.moetron_kernels_exports.restype = ctypes.c_char_p
    functions = {}
    for line in lib.moetron_kernels_exports().decode().splitlines():
        name, _, codes = line.partition(" ")
        function = getattr(lib, name)
        function.restype, function.argtypes = None, [ARG_TYPES[c] for c in codes]
        functions[name] = function
    # The field names of moetron_decoder_layers' per-layer rows, in the library's order.
    for name in ("moetron_layer_fields", "moetron_layer_scalars"):
        getattr(lib, name).restype = ctypes.c_char_p
    layer_fields = tuple(lib.moetron_layer_fields().decode().split())
    layer_scalars = tuple(lib.moetron_layer_scalars().decode().split())
    return SimpleNamespace(**functions, layer_fields=layer_fields, layer_scalars=layer_scalars)


def available() -> bool:
    return _library(selected_isa()) is not None


def library() -> SimpleNamespace:
    """The library's exported entry points by name, their argtypes set (fused_layers.py prepares
    its own arguments), for the selected ISA. Only these: a function without MOETRON_EXPORT is an
    AttributeError here, never a call with ctypes' guessed argument types."""
    lib = _library(selected_isa())
    if lib is None:
        raise RuntimeError("moetron's CPU kernels are not available here; check available() first")
    return lib


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the serving hooks' kernels take these operands: fp32 on the CPU, no autograd
    (`linear_f32` also takes bf16 weights; only the fused path passes them)."""
    return (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and available()
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with unit stride along a row (a view when it already is one)."""
    x_MK = x.reshape(-1, x.shape[-1])
    return x_MK if x_MK.stride(-1) == 1 else x_MK.contiguous()


def linear_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T (fp32, CPU). Each output element is one fixed-order dot product, so a row's
    result is bit-identical whatever other rows are computed with it (see linear_avx2.cpp).
    A bf16 `weight` (with fp32 x) gives the same bits as its fp32 copy, reading half the bytes."""
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear_f32: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if x.dtype != torch.float32 or weight.dtype not in DTYPE_FORMATS:
        raise ValueError(
            f"linear_f32: x {x.dtype} and weight {weight.dtype}; want float32 and float32/bfloat16"
        )
    return _linear(x, weight, DTYPE_FORMATS[weight.dtype], weight.shape[0])


def quantized_linear(x: torch.Tensor, packed: torch.Tensor, fmt: str) -> torch.Tensor:
    """x @ W.T for W stored as GGML blocks of format `fmt` (q8_0, q4_0, q4_k, q5_k, q6_k, or the "_r8"
    interleaved layouts: moetron/quant/interleave.py): `packed` is uint8 [N, bytes per row]. Each x
    row is quantized on its own first (Q8_0, or Q8_K for the k-quants, as llama.cpp does), so a
    row's result is bit-identical whatever shares its batch."""
    num_in = x.shape[-1]
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"quantized_linear: weight {packed.dtype} {tuple(packed.shape)}; want uint8 [rows, bytes]"
        )
    if fmt.endswith("_r8") and packed.shape[0] % 8:
        raise ValueError(f"quantized_linear: {fmt} weights come in groups of 8 rows, not {packed.shape[0]}")
    if packed.shape[1] != _row_size(fmt, num_in):
        raise ValueError(
            f"quantized_linear: rows of {packed.shape[1]} bytes are not {fmt} rows of {num_in} weights"
        )
    if x.dtype != torch.float32:
        raise ValueError(f"quantized_linear: x is {x.dtype}; want float32")
    return _linear(x, packed, fmt, packed.shape[0])


def _row_size(fmt: str, width: int) -> int:
    """A weight row's last dimension in `fmt`: elements for f32/bf16, bytes for GGML blocks."""
    if fmt in ("f32", "bf16", ""):
        return width
    from moetron.quant.ggml_blocks import row_bytes
    from moetron.quant.interleave import base_format

    return row_bytes(base_format(fmt), width)


def _linear(x: torch.Tensor, weight: torch.Tensor, fmt: str, num_out: int) -> torch.Tensor:
    lib = library()
    x_MK = _rows(x)
    if not weight.is_contiguous():
        weight = weight.contiguous()
    num_rows, num_in = x_MK.shape
    out_MN = torch.empty(num_rows, num_out, dtype=torch.float32)
    if num_rows and num_out:
        lib.moetron_linear(
            x_MK.data_ptr(),
            x_MK.stride(0),
            weight.data_ptr(),
            FORMAT_CODES[fmt],
            num_in,
            out_MN.data_ptr(),
            num_out,
            num_rows,
            num_in,
            num_out,
            torch.get_num_threads(),
        )
    return out_MN.reshape(*x.shape[:-1], num_out)


def paged_attention_f32(
    q_THd: torch.Tensor,
    k_cache_NSGd: torch.Tensor,
    v_cache_NSGd: torch.Tensor,
    block_tables_QB: torch.Tensor,
    seq_of_row_T: torch.Tensor,
    pos_of_row_T: torch.Tensor,
) -> torch.Tensor:
    """Causal attention of T packed query rows over the paged cache → [T, H, d] (fp32 queries, an
    fp32 or bf16 cache, CPU).

    Row t belongs to sequence seq_of_row_T[t] (a row of block_tables_QB, int64) and attends that
    sequence's cached keys 0..pos_of_row_T[t]. Those keys must already be in the cache. Each row's
    result depends only on its query and those keys (see attention_avx2.cpp)."""
    lib = library()
    num_rows, num_heads, head_dim = q_THd.shape
    num_kv_heads, block_size = k_cache_NSGd.shape[2], k_cache_NSGd.shape[1]
    if q_THd.stride(-1) != 1:
        q_THd = q_THd.contiguous()
    for name, t in (("k_cache", k_cache_NSGd), ("v_cache", v_cache_NSGd), ("block_tables", block_tables_QB)):
        if not t.is_contiguous():
            raise ValueError(f"paged_attention_f32: {name} must be contiguous")
    tables = (block_tables_QB, seq_of_row_T, pos_of_row_T)
    if (
        any(t.dtype != torch.int64 for t in tables)
        or q_THd.dtype != torch.float32
        or k_cache_NSGd.dtype not in DTYPE_FORMATS
        or v_cache_NSGd.dtype != k_cache_NSGd.dtype
    ):
        raise ValueError(
            "paged_attention_f32 takes float32 queries, float32/bfloat16 caches and int64 tables"
        )
    seq_of_row_T, pos_of_row_T = seq_of_row_T.contiguous(), pos_of_row_T.contiguous()
    out_THd = torch.empty(num_rows, num_heads, head_dim, dtype=torch.float32)
    if num_rows:
        lib.moetron_paged_attention(
            q_THd.data_ptr(),
            q_THd.stride(0),
            q_THd.stride(1),
            k_cache_NSGd.data_ptr(),
            v_cache_NSGd.data_ptr(),
            FORMAT_CODES[DTYPE_FORMATS[k_cache_NSGd.dtype]],
            block_tables_QB.data_ptr(),
            block_tables_QB.shape[1],
            seq_of_row_T.data_ptr(),
            pos_of_row_T.data_ptr(),
            out_THd.data_ptr(),
            num_rows,
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            1.0 / math.sqrt(head_dim),
            torch.get_num_threads(),
        )
    return out_THd


def moe_swiglu_f32(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
    formats: tuple[str, str, str] | None = None,
) -> torch.Tensor:
    """Σ_k weights[t, k] · SwiGLU_{expert_ids[t, k]}(x[t]) → [T, D] in one call (fp32 x, CPU): what
    MoELayer computes from the router's choices, dispatch and combine included (moe_avx2.cpp).
    The expert weights are fp32/bf16 tensors, or uint8 GGML blocks whose `formats` (of w1, w2, w3)
    name them (moetron/quant: [E, rows, bytes per row])."""
    lib = library()
    num_tokens, dim = x_TD.shape
    top_k = expert_ids_TK.shape[1]
    num_experts, hidden = w1_EID.shape[0], w1_EID.shape[1]
    if formats is None:
        formats = tuple(DTYPE_FORMATS.get(w.dtype, "") for w in (w1_EID, w2_EDI, w3_EID))
    widths = tuple(_row_size(fmt, width) for fmt, width in zip(formats, (dim, hidden, dim), strict=True))
    if (
        "" in formats
        or w1_EID.shape != (num_experts, hidden, widths[0])
        or w2_EDI.shape != (num_experts, dim, widths[1])
        or w3_EID.shape != (num_experts, hidden, widths[2])
    ):
        raise ValueError(f"moe_swiglu_f32: x {tuple(x_TD.shape)} does not match the expert weights")
    x_TD, w1_EID, w2_EDI, w3_EID = (t.contiguous() for t in (x_TD, w1_EID, w2_EDI, w3_EID))
    weights_TK = weights_TK.to(torch.float32).contiguous()
    expert_ids_TK = expert_ids_TK.to(torch.int64).contiguous()
    if num_tokens and not 0 <= int(expert_ids_TK.min()) <= int(expert_ids_TK.max()) < num_experts:
        raise ValueError(f"moe_swiglu_f32: expert ids outside [0, {num_experts})")
    out_TD = torch.empty(num_tokens, dim, dtype=torch.float32)
    if num_tokens:
        w1_code, w2_code, w3_code = (FORMAT_CODES[fmt] for fmt in formats)
        lib.moetron_moe_swiglu(
            x_TD.data_ptr(), expert_ids_TK.data_ptr(), weights_TK.data_ptr(), w1_EID.data_ptr(), w1_code,
            w3_EID.data_ptr(), w3_code, w2_EDI.data_ptr(), w2_code, out_TD.data_ptr(), num_tokens, top_k,
            dim, hidden, num_experts, torch.get_num_threads(),
        )  # fmt: skip
    return out_TD


def rms_norm_f32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x², last dim) + eps), row by row (fp32, CPU; see norm_avx2.cpp)."""
    lib = library()
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"rms_norm_f32: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    x_MD = _rows(x)
    weight = weight.contiguous()
    out_MD = torch.empty(x_MD.shape, dtype=torch.float32)
    if x_MD.shape[0]:
        lib.moetron_rms_norm_f32(
            x_MD.data_ptr(), x_MD.stride(0), weight.data_ptr(), out_MD.data_ptr(), x_MD.shape[0], dim, eps
        )
    return out_MD.reshape(x.shape)


# MoE training's routing and row moves (moe_train_avx2.cpp; model/routing_cpu.py, routed_swiglu_cpu.py):
# fp32 token rows, an fp32 or bf16 buffer of S expert rows, int64 maps pair_S [S] (P: padding) and
# slot_P [P] (S: dropped).


def moe_topk(
    probs_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK fp32, ids_TK int64): each token's top_k experts by probs + bias, weighted by
    the probabilities (renormalised over the k if `normalize`). fp32 contiguous inputs, E <= 64."""
    num_tokens, num_experts = probs_TE.shape
    ids_TK = torch.empty(num_tokens, top_k, dtype=torch.int64)
    weights_TK = torch.empty(num_tokens, top_k, dtype=torch.float32)
    library().moetron_moe_topk(
        probs_TE.data_ptr(), bias_E.data_ptr(), num_tokens, num_experts, top_k, int(normalize), ids_TK.data_ptr(),
        weights_TK.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return weights_TK, ids_TK


def moe_topk_backward(
    dweights_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    probs_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    normalize: bool,
) -> torch.Tensor:
    """dprobs_TE of `moe_topk`'s weights (zero but at each token's chosen experts)."""
    num_tokens, num_experts = probs_TE.shape
    dprobs_TE = torch.empty(num_tokens, num_experts, dtype=torch.float32)
    library().moetron_moe_topk_backward(
        dweights_TK.data_ptr(), weights_TK.data_ptr(), probs_TE.data_ptr(), ids_TK.data_ptr(), num_tokens,
        num_experts, ids_TK.shape[1], int(normalize), dprobs_TE.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return dprobs_TE


def moe_plan_rows(
    ids_TK: torch.Tensor, padded: list[int], capacity: int | None, choice_major: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_P, pair_S) for experts' blocks of `padded` rows: each expert's pairs in stable order by
    pair index (or by choice, then token, if `choice_major`), its first `capacity` kept."""
    num_tokens, top_k = ids_TK.shape
    start_E = torch.tensor([0, *padded[:-1]], dtype=torch.int64).cumsum(0)
    num_rows = sum(padded)
    slot_P = torch.empty(num_tokens * top_k, dtype=torch.int64)
    pair_S = torch.empty(num_rows, dtype=torch.int64)
    library().moetron_moe_plan_rows(
        ids_TK.data_ptr(), num_tokens, top_k, len(padded), start_E.data_ptr(), -1 if capacity is None else capacity,
        int(choice_major), num_rows, slot_P.data_ptr(), pair_S.data_ptr(),
    )  # fmt: skip
    return slot_P, pair_S


def moe_dispatch_rows(
    x_TD: torch.Tensor, pair_S: torch.Tensor, top_k: int, dtype: torch.dtype
) -> torch.Tensor:
    """[S, D] in `dtype`: row s is x_TD[pair_S[s] // top_k] (fp32 or bf16; rounded as torch rounds),
    zero for padding."""
    num_tokens, dim = x_TD.shape
    out_SD = torch.empty(pair_S.shape[0], dim, dtype=dtype)
    library().moetron_moe_dispatch_rows(
        x_TD.data_ptr(), int(x_TD.dtype == torch.bfloat16), pair_S.data_ptr(), pair_S.shape[0], top_k, num_tokens, dim, out_SD.data_ptr(),
        int(dtype == torch.bfloat16), torch.get_num_threads(),
    )  # fmt: skip
    return out_SD


def moe_gather_sum_rows(
    rows_SD: torch.Tensor,
    slot_P: torch.Tensor,
    scale_TK: torch.Tensor | None,
    top_k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[T, D] in `dtype` (fp32, or bf16: the fp32 sum rounded once): Σ_k scale_TK[t, k] ·
    rows_SD[slot_P[t*K + k]] (a dropped pair adds nothing; no scale: a plain sum), each product
    rounded before it is added, k in order: in fp32, torch's bits."""
    num_pairs, dim = slot_P.shape[0], rows_SD.shape[1]
    out_TD = torch.empty(num_pairs // top_k, dim, dtype=dtype)
    library().moetron_moe_gather_sum_rows(
        rows_SD.data_ptr(), int(rows_SD.dtype == torch.bfloat16), rows_SD.shape[0], slot_P.data_ptr(),
        None if scale_TK is None else scale_TK.data_ptr(), num_pairs // top_k, top_k, dim, out_TD.data_ptr(),
        int(dtype == torch.bfloat16), torch.get_num_threads(),
    )  # fmt: skip
    return out_TD


def moe_combine_backward(
    dout_TD: torch.Tensor, weights_TK: torch.Tensor, y_SD: torch.Tensor, slot_P: torch.Tensor, pair_S: torch.Tensor,
    weights_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The gradients of out_TD = Σ_k weights_TK · y_SD[slot of (t, k)], for dout_TD fp32 or bf16:
    dy_SD (y's dtype: dout · w rounded, zero on padding rows) and, if `weights_grad`, dweights_TK = <dout[t], y[slot]> (fp32,
    summed in the kernel's fixed order)."""
    num_tokens, top_k = weights_TK.shape
    dy_SD = torch.empty_like(y_SD)
    dweights_TK = torch.empty(num_tokens, top_k, dtype=torch.float32) if weights_grad else None
    library().moetron_moe_combine_backward(
        dout_TD.data_ptr(), int(dout_TD.dtype == torch.bfloat16), weights_TK.data_ptr(), y_SD.data_ptr(), int(y_SD.dtype == torch.bfloat16),
        slot_P.data_ptr(), pair_S.data_ptr(), y_SD.shape[0], num_tokens, top_k, y_SD.shape[1], dy_SD.data_ptr(),
        None if dweights_TK is None else dweights_TK.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return dy_SD, dweights_TK


def attention_train_forward(
    q_BTHd: torch.Tensor, k_BTGd: torch.Tensor, v_BTGd: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of contiguous rows, all fp32 or all bf16 (head h reads kv head h // (H // G)):
    out [B, T, H, d] in their dtype and each row's log-sum-exp of its scaled scores, fp32 [B, T, H],
    for the backward."""
    B, T, H, d = q_BTHd.shape
    out = torch.empty_like(q_BTHd)
    lse = torch.empty(B, T, H, dtype=torch.float32)
    library().moetron_attention_train_forward(
        q_BTHd.data_ptr(), k_BTGd.data_ptr(), v_BTGd.data_ptr(), int(q_BTHd.dtype == torch.bfloat16), B, T, H,
        k_BTGd.shape[2], d, scale, out.data_ptr(), lse.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out, lse


def attention_train_backward(
    q_BTHd: torch.Tensor, k_BTGd: torch.Tensor, v_BTGd: torch.Tensor, out_BTHd: torch.Tensor,
    dout_BTHd: torch.Tensor, lse_BTH: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dq, dk, dv) of `attention_train_forward`, in the inputs' dtype, shaped as q, k, v."""
    B, T, H, d = q_BTHd.shape
    dq, dk, dv = torch.empty_like(q_BTHd), torch.empty_like(k_BTGd), torch.empty_like(v_BTGd)
    library().moetron_attention_train_backward(
        q_BTHd.data_ptr(), k_BTGd.data_ptr(), v_BTGd.data_ptr(), out_BTHd.data_ptr(), dout_BTHd.data_ptr(),
        lse_BTH.data_ptr(), int(q_BTHd.dtype == torch.bfloat16), B, T, H, k_BTGd.shape[2], d, scale, dq.data_ptr(),
        dk.data_ptr(), dv.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return dq, dk, dv


def lm_loss_rows(
    logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int, weight: float
) -> torch.Tensor:
    """Each row's cross-entropy of contiguous fp32 or bf16 logits against int64 targets (0 where
    the target is `ignore_index`), fp32 [N]; the logits are overwritten with the gradient of the
    loss summed with `weight` per counted row: (softmax - one-hot) * weight."""
    num_rows, vocab = logits_NV.shape
    losses_N = torch.empty(num_rows, dtype=torch.float32)
    library().moetron_lm_loss_rows(
        logits_NV.data_ptr(), int(logits_NV.dtype == torch.bfloat16), targets_N.data_ptr(), num_rows, vocab,
        ignore_index, weight, losses_N.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return losses_N


def rms_norm_train_forward(
    x_ND: torch.Tensor, weight_D: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * x * rstd in x's dtype, rstd fp32 [N]) for contiguous fp32 or bf16 rows and a weight
    of the same dtype."""
    num_rows, dim = x_ND.shape
    y_ND, rstd_N = torch.empty_like(x_ND), torch.empty(num_rows, dtype=torch.float32)
    library().moetron_rms_norm_train_forward(
        x_ND.data_ptr(), weight_D.data_ptr(), int(x_ND.dtype == torch.bfloat16), num_rows, dim, eps, y_ND.data_ptr(),
        rstd_N.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return y_ND, rstd_N


def rms_norm_train_backward(
    x_ND: torch.Tensor, weight_D: torch.Tensor, dy_ND: torch.Tensor, rstd_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dweight fp32 [D]) of `rms_norm_train_forward`."""
    num_rows, dim = x_ND.shape
    dx_ND, dweight_D = torch.empty_like(x_ND), torch.empty(dim, dtype=torch.float32)
    library().moetron_rms_norm_train_backward(
        x_ND.data_ptr(), weight_D.data_ptr(), dy_ND.data_ptr(), rstd_N.data_ptr(), int(x_ND.dtype == torch.bfloat16),
        num_rows, dim, dx_ND.data_ptr(), dweight_D.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return dx_ND, dweight_D


def rope_rows(
    x_BTHd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor, inverse: bool
) -> torch.Tensor:
    """Contiguous fp32 or bf16 rows [B, T, H, d] rotated by contiguous cos, sin [B, T, d] (fp32 or
    bf16) as model/rope.py's apply_rope does, in x's dtype; `inverse`: rotated back."""
    B, T, H, d = x_BTHd.shape
    out = torch.empty_like(x_BTHd)
    library().moetron_rope_rows(
        x_BTHd.data_ptr(), int(x_BTHd.dtype == torch.bfloat16), cos_BTd.data_ptr(), sin_BTd.data_ptr(),
        int(cos_BTd.dtype == torch.bfloat16), B * T, H, d, int(inverse), out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


@functools.cache
def _torch_blas() -> tuple[int, int] | None:
    """The addresses of MKL's sgemm_ and MKL_Set_Num_Threads_Local (mkl.h's
    mkl_set_num_threads_local; the lowercase symbol is the Fortran entry, which takes a pointer) in
    torch's own library, where torch was built with MKL and exports them (its x86 wheels); else None."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        sgemm, set_local_threads = (lib.sgemm_, lib.MKL_Set_Num_Threads_Local)
    except (OSError, AttributeError):
        return None
    return tuple(ctypes.cast(f, ctypes.c_void_p).value for f in (sgemm, set_local_threads))  # type: ignore[return-value]


@functools.cache
def grouped_sgemm_available() -> bool:
    """Whether `grouped_sgemm` runs here: the kernels built, torch's MKL entry points found, and one
    small product through them equal to torch's (checked once; torch's path otherwise)."""
    if not (available() and _torch_blas() is not None):
        return False
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=gen), torch.randn(6, 7, generator=gen).t()
    out = torch.zeros(5, 6)
    return grouped_sgemm([[(a, b, out, False)]], [0]) and torch.allclose(out, a @ b, rtol=1e-5, atol=1e-5)


def _sgemm_fields(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> list[int] | None:
    """sgemm_'s arguments (grouped_sgemm.cpp's FIELDS) for row-major out (+)= a @ b, computed as the
    column-major out^T = b^T a^T; None unless these are fp32 CPU matrices [M, K] x [K, N] -> [M, N]
    with a unit stride each (out along its rows) and sizes below 2^31, as BLAS needs."""
    if not (
        a.dim() == b.dim() == out.dim() == 2
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (a, b, out))
        and a.shape[1] == b.shape[0]
        and out.shape == (a.shape[0], b.shape[1])
        and out.stride(1) == 1
    ):
        return None
    operands = []
    for t in (b, a):  # sgemm_'s a, b: b^T [N, K] and a^T [K, M], column-major
        if t.stride(1) == 1:  # t's rows are unit-stride: t^T column-major as it is
            operands += [ord("N"), max(t.stride(0), t.shape[1], 1)]
        elif t.stride(0) == 1:  # a transposed view: t column-major, read transposed
            operands += [ord("T"), max(t.stride(1), t.shape[0], 1)]
        else:
            return None
    (trans_a, lda, trans_b, ldb), (m, k), n = operands, a.shape, b.shape[1]
    fields = [trans_a, trans_b, n, m, k, lda, ldb, max(out.stride(0), n, 1), int(accumulate)]
    return fields if max(fields) < 2**31 else None  # an LP64 BLAS takes 32-bit sizes


def grouped_sgemm(groups: list[list[Product]], thread_of: list[int]) -> bool:
    """Run group g's fp32 products in order (a later one may add into an earlier one's output) on
    thread thread_of[g], every product one single-threaded call of torch's own MKL sgemm: each
    result is torch.mm's (or addmm_'s) bits at one thread, whichever thread or schedule runs it.
    Groups must write disjoint outputs. False, running nothing, where torch has no MKL sgemm to
    call or a product is not one it takes (`_sgemm_fields`)."""
    blas = _torch_blas()
    if blas is None:
        return False
    fields, pointers, group_ends = [], [], []
    for group in groups:
        for a, b, out, accumulate in group:
            product = _sgemm_fields(a, b, out, accumulate)
            if product is None:
                return False
            fields += product
            pointers += [b.data_ptr(), a.data_ptr(), out.data_ptr()]  # sgemm_'s a, b, c
        group_ends.append(len(pointers) // 3)
    fields_t, pointers_t, ends_t, threads_t = (
        torch.tensor(values, dtype=torch.int64) for values in (fields, pointers, group_ends, thread_of)
    )
    library().moetron_grouped_sgemm(
        blas[0], blas[1], fields_t.data_ptr(), pointers_t.data_ptr(), ends_t.data_ptr(), threads_t.data_ptr(),
        len(groups), torch.get_num_threads(),
    )  # fmt: skip
    return True
