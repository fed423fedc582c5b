"""A 32,768-token prompt through a YaRN-scaled model (trained context 8,192, factor 4): chunked
prefill through the paged cache gives the same last-position logits as one plain full forward, and
the cache holds exactly the blocks the prompt needs. Tiny widths so it runs in seconds.

Tolerance: max |Δlogit| ≤ 1e-4 (float32; the engine sums attention in other orders than SDPA)."""

from __future__ import annotations

import torch

from moetron.config import EngineConfig, ModelConfig, MoEConfig, RopeConfig
from moetron.infer.engine import LLMEngine
from moetron.infer.sampling_params import SamplingParams
from moetron.model import Transformer

LENGTH = 32_768
CFG = ModelConfig(
    vocab_size=64, dim=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, max_seq_len=LENGTH + 16,
    rope=RopeConfig(theta=10_000.0, scaling="yarn", factor=4.0, original_max_seq_len=8192),
    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=16),
)  # fmt: skip


class RecordingSampler:
    """Wraps the engine's sampler to keep the logits it is given."""

    def __init__(self, sampler) -> None:
        self.sampler, self.logits = sampler, []

    def __call__(self, logits_SV, states):
        self.logits.append(logits_SV.clone())
        return self.sampler(logits_SV, states)


def test_32k_prompt_matches_full_forward() -> None:
    torch.manual_seed(0)
    model = Transformer.from_config(CFG).eval()
    prompt = torch.randint(0, CFG.vocab_size, (LENGTH,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_V = model(prompt[None])[0, -1]

    block_size, chunk = 16, 4096
    engine = LLMEngine(
        model,
        None,
        EngineConfig(
            block_size=block_size,
            kv_cache_memory_bytes=64 * 2**20,  # room for ~4 such prompts: usage must track the prompt
            max_num_batched_tokens=chunk,
        ),
    )
    assert engine.block_manager.num_blocks > 2 * LENGTH // block_size
    processor = engine.output_processor
    processor.sampler = recorder = RecordingSampler(processor.sampler)
    engine.add_request(prompt.tolist(), SamplingParams(temperature=0.0, max_tokens=2))
    for step in range(1, LENGTH // chunk + 1):
        engine.step()  # one chunk of the prefill per step
        assert engine.get_stats().kv_blocks_used == step * chunk // block_size
    assert len(recorder.logits) == 1  # the last chunk sampled the first token
    got_V = recorder.logits[0][0]
    assert (got_V - expected_V).abs().max().item() <= 1e-4
    assert int(got_V.argmax()) == int(expected_V.argmax())
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.get_stats().kv_blocks_used == 0
