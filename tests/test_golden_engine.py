"""The engine's outputs are bit-identical to those the code gave before the model/engine seam was
redesigned (issue 13): tokens, logprobs, ranks, prompt logprobs and per-expert counts on seeded
models, through the fused path, the module path, both batch modes, speculative decoding,
preemption, prefix caching and bf16 weights (tests/golden/engine_cases.py recorded them)."""

from __future__ import annotations

import json

import pytest
import torch
from golden import engine_cases

from moetron.kernels import cpu_kernels

RECORDED = json.loads(engine_cases.EXPECTATIONS.read_text())

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available() or engine_cases.capability() not in RECORDED,
    reason="expectations are recorded for moetron's CPU kernels on PyTorch's AVX2/AVX512 paths",
)


@pytest.fixture(scope="module")
def cases() -> dict:
    torch.set_num_threads(2)
    return engine_cases.collect()


@pytest.mark.parametrize("case", sorted(RECORDED.get("AVX2", {})))
def test_engine_outputs_match_the_recorded_ones(cases: dict, case: str) -> None:
    expected = RECORDED[engine_cases.capability()][case]
    got = json.loads(json.dumps(cases[case], sort_keys=True))  # the recorded file's number format
    assert got["tokens_per_expert"] == expected["tokens_per_expert"]
    assert got["num_preempted"] == expected["num_preempted"]
    for i, (request, recorded) in enumerate(zip(got["requests"], expected["requests"], strict=True)):
        assert request == recorded, f"request {i} of case {case} differs"
