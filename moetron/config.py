"""Model configuration: nested dataclasses validated once, named presets, dict/JSON round trip.

Every error names the field (dotted path) and what it allows, so a bad TOML key or CLI override
fails at load time rather than deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
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
    """

    num_experts: int = 8
    top_k: int = 2
    expert_hidden_dim: int = 1024
    normalize_top_k: bool = True  # Mixtral: renormalise the chosen probabilities to sum to 1
    capacity_factor: float | None = None
    aux_loss_weight: float = 0.01  # Switch load-balancing loss; 1.0 means perfectly balanced
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
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrongly typed values."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f" in [{prefix}]" if prefix else ""
        raise ConfigError(f"unknown config key(s) {unknown}{where}; allowed: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _type_check(path, hints[name], value)
    return cls(**kwargs)


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
    "mixtral-8x7b": mixtral_8x7b,
    "gpt4": gpt4,
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
