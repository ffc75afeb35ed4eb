"""Hostile reproductions against the Python API (api.py) and `concurrency: auto`: each failed on the code it was
written against."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

import batchrunner


def job_dict(tickets_csv: Path, tmp_path: Path, **changes: Any) -> dict[str, Any]:
    return {
        "name": "api-attack",
        "input": str(tickets_csv),
        "id_column": "ticket_id",
        "output": str(tmp_path / "out" / "result.parquet"),
        "models": ["openai/gpt-4o-mini"],
        "prompt": "Ticket {ticket_id}: {text}",
        "params": {"temperature": 0, "max_tokens": 50},
        **changes,
    }


@pytest.mark.parametrize("limit", [0, -1, 2.5, "3", True])
def test_a_limit_the_cli_refuses_raises_spec_error(tickets_csv: Path, tmp_path: Path, limit: Any) -> None:
    """run() and estimate() refuse a limit that is not a whole number of rows >= 1 (the CLI's IntRange(min=1)) with
    SpecError naming it, before anything is opened: not a traceback, not an INPUT stop, not a run of nothing."""
    job = job_dict(tickets_csv, tmp_path)
    with pytest.raises(batchrunner.SpecError, match="limit"):
        batchrunner.run(job, sandbox=True, limit=limit)
    with pytest.raises(batchrunner.SpecError, match="limit"):
        batchrunner.estimate(job, sandbox=True, limit=limit)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("max_cost", [0, "0", "-0", "1e300", 1e300, "2000000"])
def test_a_max_cost_the_spec_would_refuse_raises_spec_error(tickets_csv: Path, tmp_path: Path, max_cost: Any) -> None:
    """max_cost is held to budget_usd's bounds (more than 0, at most 1,000,000 USD): zero is the CLI's refused
    --max-cost 0, and 1e300 crashed formatting the budget (decimal.InvalidOperation, a traceback)."""
    with pytest.raises(batchrunner.SpecError, match="max_cost"):
        batchrunner.run(job_dict(tickets_csv, tmp_path), sandbox=True, max_cost=max_cost)
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_a_huge_max_cost_with_exit_2(write_spec: Any) -> None:
    """`run --max-cost 1e300` exits 2 with one sentence, not a decimal.InvalidOperation traceback."""
    done = run_cli(
        "run", str(write_spec()), "--sandbox", "--max-cost", "1e300", env={**os.environ, "OPENROUTER_API_KEY": ""}
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "max_cost" in done.stderr
