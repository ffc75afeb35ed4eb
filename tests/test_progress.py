"""Progress: a bar on a terminal, plain log lines in cron."""

from __future__ import annotations

import io
import logging
from decimal import Decimal

import pytest

from batchrunner.progress import Progress
from batchrunner.records import Bill, RowResult


def row(i: int, status: str = "ok") -> RowResult:
    bill = Bill(Decimal("0.001"), {"reported"}, 0, 0, 1)
    return RowResult(i, str(i), 0, "m", status, cost_usd=bill.cost_usd, attempts=1, this_run=bill)  # type: ignore[arg-type]  # status: str for a Literal


def test_log_lines_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    """Without a terminal, progress goes to the log as plain lines with counts, rate and cost."""
    progress = Progress(3, stream=io.StringIO(), interactive=False, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="batchrunner"):
        progress.finished(row(0))
        progress.finished(row(1, "failed"))
    assert "progress: 2/3 rows" in caplog.text and "ok=1 failed=1" in caplog.text and "$0.002" in caplog.text


def test_bar_on_a_terminal_shows_counts_and_retries() -> None:
    """On a terminal a tqdm bar shows rows done of total with ok, failed, retrying and dollars."""
    stream = io.StringIO()
    progress = Progress(2, stream=stream, interactive=True)
    progress.retry(+1)
    progress.finished(row(0))
    progress.close()
    text = stream.getvalue()
    assert "1/2" in text and "ok=1" in text and "retrying=1" in text
