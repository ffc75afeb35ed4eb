"""Progress: a bar on a terminal, plain log lines in cron."""

from __future__ import annotations

import asyncio
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
        progress.add(row(0))
        progress.add(row(1, "failed"))
    assert "progress: 2/3 rows (1 ok, 1 failed, 1 pending)" in caplog.text and "$0.002 spent" in caplog.text


async def test_a_heartbeat_line_comes_while_no_row_finishes(caplog: pytest.LogCaptureFixture) -> None:
    """In cron mode a line is logged every interval even when nothing finishes (a long backoff, a paused model)."""
    progress = Progress(5, stream=io.StringIO(), interactive=False, every_s=0.01)
    progress.retry(+2)
    with caplog.at_level(logging.INFO, logger="batchrunner"):
        beat = asyncio.create_task(progress.heartbeat())
        await asyncio.sleep(0.05)
        beat.cancel()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert len(lines) >= 2 and "0/5 rows (0 ok, 0 failed, 5 pending, 2 waiting to retry)" in lines[0]


def test_bar_on_a_terminal_shows_counts_and_retries() -> None:
    """On a terminal a tqdm bar shows rows done of total with ok, failed, retrying and dollars."""
    stream = io.StringIO()
    progress = Progress(2, stream=stream, interactive=True)
    progress.retry(+1)
    progress.add(row(0))
    progress.close()
    text = stream.getvalue()
    assert "1/2" in text and "ok=1" in text and "retrying=1" in text
