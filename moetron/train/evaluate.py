"""Loss and perplexity of a model on arbitrary documents (`moetron eval`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moetron.data import Tokenizer
from moetron.model.transformer import Transformer


@torch.no_grad()
def evaluate_documents(
    model: Transformer,
    tokenizer: Tokenizer,
    documents: list[str],
    seq_len: int,
    batch_size: int,
    max_tokens: int,
) -> tuple[float, int]:
    """Mean next-token cross-entropy over non-overlapping windows of the documents joined by EOS.
    Returns (nats per token, tokens scored)."""
    stream: list[int] = []
    for document in documents:
        stream.extend(tokenizer.encode(document, allow_special=False))
        stream.append(tokenizer.eos_id)
        if len(stream) > max_tokens:
            break
    tokens = torch.tensor(stream[: max_tokens + 1])
    num_windows = (len(tokens) - 1) // seq_len
    if num_windows == 0:
        raise ValueError(f"the data has {len(tokens)} tokens, fewer than one window of {seq_len}+1")
    windows = tokens[: num_windows * seq_len + 1]
    inputs = windows[:-1].view(num_windows, seq_len)
    targets = windows[1:].view(num_windows, seq_len)
    model.eval()
    total = 0.0
    for start in range(0, num_windows, batch_size):
        logits = model(inputs[start : start + batch_size])
        total += float(
            F.cross_entropy(
                logits.flatten(0, 1), targets[start : start + batch_size].flatten(), reduction="sum"
            )
        )
    return total / targets.numel(), targets.numel()
