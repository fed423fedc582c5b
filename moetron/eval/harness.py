"""`moetron eval MODEL --tasks ...`: lm-evaluation-harness through moetron's own server.

The engine and the OpenAI-compatible server run in this process on a free loopback port, and
lm-eval's stock `local-completions` model talks to them over HTTP, tokenizing through the server
(`/tokenizer_info`, `/tokenize`, `/detokenize`, as it does against vLLM): what is measured is what
`moetron serve` answers, so the scores equal `lm_eval --model local-completions` against a running
server. Log-likelihoods come from `echo` + `logprobs` completions with `max_tokens=1`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moetron.eval import TASKS_DIR

SHUTDOWN_TIMEOUT_S = 60.0


class MissingExtraError(ImportError):
    """lm-eval is not installed (it is the optional `moetron[eval]` extra)."""


def import_lm_eval() -> Any:
    try:
        import aiohttp  # noqa: F401 - lm-eval's API models need it and tenacity (its [api] extra)
        import lm_eval
        import tenacity  # noqa: F401
        from lm_eval.utils import RemoteTokenizer  # noqa: F401 - lm-eval >= 0.4.9.2
    except ImportError as e:
        raise MissingExtraError(
            f"`moetron eval --tasks` needs lm-evaluation-harness >= 0.4.9.2 ({e}); "
            "install it with: pip install 'moetron[eval]'"
        ) from None
    return lm_eval


@contextlib.contextmanager
def serving(engine: Any, model_name: str) -> Iterator[str]:
    """Run `moetron serve`'s server around `engine` in a thread on loopback; yields its base URL."""
    from moetron.serve.server import make_state, serve_in_thread

    with serve_in_thread(make_state(engine, model_name), SHUTDOWN_TIMEOUT_S) as running:
        yield running.url


def evaluate(
    base_url: str,
    model_name: str,
    tasks: list[str],
    *,
    max_length: int,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    log_samples: bool = False,
    gen_kwargs: dict[str, Any] | None = None,
) -> dict:
    """lm-eval's `simple_evaluate` with `local-completions` against a server at `base_url`; the
    bundled tasks (`moetron_next_line`, `moetron_next_line_gen`) are on its task path.
    `gen_kwargs` update generation tasks' settings (lm-eval's --gen_kwargs)."""
    lm_eval = import_lm_eval()
    model_args = {
        "model": model_name,
        "base_url": f"{base_url}/v1/completions",
        "tokenizer_backend": "remote",
        "max_length": max_length,  # lm-eval assumes 2048; prompt + generation must fit the server's
        "max_retries": 1,  # a refused request is a bug to see, not a flake to retry
    }
    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=tasks,
        num_fewshot=num_fewshot,
        batch_size=batch_size,  # prompts per completions request; the engine batches them
        limit=limit,
        log_samples=log_samples,
        gen_kwargs=gen_kwargs,
        task_manager=task_manager(tasks),
    )


def task_manager(tasks: list[str]) -> Any:
    """lm-eval's task index with the bundled tasks; lm-eval's own thousands of task YAMLs (about
    10 s to index) only when a task outside the bundled ones is asked for."""
    from lm_eval.tasks import TaskManager

    bundled = {path.stem for path in TASKS_DIR.glob("*.yaml")}
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=not set(tasks) <= bundled)


def run_tasks(
    model_dir: str | Path,
    tasks: list[str],
    *,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    log_samples: bool = False,
    engine_overrides: dict[str, Any] | None = None,
) -> dict:
    """Load `model_dir` into an engine, serve it on loopback and run lm-eval's `tasks` against it."""
    from moetron.infer.engine import LLMEngine

    import_lm_eval()  # before the model loads: a missing extra fails at once
    engine = LLMEngine.from_pretrained(model_dir, **(engine_overrides or {}))
    if engine.tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer (tokenizer.json): lm-eval needs one")
    name = Path(model_dir).resolve().name
    with serving(engine, name) as base_url:
        return evaluate(
            base_url,
            name,
            tasks,
            max_length=engine.max_model_len,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            log_samples=log_samples,
        )


def results_table(results: dict) -> str:
    """lm-eval's own tables: per task, then per group when the tasks form groups."""
    from lm_eval.utils import make_table

    table = make_table(results)
    return table + ("\n" + make_table(results, "groups") if results.get("groups") else "")


def write_results(results: dict, path: str | Path) -> None:
    """The results as JSON (lm-eval's serializer for what JSON lacks, e.g. the tasks' functions)."""
    from lm_eval.utils import handle_non_serializable

    Path(path).write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
