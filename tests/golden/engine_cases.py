"""Engine outputs on seeded models, recorded by the code before the model/engine seam redesign
(issue 13) and checked against it ever since (tests/test_golden_engine.py): greedy and seeded tokens,
logprobs and ranks, prompt logprobs and per-expert token counts, exactly.

    python -m tests.golden.engine_cases            # rewrite engine_expectations.json for this CPU
    ATEN_CPU_CAPABILITY=avx2 python -m tests.golden.engine_cases   # ...and for PyTorch's AVX2 path

Expectations are kept per PyTorch CPU capability (AVX2, AVX512): PyTorch's own vectorised ops
(log_softmax, RoPE's cos/sin, the router's softmax) round differently at different vector widths,
while moetron's kernels give the same bits on every AVX2 CPU. The cases use only moetron's kernels
and those ops (batch-invariant mode, and the plain mode at <= 64 rows per step), never MKL/oneDNN,
whose bits depend on the CPU vendor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moetron.config import EngineConfig, ModelConfig, MoEConfig
from moetron.infer.engine import LLMEngine
from moetron.infer.sampling_params import SamplingParams
from moetron.model import Transformer

EXPECTATIONS = Path(__file__).with_name("engine_expectations.json")

FUSED = ModelConfig(
    vocab_size=97, dim=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8, max_seq_len=160,
    moe=MoEConfig(num_experts=6, top_k=2, expert_hidden_dim=40),
)  # fmt: skip
# Shared experts and a dense first layer: the module path (the fused path does not cover them).
MODULE = ModelConfig(
    vocab_size=211, dim=40, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=10, max_seq_len=160,
    moe=MoEConfig(num_experts=5, top_k=3, expert_hidden_dim=17, num_shared_experts=1, num_dense_layers=1),
)  # fmt: skip


def _model(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer.from_config(cfg).eval()


def _prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in (5, 33, 17, 61, 9)]
    prompts.append(prompts[1][:24] + prompts[4])  # shares three 8-token blocks with prompt 1
    prompts.append((prompts[0] * 6)[:28])  # repetitive: n-gram speculation finds drafts
    return prompts


def _params() -> list[SamplingParams]:
    greedy = dict(temperature=0.0, max_tokens=10, ignore_eos=True)
    return [
        SamplingParams(**greedy, logprobs=2),
        SamplingParams(**greedy, logprobs=0, prompt_logprobs=2),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7, n=2, max_tokens=10, logprobs=1),
        SamplingParams(**greedy, logprobs=3),
        SamplingParams(**greedy, logprobs=1, repetition_penalty=1.3, frequency_penalty=0.2),
        SamplingParams(**greedy, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1),
    ]


def _positions(positions: list | None) -> list | None:
    if positions is None:
        return None
    return [None if p is None else {str(t): [lp.logprob, lp.rank] for t, lp in p.items()} for p in positions]


def run_case(model: Transformer, **engine_options: Any) -> dict[str, Any]:
    options = dict(num_kv_blocks=64, block_size=8, max_num_batched_tokens=40)
    options.update(engine_options)
    engine = LLMEngine(model, None, EngineConfig(**options))
    for layer in model.moe_layers():
        layer.tokens_per_expert.zero_()
    ids = [engine.add_request(p, s) for p, s in zip(_prompts(model.cfg.vocab_size), _params(), strict=True)]
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    requests = []
    for request_id in ids:
        out = finished[request_id]
        requests.append(
            {
                "prompt_logprobs": _positions(out.prompt_logprobs),
                "outputs": [
                    {
                        "token_ids": o.token_ids,
                        "logprobs": _positions(o.logprobs),
                        "cumulative_logprob": o.cumulative_logprob,
                        "finish_reason": o.finish_reason,
                    }
                    for o in out.outputs
                ],
            }
        )
    stats = engine.get_stats()
    return {
        "requests": requests,
        "tokens_per_expert": stats.tokens_per_expert,
        "num_preempted": stats.num_preempted_total,
    }


def collect() -> dict[str, Any]:
    fused, module = _model(FUSED, 0), _model(MODULE, 1)
    cases = {
        "fused": run_case(fused),
        "fused_plain": run_case(fused, batch_invariant=False),
        "fused_spec_ngram": run_case(fused, speculative_method="ngram", num_speculative_tokens=3),
        "fused_preempt": run_case(fused, num_kv_blocks=14),
        "module": run_case(module),
        "module_plain": run_case(module, batch_invariant=False),
        "module_no_prefix_cache": run_case(module, enable_prefix_caching=False, max_num_batched_tokens=64),
    }
    cases["fused_bf16_weights"] = run_case(_model(FUSED, 0).to(torch.bfloat16), dtype="float32")
    return cases


def capability() -> str:
    """PyTorch's CPU path, and the vendor where it is not Intel: the non-batch-invariant cases run
    MKL's matmuls, whose kernels (and so the last bits) differ between Intel and AMD CPUs of one ISA."""
    vendor = ""
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if vendor in ("", "GenuineIntel") else f"{cap}@{vendor}"


def main() -> None:
    torch.set_num_threads(2)
    recorded = json.loads(EXPECTATIONS.read_text()) if EXPECTATIONS.exists() else {}
    recorded[capability()] = collect()
    EXPECTATIONS.write_text(json.dumps(recorded, sort_keys=True) + "\n")
    print(f"wrote {EXPECTATIONS} for {capability()}")


if __name__ == "__main__":
    main()
