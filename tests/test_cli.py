"""The command line, run as users run it."""

from __future__ import annotations

import subprocess
import sys

from moetron.cli import main


def test_demo_runs_and_round_trips(capsys) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "reloaded logits identical: True" in out
    for preset in ("tiny", "small", "mixtral-8x7b", "gpt4"):
        assert preset in out
    assert "1.81T" in out and "285.68B" in out  # gpt4 total / active


def test_info_and_errors(capsys, tmp_path) -> None:
    assert main(["info", "mixtral-8x7b"]) == 0
    assert "46.70B" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moetron", "info", "tiny"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "238.40K" in result.stdout


def test_train_generate_eval_from_the_command_line(capsys, tmp_path) -> None:
    """configs/tiny.toml: the whole pipeline on the bundled corpus, 20 steps."""
    out, data = tmp_path / "run", tmp_path / "data"
    args = [
        "train",
        "configs/tiny.toml",
        f"--train.out_dir={out}",
        f"--data.dir={data}",
        "--train.progress=false",
    ]
    assert main([*args, "--sample=ROMEO:"]) == 0
    printed = capsys.readouterr().out
    assert "[train] done: 20 steps, validation loss" in printed and "ROMEO:" in printed
    assert (out / "final" / "tokenizer.json").exists() and (out / "final" / "model.safetensors").exists()
    # the same command again continues the finished run (nothing to train) instead of replacing it
    assert main(args) == 0
    assert "nothing left to train" in capsys.readouterr().out
    assert main([*args, "--train.resume=false"]) == 2
    assert f"train.out_dir={out} already holds a run" in capsys.readouterr().err

    assert main(["generate", str(out / "final"), "JULIET:", "--max-tokens=5", "--temperature=0"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", str(out / "final"), "JULIET:", "--max-tokens=5", "--temperature=0"]) == 0
    assert capsys.readouterr().out == first  # greedy is deterministic

    sample = tmp_path / "held_out.jsonl"
    sample.write_text('{"text": "Now is the winter of our discontent made glorious summer."}\n' * 40)
    assert main(["eval", str(out / "final"), f"--data={sample}", "--seq-len=32"]) == 0
    assert "perplexity" in capsys.readouterr().out

    assert main(["generate", str(out / "final"), "x", "--top-p=1.5"]) == 2
    assert "top_p=1.5 must lie in (0, 1]" in capsys.readouterr().err
    assert main(["train", "configs/tiny.toml", "--train.steps=0"]) == 2
    assert "train.steps=0 must be > 0" in capsys.readouterr().err
