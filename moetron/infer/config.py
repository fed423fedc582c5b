"""Engine configuration: KV-cache geometry, scheduler budgets, numerics. Validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    # KV pool: an explicit block count wins; else bytes; else this fraction of free memory.
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.25
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 1024  # tokens (prefill chunks + decodes) in one step
    max_model_len: int | None = None  # prompt + output; defaults to the model's max_seq_len
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # Bit-identical results for a request whatever shares its batch (see batch_invariant.py).
    batch_invariant: bool = True
    # "float32" | "bfloat16" | "float16": activations and KV cache. None keeps the checkpoint's,
    # except that a bf16/fp16 checkpoint on a CPU without half-precision matmul instructions is
    # served in float32 (LLMEngine.from_pretrained logs it); name a dtype to choose. Served in
    # float32, bf16 weights stay bf16 where the fused path runs the model (engine.serving_dtype).
    dtype: str | None = None
    device: str = "cpu"
    # Speculative decoding (spec_decode.py): None | "ngram" (prompt lookup) | "draft" (a small model
    # with the target's vocabulary, from draft_model_dir). Exact: greedy output stays bit-identical.
    speculative_method: str | None = None
    num_speculative_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 4
    draft_model_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("num_kv_blocks", "kv_cache_memory_bytes", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1 (or None)")
        if not 0.0 < self.kv_cache_memory_fraction <= 0.95:
            raise ValueError(
                f"kv_cache_memory_fraction={self.kv_cache_memory_fraction} must lie in (0, 0.95]"
            )
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {sorted(_DTYPES)} or None")
        if (
            not self.enable_chunked_prefill
            and self.max_model_len is not None
            and self.max_num_batched_tokens < self.max_model_len
        ):
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_model_len="
                f"{self.max_model_len} without chunked prefill (a whole prompt must fit in one step)"
            )

        if self.speculative_method not in (None, "ngram", "draft"):
            raise ValueError(
                f"speculative_method={self.speculative_method!r} must be None, 'ngram' or 'draft'"
            )
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens={self.num_speculative_tokens} must be >= 1")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(
                f"n-gram sizes need 1 <= ngram_min={self.ngram_min} <= ngram_max={self.ngram_max}"
            )
        if self.draft_model_dir is not None and self.speculative_method != "draft":
            raise ValueError("draft_model_dir is only used with speculative_method='draft'")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else _DTYPES[self.dtype]

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_overrides(cls, **overrides) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; choose from {sorted(names)}")
        return cls(**overrides)
