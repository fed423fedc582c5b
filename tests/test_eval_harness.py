"""lm-evaluation-harness, unmodified, through moetron's server against `lm_eval --model hf`.

The bundled tasks run twice on the tiny random model: with lm-eval's `local-completions` model
against moetron's server in process (its remote tokenizer: /tokenizer_info, /tokenize,
/detokenize), and with lm-eval's `hf` model (`transformers`, float32, CPU) on the same directory.
Scores, per-choice log-likelihoods and greedy generations must agree. Everything is local: the
tasks' data ships with moetron, and the hub is switched off.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before lm-eval imports datasets / huggingface_hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support  # noqa: E402

from moetron.cli import main  # noqa: E402
from moetron.eval import harness  # noqa: E402
from moetron.eval.next_line import DATA_FILE, build_docs  # noqa: E402
from moetron.infer.engine import LLMEngine  # noqa: E402

TASKS = ["moetron_next_line", "moetron_next_line_gen"]
LIMIT = 20  # documents per task: 80 log-likelihoods and 20 generations
# A document's log-likelihood sums the float32 log-probs of its continuation (~10-30 tokens), each
# within ~1e-5 between two implementations that sum in different orders (measured max |Δ| over
# the sum: 3.3e-5); an off-by-one token or a wrong context would be off by whole nats.
LOGLIKELIHOOD_ATOL = 2e-4
# The random model writes "n" often but never a newline; stopping on it too puts lm-eval's stop
# strings on the path (cut where they occur, as the hf model's post-processing cuts).
GEN_KWARGS = {"until": ["\n", "n"]}


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def base_url(engine) -> Iterator[str]:
    with harness.serving(engine, "tiny-moe") as url:
        yield url


@pytest.fixture(scope="module")
def server_results(base_url, engine) -> dict:
    return harness.evaluate(
        base_url,
        "tiny-moe",
        TASKS,
        max_length=engine.max_model_len,
        limit=LIMIT,
        log_samples=True,
        gen_kwargs=GEN_KWARGS,
    )


@pytest.fixture(scope="module")
def hf_results(tiny_model_dir) -> dict:
    return lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_model_dir), "dtype": "float32", "device": "cpu"},
        tasks=TASKS,
        batch_size=8,
        limit=LIMIT,
        log_samples=True,
        gen_kwargs=GEN_KWARGS,
        task_manager=harness.task_manager(TASKS),
    )


def test_bundled_data_regenerates_from_the_corpus() -> None:
    shipped = [json.loads(line) for line in DATA_FILE.read_text().splitlines()]
    assert shipped == build_docs()


def test_remote_tokenizer_endpoints_give_what_lm_eval_reads(base_url, engine) -> None:
    tokenizer = engine.tokenizer
    assert check_remote_tokenizer_support(f"{base_url}/v1/completions")
    remote = RemoteTokenizer(f"{base_url}/v1/completions")
    assert (remote.eos_token, remote.bos_token, remote.pad_token) == (
        tokenizer.eos_token,
        tokenizer.bos_token,
        tokenizer.pad_token,
    )
    assert (remote.eos_token_id, remote.bos_token_id) == (tokenizer.eos_id, tokenizer.bos_id)
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    assert remote.encode(text) == tokenizer.encode(text)
    assert remote.decode(tokenizer.encode(text)) == text
    info = remote.tokenizer_info
    assert info["chat_template"] == tokenizer.chat_template
    assert isinstance(info["tokenizer_class"], str)
    assert info["model_max_length"] == engine.max_model_len
    # vLLM's add_special_tokens: this tokenizer has no post-processor, so nothing is added.
    r = remote.session.post(f"{base_url}/tokenize", json={"prompt": text, "add_special_tokens": True})
    assert r.json()["tokens"] == tokenizer.encode(text)


def test_multiple_choice_through_the_server_equals_hf(server_results, hf_results) -> None:
    task = "moetron_next_line"
    assert server_results["results"][task] == pytest.approx(hf_results["results"][task])
    ours, theirs = server_results["samples"][task], hf_results["samples"][task]
    assert [s["doc_id"] for s in ours] == [s["doc_id"] for s in theirs] == list(range(LIMIT))
    for mine, hf in zip(ours, theirs, strict=True):
        assert len(mine["resps"]) == len(hf["resps"]) == 4
        for [(loglikelihood, greedy)], [(hf_loglikelihood, hf_greedy)] in zip(
            mine["resps"], hf["resps"], strict=True
        ):
            assert loglikelihood == pytest.approx(hf_loglikelihood, abs=LOGLIKELIHOOD_ATOL)
            assert greedy == hf_greedy


def test_generation_through_the_server_equals_hf(server_results, hf_results) -> None:
    task = "moetron_next_line_gen"
    ours = [s["filtered_resps"][0] for s in server_results["samples"][task]]
    theirs = [s["filtered_resps"][0] for s in hf_results["samples"][task]]
    assert ours == theirs
    assert not any(stop in text for text in ours for stop in GEN_KWARGS["until"])
    assert any(ours), "every generation was empty: the stop strings cut nothing but the start"


def test_cli_runs_tasks_and_prints_scores(tiny_model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "results.json"
    args = ["eval", str(tiny_model_dir), "--tasks", "moetron_next_line", "--limit", "4"]
    assert main([*args, "--output-path", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "moetron_next_line" in printed and "acc" in printed
    assert 0.0 <= json.loads(out.read_text())["results"]["moetron_next_line"]["acc,none"] <= 1.0

    assert main(["eval", str(tiny_model_dir)]) == 2  # neither --data nor --tasks
    assert "--data" in capsys.readouterr().err


def test_missing_extra_names_the_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails
    with pytest.raises(harness.MissingExtraError, match=r"pip install 'moetron\[eval\]'"):
        harness.import_lm_eval()
