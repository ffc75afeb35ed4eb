"""The run's clock: time the process was running, not time it was suspended.

A laptop lid, Ctrl-Z then `fg`, a paused container or a debugger stops the whole process;
when it resumes, every timer of the event loop is overdue at once. A request timeout would
then fire on answers already waiting in their sockets, and the answers, paid for, would be
thrown away and bought again. A stall is nobody's fault: it must not count against a
request, a server or a model.

`running_s()` is the event loop's time less every stall seen so far: a heartbeat every
HEARTBEAT_S notes how late it woke; lateness beyond STALL_SLACK_S is a stall. A stall still
in progress (the heartbeat has not run yet) is counted too, from how long ago the last
heartbeat ran. `within(timeout_s)` is `asyncio.timeout` on this clock, kept by the same
heartbeat: each beat, after counting any stall, cancels the blocks whose running time is up
(so a timeout fires up to HEARTBEAT_S late, and never because of a stall, whose replies
already received land first). One set of deadlines and no timer per request: a request
pays for a set insertion, not for a timer on the loop's heap.
"""

from __future__ import annotations

import asyncio
import time
import weakref

HEARTBEAT_S = 0.25
STALL_SLACK_S = 1.0  # a heartbeat this late (a loop blocked, or a process stopped) is a stall


class _LoopClock:
    """One event loop's running time, and the deadlines of the `within` blocks open on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.stalled_s = 0.0  # stalls the heartbeat has seen
        self.last_beat = loop.time()
        self.watched: set[within] = set()
        loop.call_later(HEARTBEAT_S, self._beat)

    def _beat(self) -> None:
        now = self.loop.time()
        late = now - self.last_beat - HEARTBEAT_S
        if late > STALL_SLACK_S:
            self.stalled_s += late
        self.last_beat = now
        if self.watched:
            running = now - self.stalled_s
            for block in [block for block in self.watched if block.deadline <= running]:
                block.expire()
        if not self.loop.is_closed():
            self.loop.call_later(HEARTBEAT_S, self._beat)

    def running_s(self) -> float:
        now = self.loop.time()
        late = now - self.last_beat - HEARTBEAT_S  # a stall the heartbeat has not woken from yet
        return now - self.stalled_s - (late if late > STALL_SLACK_S else 0.0)


_clocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClock] = weakref.WeakKeyDictionary()


def _clock() -> _LoopClock | None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    clock = _clocks.get(loop)
    if clock is None:
        clock = _clocks[loop] = _LoopClock(loop)
    return clock


def running_s() -> float:
    """Seconds on a clock that stops while the process is stopped (time.monotonic outside an event loop)."""
    clock = _clock()
    return time.monotonic() if clock is None else clock.running_s()


class within:  # used as a function: `async with within(5):`, like asyncio.timeout
    """Raise TimeoutError if the block takes longer than `timeout_s` of running time."""

    __slots__ = ("_cancelling", "_clock", "_expired", "_task", "deadline", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    async def __aenter__(self) -> None:
        clock = _clock()
        task = asyncio.current_task()
        assert clock is not None and task is not None  # inside a task
        self._clock, self._task = clock, task
        self._cancelling = task.cancelling()
        self._expired = False
        self.deadline = clock.running_s() + self.timeout_s
        clock.watched.add(self)

    def expire(self) -> None:
        """Called by the heartbeat: this block's time is up."""
        self._clock.watched.discard(self)
        self._expired = True
        self._task.cancel()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> None:
        self._clock.watched.discard(self)
        if self._expired and self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
            raise TimeoutError from error
