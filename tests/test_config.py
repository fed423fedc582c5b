"""ModelConfig validation, dict/JSON round trip and the named presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moetron.config import (
    PRESETS,
    ConfigError,
    EngineConfig,
    ModelConfig,
    MoEConfig,
    RopeConfig,
    get_preset,
    load_run_config,
    tiny,
)
from moetron.model.accounting import param_counts

# --- Every invalid value fails at construction, naming the field and what it allows.


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_experts": 4, "top_k": 5}, r"moe\.top_k=5 must lie in \[1, moe\.num_experts=4\]"),
        ({"num_experts": 4, "top_k": 0}, r"moe\.top_k=0 must lie in \[1, moe\.num_experts=4\]"),
        ({"num_experts": 0, "top_k": 1}, r"moe\.num_experts=0 must be > 0"),
        ({"expert_hidden_dim": 0}, r"moe\.expert_hidden_dim=0 must be > 0"),
        ({"capacity_factor": 0.0}, r"moe\.capacity_factor=0\.0 must be > 0"),
        ({"capacity_factor": -1.25}, r"moe\.capacity_factor=-1\.25 must be > 0"),
        ({"aux_loss_weight": -0.01}, r"moe\.aux_loss_weight=-0\.01 must be >= 0"),
        ({"z_loss_weight": -0.001}, r"moe\.z_loss_weight=-0\.001 must be >= 0"),
        ({"num_shared_experts": -1}, r"moe\.num_shared_experts=-1 must be >= 0"),
        ({"num_dense_layers": -1}, r"moe\.num_dense_layers=-1 must be >= 0"),
        ({"shared_expert_hidden_dim": 0}, r"moe\.shared_expert_hidden_dim=0 must be > 0"),
        ({"dense_hidden_dim": -8}, r"moe\.dense_hidden_dim=-8 must be > 0"),
    ],
)
def test_moe_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**kwargs)


def test_moe_config_defaults_derived_widths() -> None:
    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden_dim=100)
    assert moe.shared_expert_hidden_dim == 100
    assert moe.dense_hidden_dim == 200  # expert_hidden_dim * top_k: same active width as the MoE
    assert MoEConfig(num_experts=4, top_k=4).top_k == 4  # upper bound inclusive


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"theta": 0.0}, r"rope\.theta=0\.0 must be > 0"),
        ({"scaling": "ntk"}, r"rope\.scaling='ntk' must be one of 'none', 'linear', 'yarn'"),
        ({"scaling": "linear", "factor": 0.5}, r"rope\.factor=0\.5 must be >= 1\.0"),
        ({"scaling": "yarn", "factor": 4.0}, r"rope\.original_max_seq_len must be a positive int"),
        (
            {"scaling": "yarn", "factor": 4.0, "original_max_seq_len": 0},
            r"rope\.original_max_seq_len must be a positive int",
        ),
        (
            {
                "scaling": "yarn",
                "factor": 4.0,
                "original_max_seq_len": 4096,
                "beta_fast": 1.0,
                "beta_slow": 2.0,
            },
            r"rope\.beta_fast=1\.0 must exceed rope\.beta_slow=2\.0",
        ),
    ],
)
def test_rope_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RopeConfig(**kwargs)


def test_rope_factor_below_one_is_ignored_without_scaling() -> None:
    assert RopeConfig(scaling="none", factor=0.5).factor == 0.5


@pytest.mark.parametrize(
    "name", ["vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "max_seq_len"]
)
@pytest.mark.parametrize("value", [0, -4])
def test_model_config_rejects_non_positive_sizes(name: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"^{name}={value} must be > 0"):
        ModelConfig(**{name: value})


@pytest.mark.parametrize("name", ["norm_eps", "init_std"])
def test_model_config_rejects_non_positive_scales(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{name}=0\.0 must be > 0"):
        ModelConfig(**{name: 0.0})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_heads": 8, "num_kv_heads": 3}, r"num_heads=8 must be divisible by num_kv_heads=3"),
        ({"num_heads": 4, "num_kv_heads": 8}, r"num_heads=4 must be divisible by num_kv_heads=8"),
        ({"dim": 100, "num_heads": 8, "num_kv_heads": 8}, r"dim=100 must be divisible by num_heads=8"),
        (
            {"dim": 64, "num_heads": 4, "num_kv_heads": 4, "head_dim": 15},
            r"head_dim=15 must be a positive even",
        ),
        # head_dim derived from dim // num_heads is checked too.
        ({"dim": 36, "num_heads": 4, "num_kv_heads": 4}, r"head_dim=9 must be a positive even"),
        (
            {"dim": 64, "num_heads": 4, "num_kv_heads": 4, "head_dim": 0},
            r"head_dim=0 must be a positive even",
        ),
        (
            {"num_layers": 2, "moe": MoEConfig(num_dense_layers=3)},
            r"moe\.num_dense_layers=3 must be <= num_layers=2",
        ),
    ],
)
def test_model_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**kwargs)


def test_model_config_explicit_head_dim_need_not_divide_dim() -> None:
    cfg = ModelConfig(dim=100, num_heads=8, num_kv_heads=2, head_dim=32)
    assert cfg.head_dim == 32
    assert ModelConfig(dim=64, num_heads=4, num_kv_heads=1).head_dim == 16


def test_dense_layer_helpers() -> None:
    cfg = ModelConfig(num_layers=4, moe=MoEConfig(num_dense_layers=1))
    assert cfg.num_moe_layers == 3
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, True, True]


def test_config_error_is_a_value_error() -> None:
    # Callers that catch ValueError (argparse, TOML loaders) still see config errors.
    assert issubclass(ConfigError, ValueError)


# --- from_dict: the TOML/JSON path rejects unknown keys and wrongly typed values by dotted path.


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"dimm": 64}, r"unknown config key 'dimm'; did you mean 'dim', 'head_dim'\? allowed: .*'dim'"),
        ({"moe": {"topk": 2}}, r"unknown config key 'moe.topk'; did you mean 'top_k'"),
        ({"rope": {"base": 1e4}}, r"unknown config key 'rope.base'; allowed: .*'theta'"),
        ({"dim": True}, r"^dim=True must be an integer"),
        ({"num_layers": 2.0}, r"^num_layers=2\.0 must be an integer"),
        ({"head_dim": "16"}, r"^head_dim='16' must be an integer"),
        ({"vocab_size": None}, r"^vocab_size=None must be an integer"),
        ({"moe": {"top_k": True}}, r"^moe\.top_k=True must be an integer"),
        ({"norm_eps": "1e-5"}, r"^norm_eps='1e-5' must be a finite number"),
        ({"init_std": True}, r"^init_std=True must be a finite number"),
        ({"init_std": float("nan")}, r"^init_std=nan must be a finite number"),
        ({"rope": {"theta": "big"}}, r"^rope\.theta='big' must be a finite number"),
        ({"moe": {"capacity_factor": "1.25"}}, r"^moe\.capacity_factor='1\.25' must be a finite number"),
        ({"tie_embeddings": 1}, r"^tie_embeddings=1 must be true or false"),
        ({"moe": {"normalize_top_k": "yes"}}, r"^moe\.normalize_top_k='yes' must be true or false"),
        ({"rope": {"scaling": "ntk"}}, r"^rope\.scaling='ntk' must be one of"),
        ({"moe": 3}, r"^moe must be a table of settings"),
        # Values that type-check are still range-checked.
        ({"moe": {"num_experts": 4, "top_k": 9}}, r"moe\.top_k=9 must lie in \[1, moe\.num_experts=4\]"),
        ({"rope": {"scaling": "yarn", "factor": 4}}, r"rope\.original_max_seq_len must be a positive int"),
    ],
)
def test_from_dict_rejects(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)


def test_from_dict_accepts_ints_for_floats_and_nulls_for_optionals() -> None:
    cfg = ModelConfig.from_dict(
        {"rope": {"theta": 10_000}, "norm_eps": 1, "head_dim": None, "moe": {"capacity_factor": None}}
    )
    assert isinstance(cfg.rope.theta, float) and cfg.rope.theta == 10_000.0
    assert isinstance(cfg.norm_eps, float)
    assert cfg.head_dim == cfg.dim // cfg.num_heads
    assert cfg.moe.capacity_factor is None
    assert isinstance(cfg.rope, RopeConfig) and isinstance(cfg.moe, MoEConfig)


def test_from_empty_dict_is_the_default() -> None:
    assert ModelConfig.from_dict({}) == ModelConfig()


def _unusual_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=1000, dim=96, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=24, tie_embeddings=True,
        rope=RopeConfig(theta=5e5, scaling="yarn", factor=8.0, original_max_seq_len=512, beta_fast=16.0),
        moe=MoEConfig(
            num_experts=6, top_k=3, expert_hidden_dim=40, normalize_top_k=False, capacity_factor=1.25,
            num_shared_experts=2, shared_expert_hidden_dim=24, num_dense_layers=1, dense_hidden_dim=72,
        ),
    )  # fmt: skip


@pytest.mark.parametrize("make", [*PRESETS.values(), _unusual_config], ids=[*PRESETS, "unusual"])
def test_dict_and_json_round_trip(make) -> None:
    cfg = make()
    data = cfg.to_dict()
    assert isinstance(data["rope"], dict) and isinstance(data["moe"], dict)
    assert ModelConfig.from_dict(data) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(data))) == cfg
    # The constructor also takes the nested sections as plain dicts.
    assert ModelConfig(**data) == cfg


# --- Presets


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name: str) -> None:
    cfg = get_preset(name)
    assert isinstance(cfg, ModelConfig)
    assert get_preset(name) is not cfg  # a fresh value each call: callers may mutate theirs


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'gpt5'; choose one of \[.*'gpt4'.*\]"):
        get_preset("gpt5")


def test_mixtral_8x7b_matches_published_counts() -> None:
    counts = param_counts(get_preset("mixtral-8x7b"))
    assert counts.total == pytest.approx(46.7e9, rel=0.005)
    assert counts.active == pytest.approx(12.9e9, rel=0.005)


def test_gpt4_preset_matches_public_description() -> None:
    cfg = get_preset("gpt4")
    assert cfg.num_layers == 120
    assert (cfg.moe.num_experts, cfg.moe.top_k) == (16, 2)
    assert cfg.num_kv_heads == 1  # multi-query attention
    assert cfg.vocab_size == 100_277  # cl100k_base
    assert cfg.rope.scaling == "yarn"
    assert cfg.rope.original_max_seq_len == 8192
    assert cfg.max_seq_len == cfg.rope.original_max_seq_len * cfg.rope.factor
    counts = param_counts(cfg)
    assert counts.total == pytest.approx(1.8e12, rel=0.03)
    assert counts.active == pytest.approx(280e9, rel=0.05)


def test_small_preset_size() -> None:
    total = param_counts(get_preset("small")).total
    assert 50e6 <= total <= 150e6


def test_fine_grained_preset_matches_small_in_parameters() -> None:
    small, fine = param_counts(get_preset("small")), param_counts(get_preset("small-fine"))
    cfg = get_preset("small-fine")
    assert (cfg.moe.num_experts, cfg.moe.top_k) == (64, 8)
    assert (fine.total, fine.active) == pytest.approx((small.total, small.active), rel=1e-2)  # wider routers


def test_tiny_preset_is_tiny() -> None:
    cfg = tiny()
    assert param_counts(cfg).total < 1e6
    assert cfg.num_kv_heads < cfg.num_heads  # exercises GQA in every test that uses it


# --- The engine's settings join the tree: [engine] in a TOML, --engine.key=value, `moetron serve` flags.


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"block_size": 0}, r"engine\.block_size=0 must be >= 1"),
        (
            {"kv_cache_memory_fraction": 1.5},
            r"engine\.kv_cache_memory_fraction=1\.5 must lie in \(0, 0\.95\]",
        ),
        ({"dtype": "float8"}, r"engine\.dtype='float8' must be one of 'float32', 'bfloat16', 'float16'"),
        ({"speculative_method": "medusa"}, r"engine\.speculative_method='medusa' must be one of"),
        ({"ngram_min": 3, "ngram_max": 2}, r"engine\.ngram_min=3 <= engine\.ngram_max=2"),
        ({"draft_model_dir": "d"}, r"engine\.draft_model_dir is only used with"),
        ({"max_num_seqs": "8"}, r"engine\.max_num_seqs='8' must be an integer"),
        (
            {"enable_chunked_prefill": False, "max_model_len": 2048},
            r"engine\.max_num_batched_tokens=1024 must be >= max_model_len=2048 without chunked prefill",
        ),
    ],
)
def test_engine_config_errors_name_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**changes)
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_overrides(**changes)


def test_engine_config_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown config key 'engine\.max_num_seq'; did you mean 'max_num_seqs'"
    ):
        EngineConfig.from_overrides(max_num_seq=4)


def test_engine_config_resolves_max_model_len_against_the_model() -> None:
    model = tiny()  # max_seq_len 256
    assert EngineConfig().resolve_max_model_len(model) == 256
    assert EngineConfig(max_model_len=100).resolve_max_model_len(model) == 100
    with pytest.raises(ConfigError, match=r"engine\.max_model_len=300 exceeds the model's max_seq_len=256"):
        EngineConfig(max_model_len=300).resolve_max_model_len(model)
    with pytest.raises(ConfigError, match="without chunked prefill"):
        EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=128).resolve_max_model_len(model)
    assert EngineConfig(dtype="bfloat16").torch_dtype is torch.bfloat16 and EngineConfig().torch_dtype is None


def test_engine_table_in_toml_and_serve_flags(tmp_path: Path) -> None:
    from moetron.cli import build_parser, serve_engine_config

    run = tmp_path / "serve.toml"
    run.write_text(
        '[engine]\nmax_num_seqs = 8\nblock_size = 32\nbatch_invariant = false\nspeculative_method = "ngram"\n'
    )
    assert load_run_config(run).engine == EngineConfig(
        max_num_seqs=8, block_size=32, batch_invariant=False, speculative_method="ngram"
    )
    args = build_parser().parse_args(["serve", "some/model", "--config", str(run), "--max-num-seqs", "4"])
    engine = serve_engine_config(args, ["--engine.block_size=8", "--engine.max_num_seqs=2"])
    # the TOML's table, then --engine.key=value, then the named flags
    assert (engine.max_num_seqs, engine.block_size, engine.batch_invariant) == (4, 8, False)
    with pytest.raises(ConfigError, match=r"takes --engine\.key=value settings"):
        serve_engine_config(args, ["--train.steps=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'engine\.no_such'"):
        serve_engine_config(args, ["--engine.no_such=1"])
