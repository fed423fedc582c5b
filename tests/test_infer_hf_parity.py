"""Engine vs transformers: greedy generations equal `MixtralForCausalLM.generate(do_sample=False)`
token for token on the same weights (saved with `save_pretrained`, loaded by both), for odd shapes;
the chosen tokens' logprobs agree within 1e-4 (float32; the two sum in different orders).

The engine runs all prompts together with chunked prefill and prefix caching on, so batching,
chunking and the paged cache are all on the path being compared."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralForCausalLM

from moetron.config import ModelConfig, MoEConfig, RopeConfig
from moetron.convert.hf import save_pretrained
from moetron.infer.llm import LLM
from moetron.infer.sampling_params import SamplingParams
from moetron.model import Transformer

ATOL = 1e-4
MAX_TOKENS = 12
HF_EOS = 2  # MixtralConfig's default eos_token_id: HF stops there, so the engine must too
HF_KWARGS = {"dtype": torch.float32, "experts_implementation": "eager", "attn_implementation": "eager"}

CASES = {
    "gqa-headdim10-top3": ModelConfig(
        vocab_size=97, dim=36, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=10, max_seq_len=128,
        init_std=0.1, moe=MoEConfig(num_experts=5, top_k=3, expert_hidden_dim=17),
    ),
    "mqa-top1-tied-yarn": ModelConfig(
        vocab_size=131, dim=40, num_layers=3, num_heads=4, num_kv_heads=1, max_seq_len=256, tie_embeddings=True,
        init_std=0.1, rope=RopeConfig(scaling="yarn", factor=4.0, original_max_seq_len=64),
        moe=MoEConfig(num_experts=4, top_k=1, expert_hidden_dim=24),
    ),
}  # fmt: skip


def _save_random_model(cfg: ModelConfig, path) -> None:
    torch.manual_seed(0)
    model = Transformer.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    save_pretrained(model, path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generations_equal_transformers(case: str, tmp_path) -> None:
    cfg = CASES[case]
    _save_random_model(cfg, tmp_path)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in (1, 7, 23, 40, 9)]
    prompts.append(prompts[3][:24] + prompts[1])  # shares 3 blocks with prompts[3]: a prefix-cache hit

    llm = LLM(tmp_path, num_kv_blocks=64, block_size=8, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, stop_token_ids=[HF_EOS])
    ours = llm.generate(prompts, params)

    assert sum(len(o.outputs[0].token_ids) for o in ours) > 3 * MAX_TOKENS  # not all cut short by EOS
    assert ours[-1].num_cached_tokens == 24
    hf = MixtralForCausalLM.from_pretrained(tmp_path, **HF_KWARGS).eval()
    for prompt, out in zip(prompts, ours, strict=True):
        with torch.no_grad():
            result = hf.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=MAX_TOKENS,
                eos_token_id=HF_EOS,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
        expected = result.sequences[0, len(prompt) :].tolist()
        completion = out.outputs[0]
        assert completion.token_ids == expected
        for token, position, logits in zip(expected, completion.logprobs, result.logits, strict=True):
            hf_logprob = torch.log_softmax(logits[0].float(), dim=-1)[token].item()
            assert abs(position[token].logprob - hf_logprob) <= ATOL
