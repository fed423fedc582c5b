"""`train.dtype`: "auto" (the default) picks bf16 autocast where bf16 matmuls are native, fp32
elsewhere; explicit dtypes win; bf16 on hardware without it warns once with a measured slowdown;
the run's first log line and metrics.jsonl say which dtype and why."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from moetron import hardware
from moetron.config import ConfigError, TrainConfig, load_run_config
from moetron.hardware import CpuInfo, CudaDevice, Hardware
from moetron.train import precision
from moetron.train.trainer import train

AVX2 = Hardware(CpuInfo("an AVX2 CPU", 2, frozenset({"avx2", "fma"})))
AVX512_BF16 = Hardware(CpuInfo("an AVX512-BF16 CPU", 2, frozenset({"avx2", "fma", "avx512f", "avx512_bf16"})))
AMX = Hardware(
    CpuInfo("an AMX CPU", 2, frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}))
)


def _on(monkeypatch: pytest.MonkeyPatch, machine: Hardware) -> None:
    monkeypatch.setattr(hardware, "detect", lambda: machine)


@pytest.mark.parametrize(
    "machine, device, expected",
    [
        (AVX2, "cpu", torch.float32),
        (AVX512_BF16, "cpu", torch.bfloat16),
        (AMX, "cpu", torch.bfloat16),
        (Hardware(AVX2.cpu, (CudaDevice("A100", (8, 0), 2**36),)), "cuda", torch.bfloat16),
        (Hardware(AMX.cpu, (CudaDevice("V100", (7, 0), 2**35),)), "cuda", torch.float32),
    ],
    ids=["avx2", "avx512-bf16", "amx", "a100", "v100"],
)
def test_auto_picks_bf16_only_where_it_is_native(monkeypatch, machine, device, expected) -> None:
    _on(monkeypatch, machine)
    chosen = precision.resolve("auto", device)
    assert chosen.dtype == expected and chosen.reason.startswith("auto: ")
    assert ("has native bf16" in chosen.reason) == (expected == torch.bfloat16)


def test_explicit_dtypes_win_and_bf16_without_hardware_warns_once(monkeypatch) -> None:
    _on(monkeypatch, AMX)
    assert precision.resolve("float32", "cpu").dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native: no warning
        assert precision.resolve("bfloat16", "cpu").dtype == torch.bfloat16
    _on(monkeypatch, AVX2)
    precision._warn_slow_bf16.cache_clear()
    with pytest.warns(
        UserWarning, match=r"without native bf16 matmul: a bf16 matmul under autocast took [0-9.]+x"
    ):
        assert precision.resolve("bfloat16", "cpu").dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        precision.resolve("bfloat16", "cpu")
    precision._warn_slow_bf16.cache_clear()


def test_dtype_is_auto_by_default_and_validated() -> None:
    assert TrainConfig().dtype == "auto"
    with pytest.raises(
        ConfigError, match=r"train\.dtype='float16' must be one of 'auto', 'float32', 'bfloat16'"
    ):
        TrainConfig(dtype="float16")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")  # tokenized once for both runs


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_training_reports_its_dtype_and_learns(tmp_path: Path, data_dir: Path, capsys, dtype: str) -> None:
    """Both dtypes train (bf16 autocast included on CPUs without bf16: correct, just not faster)."""
    cfg = load_run_config(
        "configs/tiny.toml",
        [f"--data.dir={data_dir}", f"--train.out_dir={tmp_path / 'run'}", "--train.progress=false",
         "--train.steps=6", "--train.eval_every=6", "--train.checkpoint_every=6", f"--train.dtype={dtype}"],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bf16-without-hardware warning, checked above
        result = train(cfg)
    expected = precision.resolve(dtype, "cpu")
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith(f"[train] computing in {expected.name} ({expected.reason})")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["dtype"] == expected.name and records[0]["dtype_reason"] == expected.reason
    assert records[0]["peak_flops"] == pytest.approx(hardware.matmul_peak_flops(expected.dtype))
    assert all(r["mfu"] > 0 for r in records)
    assert result.val_loss is not None and records[-1]["lm_loss"] < records[0]["lm_loss"]
