"""What quantization costs in accuracy, on a trained model (issue 15): held-out perplexity per
format against float32, and moetron's logits against llama.cpp's on the same GGUF file.

    python -m benchmarks.quant_accuracy runs/demo/final          # the main job's model (~3 min)
    python -m benchmarks.quant_accuracy DIR --max-tokens 20000 --skip-llama-cpp

(a) Perplexity: the validation documents the trainer held out (the run's config.json: its data
    sources, val_fraction and seed), scored in windows of --seq-len tokens, with the float model
    and with its matmul weights quantized as `moetron serve --quantization` does.
(c) The KV cache in bf16 (engine.kv_cache_dtype): the engine scores the held-out windows (prompt
    logprobs, so every key is read back from the cache) with an fp32 and a bf16 cache.
(b) Agreement with llama.cpp (llama-cpp-python, fp32 KV cache): moetron's writer makes one GGUF
    per format; both systems score the same held-out windows teacher-forced; printed: the share of
    positions with the same top-1 token and the mean KL(llama.cpp || moetron) in nats.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine_line, print_table, setup_threads
from moetron.config import EngineConfig

FORMATS = ("q8_0", "q4_0", "q4_k")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "model", help="a model directory trained by `moetron train` (config.json beside it or above)"
    )
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=60_000)
    p.add_argument("--llama-windows", type=int, default=8, help="(b): windows scored by both systems")
    p.add_argument("--cache-windows", type=int, default=24, help="(c): windows scored through the engine")
    p.add_argument("--skip-llama-cpp", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def held_out_documents(model_dir: Path) -> list[str]:
    """The validation documents of the run that trained `model_dir` (its config.json one level up)."""
    from moetron.data import sources
    from moetron.data.prepare import split_documents

    run = json.loads((model_dir.parent / "config.json").read_text())
    data, seed = run["data"], run["train"].get("seed", 0)
    documents = sources.read_documents(data["sources"], data.get("text_field", "text"))
    return split_documents(documents, data["val_fraction"], seed)[1]


def main() -> None:
    args = parse_args()
    threads = setup_threads(args.threads)
    from moetron.convert.hf import from_pretrained
    from moetron.data import load_tokenizer
    from moetron.quant.quantize import quantize_model
    from moetron.train.evaluate import evaluate_documents

    print(machine_line())
    model_dir = Path(args.model)
    model, tokenizer = from_pretrained(model_dir, dtype=torch.float32).eval(), load_tokenizer(model_dir)
    documents = held_out_documents(model_dir)
    text_bytes = sum(len(d.encode()) + 1 for d in documents)
    text_tokens = sum(len(tokenizer.encode(d, allow_special=False)) + 1 for d in documents)
    bytes_per_token = text_bytes / text_tokens
    rows = []
    losses = {}
    for fmt in ("f32", *FORMATS):
        served = model if fmt == "f32" else copy.deepcopy(model)
        if fmt != "f32":
            quantize_model(served, fmt)
        loss, scored = evaluate_documents(served, tokenizer, documents, args.seq_len, 8, args.max_tokens)
        losses[fmt] = loss
        delta = "" if fmt == "f32" else f"{math.exp(loss - losses['f32']) - 1:+.2%}"
        rows.append(
            [
                fmt,
                f"{loss:.4f}",
                f"{math.exp(loss):.2f}",
                delta,
                f"{loss / math.log(2) / bytes_per_token:.3f}",
            ]
        )
    print(f"\n(a) held-out perplexity: {len(documents)} validation documents, {scored:,} tokens scored "
          f"in windows of {args.seq_len}, {threads} threads")  # fmt: skip
    print_table(["weights", "nats/token", "perplexity", "vs float32", "bits/byte"], rows)
    print(
        f"\n(c) KV cache dtype: the engine's prompt logprobs over {args.cache_windows} windows of {args.seq_len}"
    )
    print_table(
        ["kv cache", "nats/token", "perplexity", "vs float32"], cache_rows(model, tokenizer, documents, args)
    )
    if args.skip_llama_cpp or importlib.util.find_spec("llama_cpp") is None:
        return
    biased = any(bool(m.router.expert_bias.any()) for m in model.moe_layers())
    if biased:  # a llama-architecture file has no selection bias: compare on the model without it
        model = copy.deepcopy(model)
        for layer in model.moe_layers():
            layer.router.expert_bias.zero_()
    print(
        "\n(b) moetron vs llama.cpp, teacher-forced on the same GGUF (fp32 KV cache)"
        + (": the routers' selection bias zeroed (GGUF's llama graph cannot carry it)" if biased else "")
    )
    print_table(["format", "positions", "same top-1", "mean KL (nats)", "max |Δlogit|"],
                llama_agreement(model, tokenizer, documents, args))  # fmt: skip


def cache_rows(model, tokenizer, documents: list[str], args: argparse.Namespace) -> list[list[object]]:
    from moetron.infer.engine import LLMEngine
    from moetron.infer.sampling_params import SamplingParams

    stream = [t for d in documents for t in (*tokenizer.encode(d, allow_special=False), tokenizer.eos_id)]
    windows = [stream[i * args.seq_len : (i + 1) * args.seq_len] for i in range(args.cache_windows)]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    rows, losses = [], {}
    for kv in ("float32", "bfloat16"):
        engine = LLMEngine(
            copy.deepcopy(model), tokenizer, EngineConfig(kv_cache_dtype=kv, num_kv_blocks=4 * args.seq_len)
        )
        total = count = 0.0
        for window in windows:
            request = engine.add_request(window, params)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id == request and out.finished:
                        for token, position in zip(window[1:], out.prompt_logprobs[1:], strict=True):
                            total -= position[token].logprob
                            count += 1
        losses[kv] = total / count
        delta = "" if kv == "float32" else f"{math.exp(losses[kv] - losses['float32']) - 1:+.3%}"
        rows.append([kv, f"{losses[kv]:.5f}", f"{math.exp(losses[kv]):.3f}", delta])
    return rows


def llama_agreement(model, tokenizer, documents: list[str], args: argparse.Namespace) -> list[list[object]]:
    import llama_cpp
    import numpy as np

    from moetron.convert.gguf_file import load_gguf, write_gguf

    stream = [t for d in documents for t in (*tokenizer.encode(d, allow_special=False), tokenizer.eos_id)]
    windows = [stream[i * args.seq_len : (i + 1) * args.seq_len] for i in range(args.llama_windows)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("f32", *FORMATS):
            path = write_gguf(model, tokenizer, Path(tmp) / f"{fmt}.gguf", fmt)
            ours_model, _ = load_gguf(path)
            f32 = llama_cpp.GGML_TYPE_F32
            llm = llama_cpp.Llama(str(path), n_ctx=args.seq_len + 8, logits_all=True, verbose=False,
                                  type_k=f32, type_v=f32)  # fmt: skip
            same = total = 0
            kl_sum, max_diff = 0.0, 0.0
            for window in windows:
                llm.reset()
                llm.eval(window)
                theirs = torch.tensor(np.array(llm.scores[: len(window)]))
                with torch.no_grad():
                    ours = ours_model(torch.tensor([window]))[0]
                same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
                total += len(window)
                kl = F.kl_div(ours.log_softmax(-1), theirs.log_softmax(-1), log_target=True, reduction="sum")
                kl_sum += float(kl)
                max_diff = max(max_diff, float((ours - theirs).abs().max()))
            rows.append([fmt, total, f"{same / total:.2%}", f"{kl_sum / total:.2e}", f"{max_diff:.2e}"])
    return rows


if __name__ == "__main__":
    main()
