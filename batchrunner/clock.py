"""The run's clock: time the process was running, not time it was suspended.

A laptop lid, Ctrl-Z then `fg`, a paused container or a debugger stops the whole process;
when it resumes, every timer of the event loop is overdue at once. A request timeout would
then fire on answers already waiting in their sockets, and the answers, paid for, would be
thrown away and bought again. A stall is nobody's fault: it must not count against a
request, a server or a model.

`running_s()` is the event loop's time less every stall seen so far: a heartbeat every
HEARTBEAT_S notes how late it woke; lateness beyond STALL_SLACK_S is a stall. A stall still
in progress (the heartbeat has not run yet, as when a timeout's callback runs first after
a resume) is counted too, from how long ago the last heartbeat ran. `within(timeout_s)` is
`asyncio.timeout` on this clock: when its time seems up, it checks the running time, and
if a stall ate the time it waits on instead, letting the replies already received land.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator

HEARTBEAT_S = 0.25
STALL_SLACK_S = 1.0  # a heartbeat this late (a loop blocked, or a process stopped) is a stall
RECHECK_S = 0.05  # after a stall, how soon a timeout looks again (replies already received land first)


class _LoopClock:
    """One event loop's running time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.stalled_s = 0.0  # stalls the heartbeat has seen
        self.last_beat = loop.time()
        loop.call_later(HEARTBEAT_S, self._beat)

    def _beat(self) -> None:
        now = self.loop.time()
        late = now - self.last_beat - HEARTBEAT_S
        if late > STALL_SLACK_S:
            self.stalled_s += late
        self.last_beat = now
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


@contextlib.asynccontextmanager
async def within(timeout_s: float) -> AsyncIterator[None]:
    """Raise TimeoutError if the block takes longer than `timeout_s` of running time."""
    clock = _clock()
    assert clock is not None  # inside a coroutine
    loop = clock.loop
    deadline = clock.running_s() + timeout_s
    async with asyncio.timeout(None) as scope:
        handles: list[asyncio.TimerHandle] = []

        def check() -> None:
            left = deadline - clock.running_s()
            if left <= 0:
                scope.reschedule(loop.time())
            else:
                handles[0] = loop.call_later(max(left, RECHECK_S), check)

        handles.append(loop.call_later(timeout_s, check))
        try:
            yield
        finally:
            handles[0].cancel()
