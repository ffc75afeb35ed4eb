"""How a run's pairs are scheduled: the executor seam.

An executor takes the pairs still to answer (pending.py), the row policy that answers one
pair (policy.py), the sinks that take each result as it arrives (records.ResultSink: the
checkpoint, the summary, the progress display) and the run's one halt (halt.py), and
returns when the work is done or the run has stopped. How requests are scheduled is its
business alone: `LiveExecutor` runs a pool of asyncio workers; the Batch API's executor
submits, polls and collects, with the same policy, sinks and halt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from batchrunner.errors import BatchrunnerError, first_line
from batchrunner.halt import Halt, StopReason
from batchrunner.pending import Batch, Todo
from batchrunner.records import ResultSink, RowResult

log = logging.getLogger("batchrunner")


class Answerer(Protocol):
    """The row policy as an executor sees it (policy.RowPolicy)."""

    # The tasks whose request is on the wire now: once a run stops, only they get the grace period.
    sending: set[asyncio.Task[Any]]

    def answer(self, todo: Todo) -> Awaitable[RowResult | None]: ...


@dataclass(frozen=True)
class Execution:
    resumed: int  # pairs already answered by an earlier run, skipped
    wall_s: float


def count_resumed(batch: Batch, sinks: ResultSink) -> int:
    """Tell the sinks how many of the batch's pairs earlier runs answered (skipped), and return it."""
    skipped = sum(batch.answered.values())
    if skipped:
        sinks.resumed(skipped)
    return skipped


class Executor(Protocol):
    async def execute(self, work: Iterable[Batch], policy: Answerer, sinks: ResultSink, halt: Halt) -> Execution: ...


class LiveExecutor:
    """A pool of `concurrency` workers taking pairs from a bounded queue, fed as the input is read.

    Once the run stops, queued pairs are dropped, workers waiting for work leave, and requests
    on the wire get `grace_s` to land (they are paid for); pairs merely waiting (on a backoff,
    a breaker, the server, the rate limit, the budget) are released at once."""

    def __init__(self, concurrency: int, *, grace_s: float = 30.0) -> None:
        self.concurrency = concurrency
        self.grace_s = grace_s

    async def execute(self, work: Iterable[Batch], policy: Answerer, sinks: ResultSink, halt: Halt) -> Execution:
        started = time.monotonic()
        queue: asyncio.Queue[Todo | None] = asyncio.Queue(maxsize=2 * self.concurrency)
        resumed = 0

        def wake_workers() -> None:  # drop queued work, then one sentinel per worker
            while not queue.empty():
                queue.get_nowait()
            for _ in range(self.concurrency):
                queue.put_nowait(None)

        async def feed() -> None:
            nonlocal resumed
            try:
                for batch in work:
                    resumed += count_resumed(batch, sinks)
                    for todo in batch.todo:
                        if halt.stopping:
                            return
                        await queue.put(todo)
            except BatchrunnerError as exc:  # the input (or the checkpoint) failed past some row: already a sentence
                halt.stop(StopReason.INPUT, first_line(exc))
                return
            except Exception as exc:  # a bug: the run still stops (workers must not wait forever), saying so
                log.debug("preparing the next rows failed", exc_info=exc)
                halt.stop(
                    StopReason.INPUT,
                    f"preparing the next rows failed ({type(exc).__name__}: {first_line(exc)}); this is a bug in "
                    "batchrunner (rerun with -v for its trace, and please report it); answered rows are kept",
                )
                return
            for _ in range(self.concurrency):
                await queue.put(None)

        async def worker() -> None:
            current = asyncio.current_task()
            while not halt.stopping:
                todo = await queue.get()
                if todo is None:
                    return
                result = await policy.answer(todo)
                if result is not None:
                    sinks.add(result)
                if current is not None and current.cancelling():  # the policy kept a bill; the cancel stands
                    raise asyncio.CancelledError

        halt.on_stop(wake_workers)
        producer = asyncio.create_task(feed())
        workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        try:
            await self._join(workers, halt, policy.sending)
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
            for task in workers:
                task.cancel()
            # A worker cancelled mid-request records what that request may have cost (policy.answer): let it,
            # before the run closes the checkpoint.
            await asyncio.gather(*workers, return_exceptions=True)
        return Execution(resumed, time.monotonic() - started)

    async def _join(self, workers: list[asyncio.Task[None]], halt: Halt, sending: set[asyncio.Task[Any]]) -> None:
        """Wait for the workers; once the run is stopping, give requests on the wire `grace_s` to land, and
        release at once the workers that are only waiting (for a slot, a backoff, the budget): nothing of
        theirs was sent."""
        pending: set[asyncio.Task[Any]] = set(workers)
        stopped = asyncio.create_task(halt.wait())
        try:
            while pending and not halt.stopping:
                done, pending = await asyncio.wait(pending | {stopped}, return_when=asyncio.FIRST_COMPLETED)
                done.discard(stopped)
                pending.discard(stopped)
            waiting = pending - sending
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            pending -= waiting
            if pending:
                _, pending = await asyncio.wait(pending, timeout=self.grace_s)
            if pending:
                log.warning(
                    "gave up on %d requests still in flight after %g s; their rows stay pending",
                    len(pending),
                    self.grace_s,
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            stopped.cancel()
        for task in workers:  # a bug in a worker must not pass silently
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # narrowed by the test just above
