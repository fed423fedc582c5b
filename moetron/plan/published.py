"""Published models and training runs: the planner's validation set.

Each model is a ModelConfig with the published shape, so its parameters and FLOPs come from
model/accounting.py like any other config. Where moetron's block cannot express a detail exactly,
the config keeps the parameter count and says what it approximates:

* GELU MLPs with width 4·d (GPT-3) become SwiGLU with width 2/3 of it: 3·d·(8d/3) = 2·d·4d weights.
* Dense models put every layer in `num_dense_layers`, so no router is counted.
* Biases, learned position embeddings (GPT-3) and PaLM's parallel block are ignored (<0.1%).
* DeepSeek-V3's multi-head latent attention (MLA) becomes GQA with 128 heads of 96 and 8 KV
  heads: 187.2M attention weights per layer against MLA's 187.1M. Attention FLOPs are therefore
  ~40% low (MLA's QK width is 192, ours 96), i.e. ~4% of the model's FLOPs at 4K context. Its
  KV cache is not MLA's (which stores 576 values per token per layer): do not use it for serving.
  The multi-token-prediction module (14B) is left out, as in the published 671B.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moetron.config import ModelConfig, MoEConfig, get_preset


def _dense(width: int, num_layers: int) -> MoEConfig:
    return MoEConfig(
        num_experts=1, top_k=1, expert_hidden_dim=width, num_dense_layers=num_layers, dense_hidden_dim=width
    )


def gpt3_175b() -> ModelConfig:
    """Brown et al. 2020, Table 2.1: 96 layers, d=12288, 96 heads of 128, 2K context, tied embedding."""
    return ModelConfig(
        vocab_size=50_257, dim=12_288, num_layers=96, num_heads=96, num_kv_heads=96, max_seq_len=2048,
        tie_embeddings=True, moe=_dense(32_768, 96),
    )  # fmt: skip


def palm_540b() -> ModelConfig:
    """Chowdhery et al. 2022, Table 1: 118 layers, d=18432, 48 heads of 256, multi-query, SwiGLU
    width 4·d, 256K vocabulary shared with the output."""
    return ModelConfig(
        vocab_size=256_000, dim=18_432, num_layers=118, num_heads=48, num_kv_heads=1, head_dim=256,
        max_seq_len=2048, tie_embeddings=True, moe=_dense(73_728, 118),
    )  # fmt: skip


def llama3_405b() -> ModelConfig:
    """Llama 3 Herd paper, Table 3: 126 layers, d=16384, 128 heads, 8 KV heads, FFN 53248."""
    return ModelConfig(
        vocab_size=128_256, dim=16_384, num_layers=126, num_heads=128, num_kv_heads=8, max_seq_len=8192,
        moe=_dense(53_248, 126),
    )  # fmt: skip


def deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 report: 61 layers, d=7168, 3 dense layers (18432) then 58 MoE layers of 256
    routed experts (2048) + 1 shared, top-8; 129,280 vocabulary; MLA approximated (see above)."""
    return ModelConfig(
        vocab_size=129_280, dim=7168, num_layers=61, num_heads=128, num_kv_heads=8, head_dim=96,
        max_seq_len=4096,
        moe=MoEConfig(
            num_experts=256, top_k=8, expert_hidden_dim=2048, num_shared_experts=1,
            num_dense_layers=3, dense_hidden_dim=18_432,
        ),
    )  # fmt: skip


PUBLISHED_MODELS: dict[str, Callable[[], ModelConfig]] = {
    "gpt3-175b": gpt3_175b,
    "palm-540b": palm_540b,
    "llama3-405b": llama3_405b,
    "deepseek-v3": deepseek_v3,
}


@dataclass(frozen=True)
class PublishedRun:
    """A training run as published: what we plan it with, and what it reported.

    `gpu_hours` is the total the authors give (restarts and failures included); `mfu` the
    per-step model FLOPs utilisation they measured. None where a figure was not published.
    """

    name: str
    model: str  # key of PUBLISHED_MODELS or a preset
    source: str
    tokens: float
    seq_len: int
    batch_tokens: float
    gpu: str | None = None
    num_gpus: int | None = None
    total_params: float | None = None
    active_params: float | None = None
    flops: float | None = None
    gpu_hours: float | None = None
    mfu: tuple[float, float] | None = None  # (low, high)
    wall_mfu: tuple[float, float] | None = None  # 6ND FLOPs / (GPUs · peak · wall clock)
    days: tuple[float, float] | None = None
    layout: tuple[tuple[str, object], ...] = ()  # the published parallel layout, as search constraints
    precision: str = "bf16"
    ep_overlap: float = 0.0
    note: str = ""

    def model_config(self) -> ModelConfig:
        return PUBLISHED_MODELS[self.model]() if self.model in PUBLISHED_MODELS else get_preset(self.model)


PUBLISHED_RUNS: list[PublishedRun] = [
    PublishedRun(
        "GPT-3 175B", "gpt3-175b", "Brown et al. 2020 (Table D.1)", tokens=300e9, seq_len=2048,
        batch_tokens=3.2e6, total_params=175e9, flops=3.14e23,
        note="trained on V100s; hours not published",
    ),
    PublishedRun(
        "PaLM 540B", "palm-540b", "Chowdhery et al. 2022 (§4, §5, App. B)", tokens=780e9,
        seq_len=2048, batch_tokens=2048 * 2048, gpu="tpu-v4", num_gpus=6144, total_params=540e9,
        flops=2.53e24, mfu=(0.462, 0.462),
        layout=(("tp", 12), ("pp", 1), ("dp", 512), ("recompute", "full")),
        note="two 3,072-chip pods over DCN, 12-way model parallel, rematerialisation; MFU counts "
        "no rematerialisation FLOPs",
    ),
    PublishedRun(
        "Llama 3.1 405B", "llama3-405b", "Llama 3 Herd paper 2024 (§3.3, Tables 4 and 26)",
        tokens=15.6e12, seq_len=8192, batch_tokens=16e6, gpu="h100", num_gpus=16_384,
        total_params=405e9, flops=3.8e25, gpu_hours=30.84e6, mfu=(0.38, 0.43),
        layout=(("tp", 8), ("pp", 16), ("dp", 128)),
        note="TP8 PP16 DP128; GPU-hours include the 128K-context stage and all restarts",
    ),
    PublishedRun(
        "DeepSeek-V3", "deepseek-v3", "DeepSeek-V3 report 2024 (Table 1, §3)", tokens=14.8e12,
        seq_len=4096, batch_tokens=15_360 * 4096, gpu="h800", num_gpus=2048, total_params=671e9,
        active_params=37e9, gpu_hours=2.788e6,
        layout=(("tp", 1), ("pp", 16), ("dp", 128), ("ep", 64)), precision="fp8", ep_overlap=1.0,
        note="PP16 EP64 ZeRO-1, FP8 with DualPipe (all-to-all hidden); hours include context "
        "extension (119K) and post-training (5K)",
    ),
    PublishedRun(
        "Mixtral 8x7B", "mixtral-8x7b", "Jiang et al. 2024", tokens=0, seq_len=32_768,
        batch_tokens=0, total_params=46.7e9, active_params=12.9e9,
        note="parameters only (training compute not published)",
    ),
    PublishedRun(
        "GPT-4 (described)", "gpt4", "SemiAnalysis 2023 via the seed description", tokens=13e12,
        seq_len=8192, batch_tokens=60e6, gpu="a100-80gb", num_gpus=25_000, total_params=1.8e12,
        active_params=280e9, flops=2.15e25, days=(90, 100), wall_mfu=(0.32, 0.36),
        layout=(("tp", 8), ("pp", 15)),
        note="not an official figure; described as 8-way TP, 15-way PP, 32-36% MFU",
    ),
]  # fmt: skip


def published_run(name: str) -> PublishedRun:
    for run in PUBLISHED_RUNS:
        if run.name == name or run.model == name:
            return run
    raise KeyError(name)
