"""A simple sampling loop (full recompute per token): `moetron generate` until the serving engine.

Legend: T tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from moetron.model.transformer import Transformer


def check_sampling(temperature: float, top_p: float, top_k: int, max_tokens: int) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must lie in (0, 1]")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 disables)")
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")


def sample_next(
    logits_V: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator
) -> int:
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits_V, min(top_k, logits_V.numel())).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = logits_V.softmax(-1)
    if top_p < 1:
        sorted_probs, order = probs_V.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs_V = probs_V.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs_V, 1, generator=generator))


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
) -> Iterator[int]:
    """Yields sampled token ids one by one; stops at a stop id (not yielded) or max_tokens."""
    check_sampling(temperature, top_p, top_k, max_tokens)
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    limit = model.cfg.max_seq_len
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {limit} tokens")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        context = torch.tensor([ids[-limit:]], device=device)
        next_id = sample_next(model(context)[0, -1].cpu(), temperature, top_p, top_k, generator)
        if next_id in stop_ids:
            return
        ids.append(next_id)
        yield next_id
