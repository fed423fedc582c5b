"""engine.kv_cache_dtype = "bfloat16" under float32 activations: half the cache bytes, so twice the
blocks in the same memory; each K/V value rounded once as torch rounds it; a request's tokens and
logprobs still bit-identical alone or batched (float and quantized weights, fused layers and module
path), and the fused and module paths agree on the tokens."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from moetron.config import ConfigError, EngineConfig, ModelConfig, MoEConfig
from moetron.infer.engine import LLMEngine
from moetron.infer.sampling_params import SamplingParams
from moetron.kernels import cpu_kernels
from moetron.model import Transformer

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason="bf16 caches are read by moetron's CPU kernels (AVX2, a compiler)"
)
CFG = ModelConfig(
    vocab_size=211, dim=256, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=32, max_seq_len=256,
    moe=MoEConfig(num_experts=5, top_k=2, expert_hidden_dim=96),
)  # fmt: skip
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer.from_config(CFG).eval()


def prompts() -> tuple[list[int], list[list[int]]]:
    gen = torch.Generator().manual_seed(2)
    target = torch.randint(0, CFG.vocab_size, (50,), generator=gen).tolist()
    others = [torch.randint(0, CFG.vocab_size, (n,), generator=gen).tolist() for n in (7, 33, 61, 90)]
    return target, others


def run(model, batch, **overrides):
    options = dict(num_kv_blocks=120, block_size=8, max_num_batched_tokens=64, kv_cache_dtype="bfloat16")
    engine = LLMEngine(model, None, EngineConfig(**(options | overrides)))
    ids = [engine.add_request(p, GREEDY) for p in batch]
    done = {}
    while engine.has_unfinished_requests():
        done |= {o.request_id: o.outputs[0] for o in engine.step() if o.finished}
    return engine, [
        (done[i].token_ids, [{t: p.logprob for t, p in pos.items()} for pos in done[i].logprobs]) for i in ids
    ]


@pytest.mark.parametrize("weights", ["float32", "q8_0"])
@pytest.mark.parametrize("fused", [True, False])
def test_bf16_cache_keeps_requests_batch_invariant(model, weights, fused) -> None:
    served = copy.deepcopy(model)
    quantization = None if weights == "float32" else weights
    target, others = prompts()
    options = dict(fused_layers=fused, quantization=quantization)
    engine, [solo] = run(served, [target], max_num_batched_tokens=256, **options)
    assert engine.runner.k_caches[0].dtype == torch.bfloat16 and engine.runner.fused == fused
    rng = random.Random(0)
    for budget in (16, 37):
        batch = [target, *others]
        rng.shuffle(batch)
        assert run(served, batch, max_num_batched_tokens=budget, **options)[1][batch.index(target)] == solo


def test_values_are_rounded_once_as_torch_rounds_them(model) -> None:
    """Layer 0's keys and values come from the same numbers under either cache: the bf16 cache must
    hold exactly torch's bf16 rounding of the fp32 cache (the fused kernel rounds them itself)."""
    target, _ = prompts()
    wide, _ = run(copy.deepcopy(model), [target], kv_cache_dtype="float32")
    narrow, _ = run(copy.deepcopy(model), [target])
    for cache_wide, cache_narrow in ((wide.runner.k_caches[0], narrow.runner.k_caches[0]),
                                     (wide.runner.v_caches[0], narrow.runner.v_caches[0])):  # fmt: skip
        assert torch.equal(cache_wide.to(torch.bfloat16), cache_narrow)


def test_fused_and_module_paths_agree_and_the_pool_doubles(model) -> None:
    target, _ = prompts()
    _, [fused] = run(copy.deepcopy(model), [target])
    _, [module] = run(copy.deepcopy(model), [target], fused_layers=False)
    assert fused[0] == module[0]
    for ours, theirs in zip(fused[1], module[1], strict=True):
        assert all(abs(ours[t] - theirs[t]) < 1e-4 for t in ours)
    budget = dict(num_kv_blocks=None, kv_cache_memory_bytes=2**22)
    wide = LLMEngine(copy.deepcopy(model), None, EngineConfig(kv_cache_dtype="float32", **budget))
    narrow = LLMEngine(copy.deepcopy(model), None, EngineConfig(kv_cache_dtype="bfloat16", **budget))
    assert narrow.block_manager.num_blocks == 2 * wide.block_manager.num_blocks
    assert narrow.kv_cache_bytes() == wide.kv_cache_bytes()


def test_bad_cache_dtype_is_refused() -> None:
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int4")
