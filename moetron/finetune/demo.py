"""The fine-tuning demonstration: teach the main job's model a task with LoRA in a few CPU minutes.

    python -m moetron.finetune.demo                      # base runs/demo/final, configs/sft_demo.toml

The task, generated from the bundled plays (no downloads): a chat whose user turn is "Who speaks in
this passage?" followed by a speech as the corpus prints it ("ROMEO.\\nBut soft, what light ...")
and whose answer is the speaker's name ("ROMEO"). The base model has only read the plays, never a
chat, so it answers with more verse; the adapter has to learn the turn format and to pick the name
out. Held-out passages come from documents the training set never saw. Accuracy is exact match of
the greedy answer (up to its end-of-turn marker), served by the engine with the adapter merged.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from moetron.config import load_run_config

QUESTION = "Who speaks in this passage?"
_SPEECH = re.compile(r"^([A-Z][A-Z .'-]{1,30})\.\n((?:.+\n?){1,3})", re.M)


def speeches(documents: list[str]) -> list[list[tuple[str, str]]]:
    """Per document: (speaker, first lines of the speech) for every speech that opens with a name."""
    found = []
    for document in documents:
        found.append([(m[1].strip(), m[2].strip()) for m in _SPEECH.finditer(document)])
    return found


def make_task(train_path: str | Path, num_train: int = 800, num_eval: int = 100, seed: int = 0) -> Path:
    """Write the training chats to `train_path` and the held-out ones beside it (heldout.jsonl),
    from disjoint documents of the bundled corpus; returns the held-out file."""
    from moetron.data.shakespeare import documents

    by_document = [s for s in speeches(documents()) if s]
    rng = random.Random(seed)
    rng.shuffle(by_document)
    cut = len(by_document) // 5
    train_path = Path(train_path)
    train_path.parent.mkdir(parents=True, exist_ok=True)
    heldout_path = train_path.with_name("heldout.jsonl")
    for path, docs, count in (
        (train_path, by_document[cut:], num_train),
        (heldout_path, by_document[:cut], num_eval),
    ):
        pool = [s for doc in docs for s in doc]
        picked = rng.sample(pool, min(count, len(pool)))
        rows = [
            {"messages": [
                {"role": "user", "content": f"{QUESTION}\n\n{speaker}.\n{lines}"},
                {"role": "assistant", "content": speaker},
            ]}
            for speaker, lines in picked
        ]  # fmt: skip
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return heldout_path


def accuracy(model_dir: str | Path, heldout: str | Path) -> float:
    """Exact-match accuracy of the greedy answers of the model in `model_dir` on `heldout`."""
    from moetron.infer.llm import LLM
    from moetron.infer.sampling_params import SamplingParams

    llm = LLM(model_dir)
    rows = [json.loads(line) for line in Path(heldout).read_text().splitlines() if line.strip()]
    prompts = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(r["messages"][:1])) for r in rows]
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[llm.tokenizer.end_of_turn_id])
    outputs = llm.generate(prompts, params)
    right = sum(
        o.outputs[0].text.strip() == r["messages"][1]["content"] for o, r in zip(outputs, rows, strict=True)
    )
    return right / len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/sft_demo.toml")
    args, overrides = p.parse_known_args()  # --finetune.key=value settings
    from moetron.finetune.trainer import finetune

    cfg = load_run_config(args.config, overrides).finetune
    heldout = make_task(cfg.data)
    before = accuracy(cfg.base, heldout)
    print(f"[demo] held-out accuracy of the base model: {before:.1%}")
    result = finetune(cfg)
    after = accuracy(Path(cfg.out_dir) / "merged", heldout)
    print(
        f"[demo] held-out accuracy after LoRA ({result.step} steps, held-out loss {result.eval_loss:.3f}): "
        f"{after:.1%} (before {before:.1%}); adapter in {result.output_dir}"
    )


if __name__ == "__main__":
    main()
