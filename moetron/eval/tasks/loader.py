"""lm-eval's loader for the bundled tasks (their `custom_dataset: !function loader.next_line`).

lm-eval imports this file by path, so the data is found beside it from any working directory;
`datasets.load_dataset("json", ...)` would resolve a relative path against the caller's instead.
"""

import json
from pathlib import Path

import datasets


def next_line(**metadata: object) -> datasets.DatasetDict:
    """The documents of next_line.jsonl as the "test" split (lm-eval passes the task's metadata)."""
    lines = Path(__file__).with_name("next_line.jsonl").read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})
