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
