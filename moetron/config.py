"""Model configuration: nested dataclasses validated once, named presets, dict/JSON round trip.

Every error names the field (dotted path) and what it allows, so a bad TOML key or CLI override
fails at load time rather than deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is missing, unknown or outside its allowed range."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(name: str, value: int | float) -> None:
    _check(value > 0, f"{name}={value!r} must be > 0")


def _check_field_types(obj: Any, prefix: str) -> None:
    """Type-check (and int->float coerce) every field, so direct construction is as strict as TOML."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not dataclasses.is_dataclass(value):
            setattr(obj, f.name, _type_check(f"{prefix}{f.name}", hints[f.name], value))


@dataclass
class RopeConfig:
    """Rotary position embedding. `scaling` stretches a model trained at `original_max_seq_len`
    to serve longer contexts: "linear" (position interpolation) or "yarn" (NTK-by-parts + attention
    temperature, arXiv:2309.00071), both as Hugging Face computes them."""

    theta: float = 10_000.0
    scaling: Literal["none", "linear", "yarn"] = "none"
    factor: float = 1.0
    original_max_seq_len: int | None = None  # yarn: the context the model was trained at
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self) -> None:
        _check_field_types(self, "rope.")
        _positive("rope.theta", self.theta)
        if self.scaling != "none":
            _check(self.factor >= 1.0, f"rope.factor={self.factor} must be >= 1.0 when scaling is used")
        if self.scaling == "yarn":
            _check(
                self.original_max_seq_len is not None and self.original_max_seq_len > 0,
                "rope.original_max_seq_len must be a positive int when rope.scaling='yarn'",
            )
            _check(
                self.beta_fast > self.beta_slow > 0,
                f"rope.beta_fast={self.beta_fast} must exceed rope.beta_slow={self.beta_slow} > 0",
            )


@dataclass
class MoEConfig:
    """Sparse feed-forward: `num_experts` SwiGLU experts, each token sent to `top_k` of them.

    capacity_factor=None is dropless (every routed token is computed). A float enables
    GShard/Switch-style token dropping during training: each expert takes at most
    ceil(capacity_factor * tokens * top_k / num_experts) assignments, first choices first.

    Load balancing, two mechanisms that combine (docs/training.md):
      bias_update_rate: DeepSeek-V3's auxiliary-loss-free balancing (torchtitan's
        load_balance_coeff). Each router has a per-expert bias added to its scores for the top-k
        choice only; after every optimizer step the trainer moves it by this rate towards the
        experts that received fewer tokens (train/balance.py). 0 disables it.
      aux_loss_weight, aux_loss_type: the Switch load-balancing loss, over all tokens of a
        micro-batch ("batch") or per sequence and averaged (DeepSeek-V3's complementary
        "sequence"-wise loss, eq. 17-20).
    """

    num_experts: int = 8
    top_k: int = 2
    expert_hidden_dim: int = 1024
    normalize_top_k: bool = True  # Mixtral: renormalise the chosen probabilities to sum to 1
    capacity_factor: float | None = None
    aux_loss_weight: float = 0.01  # Switch load-balancing loss; 1.0 means perfectly balanced
    aux_loss_type: Literal["batch", "sequence"] = "batch"  # the tokens one aux loss is computed over
    bias_update_rate: float = 1e-3  # router bias step per optimizer step; 0: no bias balancing
    z_loss_weight: float = 0.001  # ST-MoE router z-loss
    num_shared_experts: int = 0  # DeepSeek-style always-on experts, fused into one SwiGLU
    shared_expert_hidden_dim: int | None = None  # per shared expert; defaults to expert_hidden_dim
    num_dense_layers: int = 0  # first N layers use a dense SwiGLU instead of experts
    dense_hidden_dim: int | None = None  # defaults to expert_hidden_dim * top_k

    def __post_init__(self) -> None:
        _check_field_types(self, "moe.")
        _positive("moe.num_experts", self.num_experts)
        _check(
            1 <= self.top_k <= self.num_experts,
            f"moe.top_k={self.top_k} must lie in [1, moe.num_experts={self.num_experts}]",
        )
        _positive("moe.expert_hidden_dim", self.expert_hidden_dim)
        if self.capacity_factor is not None:
            _positive("moe.capacity_factor", self.capacity_factor)
        _check(self.aux_loss_weight >= 0, f"moe.aux_loss_weight={self.aux_loss_weight} must be >= 0")
        _check(
            0 <= self.bias_update_rate < 1,
            f"moe.bias_update_rate={self.bias_update_rate} must lie in [0, 1) (0 disables bias balancing)",
        )
        _check(self.z_loss_weight >= 0, f"moe.z_loss_weight={self.z_loss_weight} must be >= 0")
        _check(self.num_shared_experts >= 0, f"moe.num_shared_experts={self.num_shared_experts} must be >= 0")
        _check(self.num_dense_layers >= 0, f"moe.num_dense_layers={self.num_dense_layers} must be >= 0")
        if self.shared_expert_hidden_dim is None:
            self.shared_expert_hidden_dim = self.expert_hidden_dim
        if self.dense_hidden_dim is None:
            self.dense_hidden_dim = self.expert_hidden_dim * self.top_k
        _positive("moe.shared_expert_hidden_dim", self.shared_expert_hidden_dim)
        _positive("moe.dense_hidden_dim", self.dense_hidden_dim)


@dataclass
class ModelConfig:
    """A decoder-only transformer whose FFN layers are Mixture-of-Experts."""

    vocab_size: int = 32_000
    dim: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8  # == num_heads: MHA; 1: MQA; in between: GQA
    head_dim: int | None = None  # defaults to dim // num_heads
    max_seq_len: int = 2048  # longest position served (training context, or longer with rope scaling)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # The token embeddings' init std (None: init_std). torchtitan uses 1.0: token identity then
    # dominates the residual stream early on, so routers see token-dependent inputs.
    embedding_init_std: float | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        if isinstance(self.rope, dict):
            self.rope = from_dict(RopeConfig, self.rope, "rope")
        if isinstance(self.moe, dict):
            self.moe = from_dict(MoEConfig, self.moe, "moe")
        _check_field_types(self, "")
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "max_seq_len"):
            _positive(name, getattr(self, name))
        _positive("norm_eps", self.norm_eps)
        _positive("init_std", self.init_std)
        if self.embedding_init_std is not None:
            _positive("embedding_init_std", self.embedding_init_std)
        _check(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}",
        )
        if self.head_dim is None:
            _check(
                self.dim % self.num_heads == 0,
                f"dim={self.dim} must be divisible by num_heads={self.num_heads} (or set head_dim)",
            )
            self.head_dim = self.dim // self.num_heads
        _check(
            self.head_dim > 0 and self.head_dim % 2 == 0,
            f"head_dim={self.head_dim} must be a positive even number (RoPE rotates pairs)",
        )
        _check(
            self.moe.num_dense_layers <= self.num_layers,
            f"moe.num_dense_layers={self.moe.num_dense_layers} must be <= num_layers={self.num_layers}",
        )

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.moe.num_dense_layers

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.moe.num_dense_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, data, "")


def _type_check(path: str, annotation: Any, value: Any) -> Any:
    """Check `value` against a (simple) annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = ", ".join(repr(option) for option in typing.get_args(annotation))
        _check(value in typing.get_args(annotation), f"{path}={value!r} must be one of {allowed}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            _check(type(None) in options, f"{path} may not be null")
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _type_check(path, option, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if annotation is float:
        _check(
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
            f"{path}={value!r} must be a finite number",
        )
        return float(value)
    if annotation is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{path}={value!r} must be an integer")
        return value
    if annotation is bool:
        _check(isinstance(value, bool), f"{path}={value!r} must be true or false")
        return value
    if annotation is str:
        _check(isinstance(value, str), f"{path}={value!r} must be a string")
        return value
    if dataclasses.is_dataclass(annotation):
        _check(isinstance(value, dict), f"{path} must be a table of settings, got {value!r}")
        return from_dict(annotation, value, path)
    if origin is list:
        _check(isinstance(value, list | tuple), f"{path}={value!r} must be a list")
        (item,) = typing.get_args(annotation)
        return [_type_check(f"{path}[{k}]", item, v) for k, v in enumerate(value)]
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrongly typed values."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        close = difflib.get_close_matches(unknown[0], sorted(known), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise ConfigError(f"unknown config key {key!r}; {hint}allowed: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _type_check(path, hints[name], value)
    return cls(**kwargs)


# --- A run: model + data + training, from a TOML file plus --section.key=value overrides.


@dataclass
class DataConfig:
    """Where training text comes from and how it becomes tokens."""

    # "shakespeare" is the bundled corpus; anything else is a .txt/.jsonl/.parquet file or a directory
    sources: list[str] = field(default_factory=lambda: ["shakespeare"])
    text_field: str = "text"  # JSONL/Parquet column holding the document text
    tokenizer: str = "bpe"  # "bpe" (train one), "cl100k_base", or a tokenizer.json / model directory
    vocab_size: int = 8192  # for "bpe"
    val_fraction: float = 0.02  # share of documents held out for validation
    dir: str = "runs/data"  # prepared token shards; rebuilt only when the inputs change

    def __post_init__(self) -> None:
        _check_field_types(self, "data.")
        _check(len(self.sources) > 0, "data.sources must name at least one source")
        _check(
            256 + 8 <= self.vocab_size <= 2**32 - 1,
            f"data.vocab_size={self.vocab_size} must lie in [264, 2^32-1]",
        )
        _check(0 < self.val_fraction < 0.5, f"data.val_fraction={self.val_fraction} must lie in (0, 0.5)")


@dataclass
class TrainConfig:
    out_dir: str = "runs/demo"
    steps: int = 1000
    seed: int = 0
    batch_size: int = 8  # sequences per micro-batch
    seq_len: int = 256
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    # > 0: train for this many seconds of step time (evaluation and checkpoints not counted), the
    # cosine decaying over the time after warmup rather than over steps; `steps` is then a cap.
    # For equal-time comparisons (benchmarks/moe_vs_dense.py); the run is no longer reproducible.
    time_budget_s: float = 0.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # Matmul compute dtype under autocast; weights and optimizer state stay fp32. "auto": bfloat16
    # where bf16 matmuls are native (AMX, AVX512-BF16, CUDA sm80+), else float32 (train/precision.py).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    activation_checkpointing: bool = False
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    # "auto": continue from the newest valid checkpoint in out_dir, or start fresh where no run is
    # yet (so a torchrun --max-restarts restart needs no flag); true: a checkpoint is required;
    # false: start fresh, refusing an out_dir that holds a run unless overwrite (train/resume.py).
    resume: Literal["auto", True, False] = "auto"
    overwrite: bool = False  # start fresh, deleting the run already in out_dir
    eval_every: int = 100
    eval_batches: int = 20
    progress: bool = True

    def __post_init__(self) -> None:
        _check_field_types(self, "train.")
        _check(  # the Literal check lets 1 and 0 pass as True and False
            isinstance(self.resume, bool) or self.resume == "auto",
            f"train.resume={self.resume!r} must be one of 'auto', True, False",
        )
        _check(
            not (self.overwrite and self.resume is True),
            "train.overwrite=true starts over and train.resume=true continues: set one of them",
        )
        for name in ("steps", "batch_size", "seq_len", "grad_accum_steps", "checkpoint_every",
                     "keep_checkpoints", "eval_every", "eval_batches"):  # fmt: skip
            _positive(f"train.{name}", getattr(self, name))
        _positive("train.lr", self.lr)
        _check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        _check(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        _check(
            math.isfinite(self.time_budget_s) and self.time_budget_s >= 0,
            f"train.time_budget_s={self.time_budget_s} must be a finite number of seconds >= 0 (0 disables)",
        )
        _check(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay} must be >= 0")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, f"train.{name}={getattr(self, name)} must lie in [0, 1)")
        _check(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0 (0 disables)")


@dataclass
class ParallelConfig:
    """How a `torchrun` job splits the work (moetron/parallel/mesh.py builds the mesh from it).

    World size = pp * dp_replicate * dp_shard * tp. Expert parallelism borrows its ranks from
    dp_shard (as torchtitan does): ep must divide dp_shard, and each group of ep data-parallel
    ranks shares its experts instead of replicating them. dp_shard=-1 takes whatever the other
    degrees leave of the world size. train.batch_size is per data-parallel rank, so the global
    batch is batch_size * grad_accum_steps * dp_replicate * dp_shard sequences.
    """

    dp_replicate: int = 1  # HSDP replicas (each a full FSDP group); gradients all-reduced across them
    dp_shard: int = -1  # FSDP2 degree; -1: world_size / (pp * dp_replicate * tp)
    tp: int = 1  # tensor parallel: attention heads, FFN and expert inner dimension
    ep: int = 1  # expert parallel, borrowed from dp_shard: num_experts / ep experts per rank
    pp: int = 1  # pipeline stages (x pp_stages_per_rank for interleaved schedules)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    pp_microbatches: int | None = None  # per rank and accumulation step; defaults to pp * pp_stages_per_rank
    pp_stages_per_rank: int = 1  # > 1 only with pp_schedule="interleaved_1f1b"

    def __post_init__(self) -> None:
        _check_field_types(self, "parallel.")
        for name in ("dp_replicate", "tp", "ep", "pp", "pp_stages_per_rank"):
            _positive(f"parallel.{name}", getattr(self, name))
        _check(
            self.dp_shard == -1 or self.dp_shard > 0,
            f"parallel.dp_shard={self.dp_shard} must be > 0, or -1 for the rest of the world size",
        )
        if self.dp_shard > 0:
            _check(
                self.dp_shard % self.ep == 0,
                f"parallel.ep={self.ep} must divide parallel.dp_shard={self.dp_shard} "
                "(expert parallelism borrows its ranks from dp_shard)",
            )
        _check(
            self.ep == 1 or self.tp == 1,
            f"parallel.ep={self.ep} with parallel.tp={self.tp}: combining expert and tensor parallelism "
            "is not supported; use one of them",
        )
        if self.pp_schedule == "interleaved_1f1b":
            _check(
                self.pp_stages_per_rank >= 2,
                f"parallel.pp_stages_per_rank={self.pp_stages_per_rank} must be >= 2 with "
                "pp_schedule='interleaved_1f1b'",
            )
        else:
            _check(
                self.pp_stages_per_rank == 1,
                f"parallel.pp_stages_per_rank={self.pp_stages_per_rank} must be 1 with "
                f"pp_schedule={self.pp_schedule!r} (only 'interleaved_1f1b' holds several stages per rank)",
            )
        if self.pp_microbatches is None:
            self.pp_microbatches = self.pp * self.pp_stages_per_rank
        _positive("parallel.pp_microbatches", self.pp_microbatches)

    @property
    def num_stages(self) -> int:
        return self.pp * self.pp_stages_per_rank

    def check_model(self, model: ModelConfig, batch_size: int) -> None:
        """The checks that need the model: every degree must divide what it splits."""
        for name in ("num_heads", "num_kv_heads"):
            value = getattr(model, name)
            _check(
                value % self.tp == 0,
                f"model.{name}={value} must be divisible by parallel.tp={self.tp} (each rank takes whole heads)",
            )
        _check(
            model.moe.num_experts % self.ep == 0,
            f"model.moe.num_experts={model.moe.num_experts} must be divisible by parallel.ep={self.ep}",
        )
        _check(
            model.num_layers % self.num_stages == 0,
            f"model.num_layers={model.num_layers} must be divisible into parallel.pp * "
            f"parallel.pp_stages_per_rank = {self.num_stages} pipeline stages",
        )
        if self.pp > 1:
            _check(
                batch_size % self.pp_microbatches == 0,
                f"train.batch_size={batch_size} must be divisible by "
                f"parallel.pp_microbatches={self.pp_microbatches}",
            )


@dataclass
class EngineConfig:
    """The serving engine (moetron/infer): KV-cache geometry, scheduler budgets, numerics. A TOML's
    `[engine]` table, `moetron serve` flags, or `LLM(model_dir, **fields)`."""

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
    # Bit-identical results for a request whatever shares its batch (infer/batch_invariant.py).
    batch_invariant: bool = True
    # The fused C++ decoder layers where they cover the model (infer/fused_layers.py); false runs
    # the module path with the same serving kernels (same tokens; logprobs within 1e-5).
    fused_layers: bool = True
    # Activations and KV cache. None keeps the checkpoint's, except that a bf16/fp16 checkpoint on a
    # CPU without half-precision matmul instructions is served in float32 (LLMEngine.from_pretrained
    # logs it); name a dtype to choose. Served in float32, bf16 weights stay bf16 where the fused
    # path runs the model (engine.serving_dtype).
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # Matmul weights quantized at load to GGML block formats (moetron/quant/quantize.py): served by
    # moetron's int8 kernels in float32 activations, on the CPU; None keeps the checkpoint's.
    quantization: Literal["q8_0", "q4_0", "q4_k"] | None = None
    # The KV cache's dtype: "auto" = the activations'; "bfloat16" under float32 activations halves
    # the cache (twice the blocks in the same memory), each value rounded once when written.
    kv_cache_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: str = "cpu"
    # Speculative decoding (infer/spec_decode.py): "ngram" (prompt lookup) or "draft" (a small model
    # with the target's vocabulary, from draft_model_dir). Exact: greedy output stays bit-identical.
    speculative_method: Literal["ngram", "draft"] | None = None
    num_speculative_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 4
    draft_model_dir: str | None = None
    # Serving across processes (infer/data_parallel.py), in vLLM's spelling. Attention is
    # data-parallel: each of the data_parallel_size ranks holds whole requests and their KV cache.
    # enable_expert_parallel: each rank holds num_experts / ranks of every MoE layer's experts
    # (infer/expert_parallel.py; the data-parallel groups split them); without it every rank holds
    # the whole model.
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    # Each data-parallel group's ranks split the attention heads (infer/head_parallel.py): ranks in all
    # = data_parallel_size × tensor_parallel_size; the KV heads must divide (not one: MQA).
    tensor_parallel_size: int = 1
    # Several nodes: every node runs the same command with its node_rank (or all run under torchrun).
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port (one node only)
    # LoRA adapters served per request (infer/adapters.py), vLLM's `NAME=ADAPTER_DIR` entries: a
    # request whose `model` is NAME runs that adapter; at most max_loras of them.
    lora_modules: list[str] = field(default_factory=list)
    max_loras: int = 8

    def __post_init__(self) -> None:
        _check_field_types(self, "engine.")
        for name in ("data_parallel_size", "tensor_parallel_size", "nnodes", "max_loras"):
            _check(getattr(self, name) >= 1, f"engine.{name}={getattr(self, name)} must be >= 1")
        _check(
            0 <= self.node_rank < self.nnodes,
            f"engine.node_rank={self.node_rank} must lie in [0, engine.nnodes={self.nnodes})",
        )
        _check(
            self.data_parallel_size * self.tensor_parallel_size % self.nnodes == 0,
            f"--data-parallel-size={self.data_parallel_size} × --tensor-parallel-size={self.tensor_parallel_size} "
            f"ranks must be a multiple of --nnodes={self.nnodes} (the same number of ranks on every node)",
        )
        _check(
            self.nnodes == 1 or self.master_port is not None,
            "several nodes (--nnodes > 1) need --master-addr and --master-port (node 0's address)",
        )
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_speculative_tokens"):
            _check(getattr(self, name) >= 1, f"engine.{name}={getattr(self, name)} must be >= 1")
        for name in ("num_kv_blocks", "kv_cache_memory_bytes", "max_model_len"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"engine.{name}={value} must be >= 1 (or None)")
        _check(
            0.0 < self.kv_cache_memory_fraction <= 0.95,
            f"engine.kv_cache_memory_fraction={self.kv_cache_memory_fraction} must lie in (0, 0.95]",
        )
        if self.max_model_len is not None:
            self._check_prompt_fits_a_step(self.max_model_len)
        _check(
            1 <= self.ngram_min <= self.ngram_max,
            f"n-gram sizes need 1 <= engine.ngram_min={self.ngram_min} <= engine.ngram_max={self.ngram_max}",
        )
        _check(
            self.quantization is None or (self.device == "cpu" and self.dtype in (None, "float32")),
            f"engine.quantization={self.quantization} serves on the CPU in float32 activations "
            f"(engine.device={self.device!r}, engine.dtype={self.dtype!r})",
        )
        _check(
            self.draft_model_dir is None or self.speculative_method == "draft",
            "engine.draft_model_dir is only used with engine.speculative_method='draft'",
        )

    def _check_prompt_fits_a_step(self, max_model_len: int) -> None:
        _check(
            self.enable_chunked_prefill or self.max_num_batched_tokens >= max_model_len,
            f"engine.max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_model_len="
            f"{max_model_len} without chunked prefill (a whole prompt must fit in one step)",
        )

    def resolve_max_model_len(self, model: ModelConfig) -> int:
        """max_model_len for serving `model`: the configured one, or the model's max_seq_len."""
        _check(
            self.max_model_len is None or self.max_model_len <= model.max_seq_len,
            f"engine.max_model_len={self.max_model_len} exceeds the model's max_seq_len={model.max_seq_len}",
        )
        max_model_len = self.max_model_len or model.max_seq_len
        self._check_prompt_fits_a_step(max_model_len)
        return max_model_len

    def torch_kv_dtype(self, activations: Any) -> Any:
        """`kv_cache_dtype` as a torch.dtype, for these activations (the "auto" case)."""
        import torch

        return activations if self.kv_cache_dtype == "auto" else getattr(torch, self.kv_cache_dtype)

    @property
    def torch_dtype(self) -> Any:
        """`dtype` as a torch.dtype (None: the checkpoint's)."""
        import torch

        return None if self.dtype is None else getattr(torch, self.dtype)

    def replace(self, **changes: Any) -> EngineConfig:
        return from_dict(EngineConfig, {**dataclasses.asdict(self), **changes}, "engine")

    @classmethod
    def from_overrides(cls, **overrides: Any) -> EngineConfig:
        """Fields by keyword (LLM(...), LLMEngine.from_pretrained(...)), checked like a TOML table."""
        return from_dict(cls, overrides, "engine")


LORA_TARGETS = ("attention", "experts", "router", "shared", "dense")


@dataclass
class LoRAConfig:
    """`[finetune.lora]`: rank r, alpha (the update is scaled by alpha / r), dropout on the LoRA
    input, and targets: attention = q/k/v/o, experts = each routed expert's w1/w3/w2, router = the
    gates, shared = shared experts, dense = dense FFN layers (moetron/finetune/lora.py)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention", "experts"])

    def __post_init__(self) -> None:
        _check_field_types(self, "finetune.lora.")
        _positive("finetune.lora.rank", self.rank)
        _check(0.0 <= self.dropout < 1.0, f"finetune.lora.dropout={self.dropout} must lie in [0, 1)")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        _check(
            bool(self.targets) and not unknown,
            f"finetune.lora.targets={self.targets}: choose among {', '.join(LORA_TARGETS)}",
        )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class FinetuneConfig:
    """`moetron finetune BASE --data FILE.jsonl` (a TOML's `[finetune]` table; --finetune.key=value):
    supervised fine-tuning (full, or LoRA on a frozen base) or DPO (moetron/finetune/)."""

    base: str = ""  # the base model directory
    data: str = ""  # JSONL: chat messages, prompt/completion, or prompt/chosen/rejected (dpo)
    method: Literal["full", "lora", "dpo"] = "lora"
    # The frozen base's dtype under LoRA (the adapter and its optimizer stay float32); full and DPO
    # without LoRA train float32 weights.
    base_dtype: Literal["float32", "bfloat16"] = "float32"
    dpo_lora: bool = True  # dpo: train a LoRA (the reference is the base without it) or all weights
    dpo_beta: float = 0.1
    out_dir: str = "runs/finetune"
    steps: int = 100
    batch_size: int = 4  # rows of seq_len tokens per step
    seq_len: int = 512
    pack: bool = True  # several examples per row, attention kept within each (document masking)
    train_on_prompt: bool = False  # loss on every token, not only the answers'
    lr: float = 2e-4
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_fraction: float = 0.1  # held out from `data`, the last examples after a seeded shuffle
    eval_every: int = 25
    checkpoint_every: int = 25
    keep_checkpoints: int = 2
    merge: bool = False  # lora: also write the merged model to out_dir/merged
    progress: bool = True  # a progress bar on a terminal, a line every 10% of the run otherwise
    seed: int = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        _check_field_types(self, "finetune.")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every", "keep_checkpoints"):
            _positive(f"finetune.{name}", getattr(self, name))
        _positive("finetune.lr", self.lr)
        _positive("finetune.dpo_beta", self.dpo_beta)
        _check(
            0.0 <= self.eval_fraction < 1.0, f"finetune.eval_fraction={self.eval_fraction} must lie in [0, 1)"
        )
        _check(self.warmup_steps >= 0, f"finetune.warmup_steps={self.warmup_steps} must be >= 0")
        lora = self.method == "lora" or (self.method == "dpo" and self.dpo_lora)
        _check(
            self.base_dtype == "float32" or lora,
            f"finetune.base_dtype={self.base_dtype!r} is for a frozen base under LoRA; method={self.method!r} "
            "trains float32 weights",
        )


@dataclass
class Config:
    """Everything a run needs; saved resolved beside every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)  # `moetron serve --config`
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # `moetron finetune`

    def __post_init__(self) -> None:
        _check(
            self.train.seq_len <= self.model.max_seq_len,
            f"train.seq_len={self.train.seq_len} must be <= model.max_seq_len={self.model.max_seq_len}",
        )
        self.parallel.check_model(self.model, self.train.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """`model.preset = "small"` starts the model from a preset; other model keys override it."""
        data = dict(data)
        model = dict(data.get("model", {}))
        if "preset" in model:
            preset = model.pop("preset")
            _check(isinstance(preset, str), f"model.preset={preset!r} must be a string")
            model = _deep_merge(get_preset(preset).to_dict(), model)
        data["model"] = model
        return from_dict(cls, data, "")


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'--train.steps=20' -> (['train', 'steps'], 20). Values parse as TOML (numbers, booleans,
    strings, lists) and fall back to a bare string, so --train.out_dir=runs/x needs no quotes;
    `none`/`null` unset an optional value (TOML itself has no null)."""
    body = text.removeprefix("--")
    key, sep, raw = body.partition("=")
    _check(bool(sep) and bool(key), f"override {text!r} must look like --section.key=value")
    if raw.strip().lower() in ("none", "null"):
        return key.split("."), None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML run file (or start from defaults) and apply --section.key=value overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            _check(isinstance(node, dict), f"override {text!r}: {key!r} is not a section")
        node[keys[-1]] = value
    return Config.from_dict(data)


# --- Presets: named Python values. Parameter counts are checked against published figures in tests.


def tiny() -> ModelConfig:
    """Trains in seconds on a CPU; used by the tests."""
    return ModelConfig(
        vocab_size=512, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=256,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=96),
    )  # fmt: skip


def small() -> ModelConfig:
    """The CPU demo: GPT-4's shape (16 experts, top-2, multi-query attention) at ~110M parameters."""
    return ModelConfig(
        vocab_size=8192, dim=512, num_layers=8, num_heads=8, num_kv_heads=1, max_seq_len=1024,
        moe=MoEConfig(num_experts=16, top_k=2, expert_hidden_dim=512),
    )  # fmt: skip


def small_fine() -> ModelConfig:
    """`small` with fine-grained experts (DeepSeekMoE, OLMoE): each expert a quarter as wide, four
    times as many, four times as many chosen: 64 experts top-8 of width 128, so the same active and
    total parameters as `small` but C(64,8) instead of C(16,2) expert combinations per token.
    `moe.num_shared_experts=1` with `moe.top_k=7` adds DeepSeekMoE's always-on expert at equal cost."""
    cfg = small()
    cfg.moe = MoEConfig(num_experts=64, top_k=8, expert_hidden_dim=128)
    return cfg


def mixtral_8x7b() -> ModelConfig:
    """mistralai/Mixtral-8x7B-v0.1: 46.7B total, 12.9B active."""
    return ModelConfig(
        vocab_size=32_000, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, max_seq_len=32_768,
        rope=RopeConfig(theta=1e6),
        moe=MoEConfig(num_experts=8, top_k=2, expert_hidden_dim=14_336),
    )  # fmt: skip


def gpt4() -> ModelConfig:
    """The publicly described GPT-4: 120 layers, 16 experts, top-2, multi-query attention,
    cl100k_base vocabulary (100,277 ids), 8K training context served at 32K with YaRN.
    Width 16,384 (128 heads of 128) and expert width 18,432 give ~1.81T total, ~286B active."""
    return ModelConfig(
        vocab_size=100_277, dim=16_384, num_layers=120, num_heads=128, num_kv_heads=1, max_seq_len=32_768,
        rope=RopeConfig(theta=500_000.0, scaling="yarn", factor=4.0, original_max_seq_len=8192),
        moe=MoEConfig(num_experts=16, top_k=2, expert_hidden_dim=18_432),
    )  # fmt: skip


PRESETS: dict[str, typing.Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "small": small,
    "small-fine": small_fine,
    "mixtral-8x7b": mixtral_8x7b,
    "gpt4": gpt4,
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
