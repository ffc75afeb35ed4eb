"""Showing a run's progress: a tqdm bar on a terminal, plain log lines otherwise (cron).

A result sink (records.ResultSink): it reads the run's summary, which the sinks feed
before it, and counts rows waiting to retry; nothing else writes to the terminal while a
run is going.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

from batchrunner.costs import format_cost
from batchrunner.records import RowResult, Summary

log = logging.getLogger("batchrunner")


class Progress:
    """Counts rows done, ok, failed and retrying, and shows them."""

    def __init__(
        self,
        total: int,
        *,
        summary: Summary | None = None,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        every_s: float = 10.0,
    ) -> None:
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.total = total
        self.summary = summary or Summary()  # the run's own, fed before this display (records.Sinks)
        self._counts_own = summary is None
        self.retrying = 0
        self.already_done = 0
        self.every_s = every_s
        self._started = time.monotonic()
        self._last_line = self._started
        self._bar = (
            tqdm(total=total, file=self.stream, unit="row", dynamic_ncols=True, smoothing=0.1)
            if self.interactive
            else None
        )

    def add(self, result: RowResult) -> None:
        """A result arrived: move the bar, or log a line if one is due."""
        if self._counts_own:
            self.summary.add(result)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(self._postfix(), refresh=False)
        elif time.monotonic() - self._last_line >= self.every_s:
            self._log_line()

    def resumed(self, count: int) -> None:
        """Pairs an earlier run already answered: done, without a request."""
        self.already_done += count
        if self._bar is not None and count:
            self._bar.update(count)

    def retry(self, delta: int) -> None:
        self.retrying += delta

    def _postfix(self) -> str:
        s = self.summary
        retrying = f" retrying={self.retrying}" if self.retrying else ""
        return f"ok={s.ok} failed={s.failed}{retrying} {format_cost(s.cost_usd, s.unpriced)}"

    def _log_line(self) -> None:
        self._last_line = now = time.monotonic()
        s = self.summary
        done = s.done
        rate = done / max(now - self._started, 1e-9)
        left = self.total - self.already_done - done
        eta = f", eta {left / rate:.0f} s" if rate > 0 and left > 0 else ""
        retrying = f", {self.retrying} waiting to retry" if self.retrying else ""
        log.info(
            "progress: %d/%d rows (%d ok, %d failed, %d pending%s), %.1f rows/s%s, %s spent",
            done + self.already_done,
            self.total,
            s.ok,
            s.failed,
            left,
            retrying,
            rate,
            eta,
            format_cost(s.cost_usd, s.unpriced),
        )

    async def heartbeat(self) -> None:
        """Until cancelled: a log line at least every `every_s` without a terminal (cron), even while
        no row finishes (backoff, a paused model, a slow answer); on a terminal, keep the bar's clock moving."""
        while True:
            await asyncio.sleep(self.every_s)
            if self._bar is not None:
                self._bar.refresh()
            elif time.monotonic() - self._last_line >= self.every_s * 0.99:
                self._log_line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
