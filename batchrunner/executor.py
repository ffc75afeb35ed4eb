"""How a run's pairs are scheduled: the executor seam.

An executor takes the pairs still to answer (pending.py), an `Answerer` (live.LiveAnswerer:
the job's rules, to make each pair's flow (flow.py), and a live answer of one pair), the sinks
that take each result as it arrives (records.ResultSink: the checkpoint, the summary, the
progress display) and the run's one halt (halt.py), and returns when the work is done or the
run has stopped. How requests are scheduled is its business alone: `live.LiveExecutor` runs a
pool of asyncio workers, each answering a pair live; `batch.BatchExecutor` drives the same
flows through the Batch API. Both drive the same rules; neither imports the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from batchrunner.flow import RowFlow, Rules
from batchrunner.halt import Halt
from batchrunner.pending import Batch, Todo
from batchrunner.records import ResultSink, RowResult


class Answerer(Protocol):
    """What the run hands its executor: one job's rules, a live answer of one pair, the budget's waiting."""

    rules: Rules  # each pair's flow is rules.flow(todo); its money is rules.pricer.accounts
    # The tasks whose request is on the wire now: once a run stops, only they get the grace period.
    sending: set[asyncio.Task[Any]]

    def answer(self, todo: Todo, flow: RowFlow | None = None) -> Awaitable[RowResult | None]:
        """The pair answered live: a new flow, or `flow`, one another executor started (its bill, its model)."""
        ...

    async def reserve(self, worst_usd: Decimal) -> bool:
        """Reserve against the budget, waiting for settlements; False when the run stopped instead."""
        ...

    def settle(self, reserved_usd: Decimal, actual_usd: Decimal) -> None:
        """A reservation becomes what was spent; pairs waiting for budget wake."""
        ...


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
    async def execute(self, work: Iterable[Batch], answerer: Answerer, sinks: ResultSink, halt: Halt) -> Execution: ...
