"""The bundled `moetron_next_line` tasks' data: which line of Shakespeare comes next.

Each document is a few consecutive lines of one speech or stanza (`context`), the line that
follows them and three other lines, in a seeded random order (`choices`, `label` the true one's
index). Every line comes from the validation documents of moetron's default data split (bundled
Shakespeare, `data.val_fraction=0.02`, `train.seed=0`), so a model trained by `moetron train` with the
default data settings has seen none of them. Regenerate the shipped file (byte-identical) with

    python -m moetron.eval.next_line
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from moetron.data.prepare import split_documents
from moetron.data.shakespeare import documents
from moetron.eval import TASKS_DIR

DATA_FILE = TASKS_DIR / "next_line.jsonl"
NUM_DOCS = 200
NUM_CHOICES = 4
CONTEXT_LINES = 3
# Choices shorter than this are mostly "My lord?" and "Anon, sir.": too alike to tell apart.
MIN_CHOICE_CHARS = 20
SEED = 0
# The default data split (data.val_fraction, train.seed): its held-out documents.
VAL_FRACTION, SPLIT_SEED = 0.02, 0


def _is_verse(line: str) -> bool:
    """A line worth choosing: long enough, and not a stage direction ("[Exit.]")."""
    return len(line) >= MIN_CHOICE_CHARS and not line.startswith("[")


def build_docs(num_docs: int = NUM_DOCS, seed: int = SEED) -> list[dict]:
    """The task's documents: {"context", "choices", "label"}, deterministic for a seed."""
    _, held_out = split_documents(documents(), VAL_FRACTION, SPLIT_SEED)
    paragraphs = [
        [line.strip() for line in paragraph.split("\n")]
        for document in held_out
        for paragraph in document.split("\n\n")
    ]
    candidates = [
        (lines[i - CONTEXT_LINES : i], lines[i])
        for lines in paragraphs
        for i in range(CONTEXT_LINES, len(lines))
        if _is_verse(lines[i])
    ]
    pool = sorted({line for lines in paragraphs for line in lines if _is_verse(line)})
    rng = random.Random(seed)
    docs = []
    for context, answer in rng.sample(candidates, num_docs):
        choices = [answer, *rng.sample([line for line in pool if line != answer], NUM_CHOICES - 1)]
        rng.shuffle(choices)
        docs.append({"context": "\n".join(context), "choices": choices, "label": choices.index(answer)})
    return docs


def write_jsonl(docs: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs))


if __name__ == "__main__":
    write_jsonl(build_docs(), DATA_FILE)
    print(f"wrote {NUM_DOCS} documents to {DATA_FILE}", file=sys.stderr)
