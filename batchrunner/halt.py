"""The run's one stop signal: why it stopped, set from anywhere, read once.

A run stops dispatching for one of a closed set of reasons (`StopReason`). Whoever notices
(the row policy on a fatal answer or a spent budget, the checkpoint writer on a full disk, a
signal handler, the input reader) calls `halt.stop(...)`; the first reason wins. Executors
stop handing out work when `halt.stopping` turns true and let requests on the wire land.
The CLI reads `halt.outcome` once for its message and exit code.

A deferral (free models out for the day) is recorded the same way but does not stop the run:
the other models go on, and the run still ends with exit 3 so a scheduler knows rows wait.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from batchrunner.errors import ApiError

log = logging.getLogger("batchrunner")


class StopReason(enum.Enum):
    INTERRUPTED = "interrupted"  # SIGINT or SIGTERM
    ACCOUNT = "account"  # the key, credits or a key/workspace limit (a FatalApiError)
    BUDGET = "budget"  # budget_usd or --max-cost spent
    SERVER_GONE = "server_gone"  # every connection refused for unreachable_timeout_s
    CHECKPOINT = "checkpoint"  # answers cannot be saved (a full disk)
    INPUT = "input"  # the rows still to do could not be prepared during the run (the input or the checkpoint failed)
    BATCH_API = "batch_api"  # a batch submission got no answer: the next run reconciles it
    FREE_CAP = "free_cap"  # a deferral: free models are out for the day, the others go on
    NOT_STARTED = "not_started"  # the run could not start (another run holds the job, no network): nothing was sent


@dataclass(frozen=True)
class Stop:
    reason: StopReason
    message: str  # one line for people, with the fix
    error: ApiError | None = None

    @property
    def stops_dispatch(self) -> bool:
        return self.reason is not StopReason.FREE_CAP


class Halt:
    """Set once from anywhere; every executor and waiting row listens to it."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.stopped: Stop | None = None  # what stopped dispatch, if anything did
        self.deferred: Stop | None = None  # what was left for later without stopping the run
        self._listeners: list[Callable[[], None]] = []

    def stop(self, reason: StopReason, message: str, error: ApiError | None = None) -> None:
        """Stop dispatching (or, for FREE_CAP, record the deferral); the first reason wins."""
        stop = Stop(reason, message, error)
        if not stop.stops_dispatch:
            if self.deferred is None:
                self.deferred = stop
            return
        if self.stopped is not None:
            return
        self.stopped = stop
        log.warning("stopping: %s", message)
        self._event.set()
        for listener in self._listeners:
            listener()

    def on_stop(self, listener: Callable[[], None]) -> None:
        """Call `listener` when the run stops (at once if it already has)."""
        self._listeners.append(listener)
        if self.stopping:
            listener()

    @property
    def stopping(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    @property
    def outcome(self) -> Stop | None:
        """Why the run ended early, if it did: a stop, else a deferral."""
        return self.stopped or self.deferred
