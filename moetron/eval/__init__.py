"""Evaluation with EleutherAI's lm-evaluation-harness through moetron's own server.

harness.py   `moetron eval MODEL --tasks ...`: the engine and server in process, lm-eval's
             `local-completions` model pointed at them (the optional `moetron[eval]` extra)
next_line.py builds the bundled `moetron_next_line` tasks' data from the held-out Shakespeare
tasks/       the tasks' lm-eval YAML configs, their JSONL data and loader (pass `TASKS_DIR` to
             lm-eval as `--include_path`)
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"
