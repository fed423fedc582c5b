"""[parallel] settings: each bad combination fails at load time with a message naming the fields;
ParallelDims resolves dp_shard=-1 and checks the degrees against the world size."""

from __future__ import annotations

import pytest

from moetron.config import Config, ConfigError, ParallelConfig, load_run_config
from moetron.parallel.mesh import ParallelDims


def _load(*overrides: str) -> Config:
    return load_run_config("configs/tiny.toml", list(overrides))


def test_defaults_are_one_process_friendly() -> None:
    cfg = _load()
    assert (cfg.parallel.dp_replicate, cfg.parallel.dp_shard, cfg.parallel.tp) == (1, -1, 1)
    assert (cfg.parallel.ep, cfg.parallel.pp, cfg.parallel.pp_microbatches) == (1, 1, 1)
    assert cfg.to_dict()["parallel"]["pp_schedule"] == "1f1b"
    assert ParallelDims.from_config(cfg.parallel, world_size=1).dp_shard == 1


def test_overrides_and_round_trip() -> None:
    cfg = _load("--parallel.tp=2", "--parallel.pp=2", "--parallel.pp_schedule=gpipe", "--train.batch_size=4")
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.pp_microbatches) == (2, 2, 2)
    assert Config.from_dict(cfg.to_dict()).parallel == cfg.parallel


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--parallel.tp=0"], r"parallel.tp=0 must be > 0"),
        (["--parallel.dp_shard=0"], r"parallel.dp_shard=0 must be > 0, or -1"),
        (["--parallel.dp_replicate=-1"], r"parallel.dp_replicate=-1 must be > 0"),
        (["--parallel.tp=3"], r"model.num_heads=4 must be divisible by parallel.tp=3"),
        (["--model.num_heads=8", "--parallel.tp=4"], r"model.num_kv_heads=2 must be divisible by parallel.tp=4"),
        (["--parallel.ep=3", "--parallel.dp_shard=3"], r"model.moe.num_experts=4 must be divisible by parallel.ep=3"),
        (["--parallel.ep=2", "--parallel.dp_shard=3"], r"parallel.ep=2 must divide parallel.dp_shard=3"),
        (["--parallel.ep=2", "--parallel.tp=2"], r"combining expert and tensor parallelism is not supported"),
        (["--parallel.pp=3"], r"model.num_layers=2 must be divisible into .* = 3 pipeline stages"),
        (["--parallel.pp=2", "--train.batch_size=3"], r"train.batch_size=3 must be divisible by parallel.pp_microbatches=2"),
        (["--parallel.pp_schedule=zigzag"], r"parallel.pp_schedule='zigzag' must be one of"),
        (["--parallel.pp_schedule=interleaved_1f1b"], r"pp_stages_per_rank=1 must be >= 2 with pp_schedule='interleaved_1f1b'"),
        (["--parallel.pp_stages_per_rank=2"], r"pp_stages_per_rank=2 must be 1 with pp_schedule='1f1b'"),
        (["--parallel.pp_microbatches=0"], r"parallel.pp_microbatches=0 must be > 0"),
        (["--parallel.cp=2"], r"unknown config key 'parallel.cp'"),
    ],
)  # fmt: skip
def test_bad_settings_fail_with_a_clear_message(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(*overrides)


def test_dims_resolve_dp_shard_and_name_the_mismatch() -> None:
    dims = ParallelDims(dp_replicate=2, dp_shard=-1, tp=2, ep=1, pp=1, world_size=8)
    assert (dims.dp_shard, dims.dp_degree, dims.fsdp_enabled) == (2, 4, True)
    ep = ParallelDims(dp_replicate=1, dp_shard=4, tp=1, ep=2, pp=1, world_size=4)
    assert (ep.dp_shard_mod_ep, ep.dp_degree) == (2, 4)
    with pytest.raises(ConfigError, match=r"2 \* 1 \* 2 \* 1 = 4 must equal the world size 2"):
        ParallelDims(dp_replicate=1, dp_shard=2, tp=1, ep=1, pp=2, world_size=2)
    with pytest.raises(
        ConfigError, match=r"world size 6 is not divisible by parallel.pp \* dp_replicate \* tp"
    ):
        ParallelDims(dp_replicate=1, dp_shard=-1, tp=4, ep=1, pp=1, world_size=6)
    with pytest.raises(ConfigError, match=r"parallel.ep=4 must divide parallel.dp_shard=2"):
        ParallelDims(dp_replicate=2, dp_shard=-1, tp=1, ep=4, pp=1, world_size=4)


def test_direct_construction_is_as_strict_as_toml() -> None:
    with pytest.raises(ConfigError, match=r"parallel.tp='2' must be an integer"):
        ParallelConfig(tp="2")
