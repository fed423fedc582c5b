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


def _on(monkeypatch: pytest.MonkeyPatch, machine: Hardware, bf16_speedup: float = 4.5) -> None:
    """Pretend to run on `machine`, whose bf16 matmul measures `bf16_speedup` x fp32's."""
    monkeypatch.setattr(hardware, "detect", lambda: machine)
    monkeypatch.setattr(hardware, "bf16_matmul_speedup", lambda device="cpu": bf16_speedup)


@pytest.mark.parametrize(
    "machine, speedup, device, expected",
    [
        (AVX2, 1.0, "cpu", torch.float32),
        (AVX512_BF16, 4.5, "cpu", torch.bfloat16),  # an AVX512-BF16 EPYC
        (AVX512_BF16, 0.45, "cpu", torch.float32),  # an AVX512-BF16 Xeon without AMX (measured)
        (AMX, 6.0, "cpu", torch.bfloat16),
        (Hardware(AVX2.cpu, (CudaDevice("A100", (8, 0), 2**36),)), 1.0, "cuda", torch.bfloat16),
        (Hardware(AMX.cpu, (CudaDevice("V100", (7, 0), 2**35),)), 1.0, "cuda", torch.float32),
    ],
    ids=["avx2", "avx512-bf16-fast", "avx512-bf16-slow", "amx", "a100", "v100"],
)
def test_auto_picks_bf16_only_where_it_is_native_and_fast(
    monkeypatch, machine, speedup, device, expected
) -> None:
    _on(monkeypatch, machine, speedup)
    chosen = precision.resolve("auto", device)
    assert chosen.dtype == expected and chosen.reason.startswith("auto: ")
    assert ("has native bf16" in chosen.reason) == (expected == torch.bfloat16)
    if machine is AVX512_BF16:  # the measurement decided, and the reason quotes it
        assert f"{speedup:.1f}x" in chosen.reason or f"{speedup:.2f}x" in chosen.reason


def test_ranks_that_disagree_all_take_fp32() -> None:
    bf16 = precision.Precision(torch.bfloat16, "auto: measured 1.3x")
    assert precision.agree(bf16, lambda v: v, 1) is bf16
    assert precision.agree(bf16, lambda v: [2.0], 2) is bf16  # both ranks chose bf16
    split = precision.agree(bf16, lambda v: [1.0], 2)
    assert split.dtype == torch.float32 and "1 of 2 ranks" in split.reason


def test_explicit_dtypes_win_and_slow_bf16_warns_once(monkeypatch) -> None:
    _on(monkeypatch, AMX)
    precision._warn_slow_bf16.cache_clear()
    assert precision.resolve("float32", "cpu").dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native and fast: no warning
        assert precision.resolve("bfloat16", "cpu").dtype == torch.bfloat16
    _on(monkeypatch, AVX2)
    with pytest.warns(
        UserWarning, match=r"without native bf16 matmul: a bf16 matmul under autocast took [0-9.]+x"
    ):
        assert precision.resolve("bfloat16", "cpu").dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        precision.resolve("bfloat16", "cpu")
    _on(monkeypatch, AVX512_BF16, 0.45)  # the instructions, but slower than fp32 here
    with pytest.warns(UserWarning, match=r"its bf16 matmul measured 0\.45x fp32's here"):
        assert precision.resolve("bfloat16", "cpu").dtype == torch.bfloat16
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
