"""Hardware detection in one place (moetron/hardware.py): it agrees with PyTorch's own probes, its
decisions follow the flags, and every consumer asks it."""

from __future__ import annotations

import pytest
import torch

from moetron import hardware
from moetron.hardware import CpuInfo, CudaDevice, Hardware


def test_detection_agrees_with_pytorch_probes() -> None:
    cpu = hardware.detect().cpu
    probes = torch.cpu
    assert cpu.has("avx2") == bool(probes._is_avx2_supported())
    assert cpu.has("avx512f") == bool(probes._is_avx512_supported())
    assert cpu.has("avx512_bf16") == bool(probes._is_avx512_bf16_supported())
    assert cpu.has("amx_tile") == bool(probes._is_amx_tile_supported())
    assert cpu.num_cores >= 1 and cpu.model_name
    assert hardware.detect() is hardware.detect()  # detected once per process
    described = hardware.detect().describe()
    assert cpu.model_name in described and all(
        f in described.split() or f + ")" in described for f in cpu.flags
    )


@pytest.mark.parametrize(
    "flags, isa, native_bf16, kernels",
    [
        (set(), "baseline", False, False),
        ({"avx2"}, "baseline", False, False),  # no FMA: moetron's kernels need both
        ({"avx2", "fma"}, "avx2", False, True),
        ({"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}, "avx512", False, True),
        ({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}, "avx512_bf16", True, True),
        ({"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}, "amx", True, True),
    ],
)
def test_decisions_follow_the_flags(flags: set[str], isa: str, native_bf16: bool, kernels: bool) -> None:
    machine = Hardware(CpuInfo("test cpu", 2, frozenset(flags)))
    assert machine.cpu.isa == isa
    assert machine.native_bf16_matmul("cpu") is native_bf16
    assert machine.cpu.avx2_fma is kernels


def test_cuda_bf16_needs_ampere() -> None:
    cpu = CpuInfo("test cpu", 2, frozenset({"avx2", "fma"}))
    assert Hardware(cpu, (CudaDevice("A100", (8, 0), 80 * 2**30),)).native_bf16_matmul("cuda")
    assert not Hardware(cpu, (CudaDevice("V100", (7, 0), 32 * 2**30),)).native_bf16_matmul("cuda")
    assert not Hardware(cpu).native_bf16_matmul("cuda")  # no device at all
    assert "sm80" in Hardware(cpu, (CudaDevice("A100", (8, 0), 80 * 2**30),)).describe()


def test_half_peak_is_fp32_peak_where_half_is_emulated() -> None:
    fp32 = hardware.matmul_peak_flops(torch.float32, size=256, repeats=2)
    bf16 = hardware.matmul_peak_flops(torch.bfloat16, size=256, repeats=2)
    assert fp32 > 0 and bf16 > 0
    if not hardware.native_bf16_matmul("cpu"):
        assert bf16 == fp32  # the same cached measurement: moetron computes bf16 in fp32 there


def test_consumers_ask_the_one_detector(monkeypatch: pytest.MonkeyPatch) -> None:
    """model/ops (half matmuls), the engine (bf16 checkpoints) and the kernels' build all follow it."""
    from moetron.infer.engine import plain_cpu_half
    from moetron.model import Transformer
    from moetron.model.ops import emulated_half_dtype

    model = Transformer.from_config(
        __import__("moetron").get_preset("tiny"), dtype=torch.bfloat16
    )  # a bf16 checkpoint on the CPU
    for native in (True, False):
        machine = Hardware(
            CpuInfo("test", 2, frozenset({"avx2", "fma"} | ({"avx512_bf16"} if native else set())))
        )
        monkeypatch.setattr(hardware, "detect", lambda machine=machine: machine)
        assert (emulated_half_dtype(torch.zeros(1, dtype=torch.bfloat16)) is None) is native
        assert plain_cpu_half(model) is (not native)


@pytest.mark.parametrize("user_setting", [None, "77"], ids=["default", "user_set"])
def test_onednn_keeps_more_matmul_kernels_unless_the_user_chose(user_setting: str | None) -> None:
    """Importing moetron raises oneDNN's kernel cache (read when its first kernel compiles) to
    4,096 shapes, and leaves a user's own setting alone."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if user_setting is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = user_setting
    code = "import os, moetron.hardware; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (user_setting or "4096")
