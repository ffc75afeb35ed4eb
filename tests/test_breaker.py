"""The circuit breaker: opens after failures in a row, probes after a cooldown, closes on success."""

from __future__ import annotations

import asyncio
import time

from batchrunner.breaker import Breaker, ServerWatch
from batchrunner.clock import running_s


def make() -> tuple[Breaker, list[float]]:
    now = [0.0]
    return Breaker(threshold=3, cooldown_s=10, max_cooldown_s=25, clock=lambda: now[0]), now


def test_opens_after_threshold_failures_in_a_row() -> None:
    """Three failures in a row open the circuit; a success in between resets the count."""
    breaker, _ = make()
    for ok in (False, False, True, False, False):
        assert breaker.decide("m") == "send"
        breaker.record("m", ok=ok)
    assert not breaker.is_open("m")
    breaker.record("m", ok=False)
    assert breaker.is_open("m") and breaker.decide("m") == "skip"


def test_one_probe_after_cooldown_then_close_or_reopen_longer() -> None:
    """After the cooldown exactly one probe goes; failure reopens for twice as long (capped), success closes."""
    breaker, now = make()
    for _ in range(3):
        breaker.record("m", ok=False)
    now[0] = 10.0
    assert breaker.decide("m") == "probe"
    assert breaker.decide("m") == "skip", "only one probe at a time"
    breaker.record("m", ok=False)
    assert breaker.failed_probes("m") == 1
    now[0] = 29.0
    assert breaker.decide("m") == "skip", "the second cooldown is 20 s"
    now[0] = 30.0
    assert breaker.decide("m") == "probe"
    breaker.record("m", ok=False)
    now[0] = 54.0
    assert breaker.decide("m") == "skip", "cooldown capped at 25 s"
    now[0] = 55.0
    assert breaker.decide("m") == "probe"
    breaker.record("m", ok=True)
    assert not breaker.is_open("m") and breaker.decide("m") == "send"


def test_release_frees_the_probe_without_a_verdict() -> None:
    """A probe that was rate limited (no word on health) lets another probe go."""
    breaker, now = make()
    for _ in range(3):
        breaker.record("m", ok=False)
    now[0] = 10.0
    assert breaker.decide("m") == "probe"
    breaker.release("m")
    assert breaker.decide("m") == "probe"


async def test_waiters_wake_when_a_probe_reports() -> None:
    """Rows waiting on an open circuit wake as soon as the probe's outcome is recorded."""
    breaker = Breaker(threshold=1, cooldown_s=0)
    breaker.record("m", ok=False)
    assert breaker.decide("m") == "probe"
    waiter = asyncio.create_task(breaker.wait("m"))
    await asyncio.sleep(0)
    assert not waiter.done()
    breaker.record("m", ok=True)
    await asyncio.wait_for(waiter, 1)


async def test_server_watch_probes_one_at_a_time_and_gives_up_after_its_timeout() -> None:
    """While the server refuses connections one probe goes per interval, an answer reopens it,
    and an unbroken outage of give_up_s makes admit() say no."""
    now = [0.0]
    watch = ServerWatch(give_up_s=60, probe_every_s=1.0, clock=lambda: now[0])
    assert await watch.admit()  # up: at once
    watch.failed("connection refused")
    now[0] = 1.0
    assert await watch.admit(), "the first probe"
    waiter = asyncio.create_task(watch.admit())
    await asyncio.sleep(0)
    assert not waiter.done(), "a second request waits while the probe is out"
    watch.answered()
    assert await asyncio.wait_for(waiter, 1) and watch.down_since is None
    now[0] = 10.0
    watch.failed("connection refused")  # down again, from t=10
    now[0] = 69.5
    assert not watch.gave_up
    now[0] = 70.0
    assert watch.gave_up and not await watch.admit()
    assert watch.cause == "connection refused"


async def test_a_probe_that_never_reached_the_server_lets_another_go() -> None:
    """A probe given up before it was sent (the run stopping, a file changed, a cancel) is released: the requests
    waiting for the server's answer are let go as the next probe, instead of waiting until the run gives up."""
    now = [0.0]
    watch = ServerWatch(give_up_s=60, probe_every_s=1.0, clock=lambda: now[0])
    watch.failed("connection refused")
    now[0] = 1.0
    assert await watch.admit(), "the probe"
    waiter = asyncio.create_task(watch.admit())
    await asyncio.sleep(0)
    assert not waiter.done()
    now[0] = 2.0
    watch.release()  # the probe never went
    assert await asyncio.wait_for(waiter, 1), "the next request is the probe now"
    watch.answered()
    watch.release()  # after an answer: nothing to release
    assert watch.probe_in_s() == 0.0


async def test_a_stopped_process_is_not_time_the_server_was_unreachable() -> None:
    """The server watch and the breaker count running time (clock.py): a process suspended past give_up_s, here
    a loop blocked for 1.5 s, neither gives up on a server that failed just before nor ends a model's pause."""
    watch, breaker = ServerWatch(give_up_s=1.0), Breaker(threshold=1, cooldown_s=1.0)
    running_s()  # the clock's heartbeat starts
    watch.failed("connection refused")
    with breaker.attempt("m") as health:
        health.failed("boom")
    await asyncio.sleep(0.3)
    time.sleep(1.5)  # what SIGSTOP, then SIGCONT, looks like from inside
    assert not watch.gave_up
    assert breaker.decide("m") == "skip", "the pause still has most of its second to run"
