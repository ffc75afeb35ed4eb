"""concurrency: auto, the AIMD limit alone (a table of answer and overload sequences) and against a sandbox whose
capacity it is not told."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from batchrunner.adaptive import Aimd
from batchrunner.runner import RunSettings, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec

FAST, SLOW, SHED = 0.1, 0.5, "shed"  # an answer's latency (the best is 0.1 s), or an overload (429, 503)

AIMD_CASES = [  # (ceiling, start, events, the limit after, the most reached)
    (64, 4, [], 4, 4),
    (3, 4, [], 3, 3),  # the start is held to the ceiling
    (64, 4, [FAST] * 3, 4, 4),  # a window is `limit` answers: three is not one
    (64, 4, [FAST] * 4, 5, 5),  # one window whose latency held: one more
    (64, 4, [FAST] * (4 + 5 + 6), 7, 7),  # a window each: 5, 6, 7
    (6, 4, [FAST] * 40, 6, 6),  # never past the ceiling
    (64, 4, [FAST] + [SLOW] * 10, 4, 4),  # latency past twice the best: the server queues, hold
    (64, 4, [FAST] * 4 + [SHED], 2, 5),  # an overload halves (5 -> 2.5), at once after a rise
    (64, 8, [SHED, SHED, SHED], 4, 8),  # one burst of overloads is one signal: halved once
    (64, 8, [SHED] + [FAST] * 4 + [SHED], 5, 8),  # within a window (of 5, once risen) of a cut: the same burst
    (64, 8, [SHED] + [FAST] * 5 + [SHED], 2, 8),  # a window after a cut, an overload cuts again
    (64, 2, [SHED, FAST, FAST, SHED], 1, 2),
    (64, 1, [SHED], 1, 1),  # never below the floor of one
    (64, 8, [SHED] * 6, 2, 8),  # overloads count toward the window too: a server shedding everything is cut again
    (64, 8, [SHED] + [FAST] * 3, 4, 8),  # after a cut, a whole window of answers (4) before it climbs
    (64, 8, [FAST] * 8 + [FAST] * 9, 10, 10),  # the best latency holds when an answer equals it
]


@pytest.mark.parametrize(("ceiling", "start", "events", "limit", "reached"), AIMD_CASES)
def test_aimd(ceiling: int, start: int, events: list[float | str], limit: int, reached: int) -> None:
    """The limit after a sequence of answers (their latency) and overloads, and the most it reached."""
    aimd = Aimd(ceiling, start=start)
    for event in events:
        if event == SHED:
            aimd.overloaded()
        else:
            assert isinstance(event, float)
            aimd.answered(event)
    assert (aimd.allowed, aimd.reached) == (limit, reached)


async def test_auto_settles_near_a_capacity_the_server_keeps_secret(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """A server that sheds (503) every request past 8 in flight: `concurrency: auto` climbs to it, halves on the
    503s, and ends near it; every row is answered (the 503s retried), few are shed, and the summary says where
    it settled."""
    rows = tmp_path / "rows.csv"
    pl.DataFrame({"ticket_id": [f"T-{i}" for i in range(400)], "text": ["x"] * 400}).write_csv(rows)
    async with Sandbox(SandboxConfig(capacity=8, latency_s=0.02, retry_after_s=0)) as sandbox:
        spec = load_spec(
            write_spec(
                input=rows.name,
                concurrency="auto",
                max_concurrency=64,
                retry={"max_attempts": 5, "base_delay_s": 0, "max_delay_s": 0},
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec, RunSettings())
    report = outcome.report
    assert report.summary.ok == 400 and report.stop is None
    assert report.concurrency is not None
    ended, most = report.concurrency
    assert 4 <= ended <= 12 and 8 <= most <= 16, report.concurrency
    assert sandbox.stats.shed < 0.1 * sandbox.stats.requests, (sandbox.stats.shed, sandbox.stats.requests)
    summary = json.loads(spec.output.with_name("result.summary.json").read_text())
    assert summary["concurrency"] == {"ended_at": ended, "most": most}


async def test_a_place_is_never_held_by_a_request_cancelled_or_stopped_while_it_waits() -> None:
    """live.InFlight: a waiter cancelled while it waits takes no place; a stop wakes every waiter without one; a
    place given back lets the next in."""
    import asyncio

    from batchrunner.halt import Halt, StopReason
    from batchrunner.live import InFlight

    halt = Halt()
    in_flight = InFlight(Aimd(1, start=1))
    halt.on_stop(in_flight.wake)
    assert await in_flight.enter(halt) and in_flight.sending == 1
    cancelled = asyncio.ensure_future(in_flight.enter(halt))
    await asyncio.sleep(0)
    cancelled.cancel()
    in_flight.leave(latency_s=0.1)  # the place freed as the cancel lands
    await asyncio.gather(cancelled, return_exceptions=True)
    assert in_flight.sending == 0, "the cancelled waiter must not hold the place"
    assert await in_flight.enter(halt)
    waiting = [asyncio.ensure_future(in_flight.enter(halt)) for _ in range(3)]
    await asyncio.sleep(0)
    halt.stop(StopReason.INTERRUPTED, "stop")
    assert await asyncio.gather(*waiting) == [False, False, False] and in_flight.sending == 1
