"""Planner against published runs (docs/planner.md prints the same table).

Bounds: parameters within 3%, training FLOPs (6·N·D, as published) within 5%; with the published
parallel layout fixed, GPU-hours within 25% and MFU within 10% of the published value (or of the
nearer end of a published range); GPT-4's described 90-100 days and 32-36% wall-clock MFU inside
their ranges.
"""

from __future__ import annotations

import pytest

from moetron.plan.validation import Check, checks, markdown_table

BOUNDS = {
    "total params": 0.03,
    "active params": 0.03,
    "training FLOPs (6ND)": 0.05,
    "GPU-hours": 0.25,
    "MFU": 0.10,
    "days": 0.0,
    "MFU over wall clock (6ND)": 0.0,
}


@pytest.fixture(scope="module")
def all_checks() -> list[Check]:
    return checks()


def test_every_published_run_is_checked(all_checks: list[Check]) -> None:
    runs = {c.run for c in all_checks}
    assert {
        "GPT-3 175B",
        "PaLM 540B",
        "Llama 3.1 405B",
        "DeepSeek-V3",
        "Mixtral 8x7B",
        "GPT-4 (described)",
    } <= runs
    figures = {(c.run, c.figure) for c in all_checks}
    assert ("PaLM 540B", "MFU") in figures and ("Llama 3.1 405B", "GPU-hours") in figures
    assert ("DeepSeek-V3", "GPU-hours") in figures


def test_published_layouts_are_within_bounds(all_checks: list[Check]) -> None:
    failures = [
        f"{c.run} {c.figure}: {c.error:+.1%} ({c.how})"
        for c in all_checks
        if not c.how.startswith("best layout") and abs(c.error) > BOUNDS[c.figure]
    ]
    assert not failures, failures


def test_markdown_table(all_checks: list[Check]) -> None:
    table = markdown_table(all_checks)
    assert table.count("\n") == len(all_checks) + 1
    assert "| Llama 3.1 405B | GPU-hours | 30.84M |" in table
