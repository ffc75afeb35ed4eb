"""Hostile reproductions against the Python API (api.py) and `concurrency: auto`: each failed on the code it was
written against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

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
