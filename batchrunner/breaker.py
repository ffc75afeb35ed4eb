"""A circuit breaker per model, so a model that keeps failing is not hammered; and a watch over
the server, so a server that is gone stops the run instead of failing every row.

After `threshold` failures in a row, the model's circuit opens for a cooldown: rows skip
it (straight to their fallbacks), or, with no fallback left, wait. When the cooldown ends
one request probes it; success closes the circuit, failure reopens it for twice as long.
Pure state plus an asyncio.Event per model to wake rows waiting on a probe; the clock is
injectable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from batchrunner.clock import running_s

log = logging.getLogger("batchrunner")

Decision = Literal["send", "probe", "skip"]


@dataclass
class _Circuit:
    failures: int = 0  # in a row
    open_until: float | None = None  # None: closed
    cooldown_s: float = 0.0
    probing: bool = False
    failed_probes: int = 0
    last_failure: str = ""  # why the model last failed, for rows that end waiting on it
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Attempt:
    """One request's standing with the breaker, as a context (`with breaker.attempt(model) as health`).

    `decision` says whether to send (or probe) or skip. A request whose outcome tells about the
    model's health reports it (`healthy()`, `failed(why)`); one that tells nothing (a 429, a
    rejected row, a request that never went) just leaves the block, and its probe, if it was
    one, is released for another row: no branch has to remember to."""

    def __init__(self, breaker: Breaker, model: str) -> None:
        self._breaker, self._model = breaker, model
        self.decision: Decision = breaker.decide(model)
        self._reported = False

    @property
    def skip(self) -> bool:
        return self.decision == "skip"

    def healthy(self) -> None:
        self._reported = True
        self._breaker.record(self._model, ok=True)

    def failed(self, why: str) -> None:
        self._reported = True
        self._breaker.record(self._model, ok=False, failure=why)

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._reported and self.decision == "probe":
            self._breaker.release(self._model)


class Breaker:
    def __init__(
        self,
        *,
        threshold: int = 5,
        cooldown_s: float = 30.0,
        max_cooldown_s: float = 300.0,
        clock: Callable[[], float] = running_s,
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def _circuit(self, model: str) -> _Circuit:
        return self._circuits.setdefault(model, _Circuit())

    def is_open(self, model: str) -> bool:
        return self._circuit(model).open_until is not None

    def failed_probes(self, model: str) -> int:
        return self._circuit(model).failed_probes

    def probe_in_s(self, model: str) -> float | None:
        """Without deciding anything (a pool asks this of each endpoint before it picks one): 0 when a request to
        `model` may go now (closed, or a probe is due), the seconds until a probe may go, or None while one is out."""
        circuit = self._circuit(model)
        if circuit.open_until is None:
            return 0.0
        if circuit.probing:
            return None
        return max(0.0, circuit.open_until - self._clock())

    def attempt(self, model: str) -> Attempt:
        """The breaker's verdict for one request to `model`, releasing itself (see Attempt)."""
        return Attempt(self, model)

    def decide(self, model: str) -> Decision:
        """May a request go to `model` now? 'probe' means: go, as the one test of an open circuit."""
        circuit = self._circuit(model)
        if circuit.open_until is None:
            return "send"
        if circuit.probing or self._clock() < circuit.open_until:
            return "skip"
        circuit.probing = True
        return "probe"

    def release(self, model: str) -> None:
        """The probe never went (or told nothing about health, like a 429): let another probe."""
        circuit = self._circuit(model)
        if circuit.probing:
            circuit.probing = False
            circuit.changed.set()
            circuit.changed = asyncio.Event()

    def last_failure(self, model: str) -> str:
        return self._circuit(model).last_failure

    def record(self, model: str, *, ok: bool, failure: str = "") -> None:
        """The outcome of a request that tells about the model's health (not 429s, not bad rows)."""
        circuit = self._circuit(model)
        if failure:
            circuit.last_failure = failure
        was_probe = circuit.probing
        circuit.probing = False
        if ok:
            if circuit.open_until is not None:
                log.info("%s answers again: circuit closed", model)
            circuit.failures, circuit.open_until, circuit.cooldown_s = 0, None, 0.0
        else:
            circuit.failures += 1
            if was_probe:
                circuit.failed_probes += 1
                self._open(model, circuit, min(self.max_cooldown_s, max(circuit.cooldown_s, self.cooldown_s) * 2))
            elif circuit.open_until is None and circuit.failures >= self.threshold:
                self._open(model, circuit, self.cooldown_s)
        circuit.changed.set()
        circuit.changed = asyncio.Event()

    def _open(self, model: str, circuit: _Circuit, cooldown_s: float) -> None:
        circuit.cooldown_s = cooldown_s
        circuit.open_until = self._clock() + cooldown_s
        log.warning("%s failed %d times in a row: not sending it rows for %.0f s", model, circuit.failures, cooldown_s)

    async def wait(self, model: str) -> None:
        """Wait until the circuit changes or its cooldown ends (then a probe may go)."""
        circuit = self._circuit(model)
        if circuit.open_until is None:
            return
        remaining = circuit.open_until - self._clock()
        event = circuit.changed
        if circuit.probing or remaining > 0:
            timeout = None if circuit.probing else remaining
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)


class ServerWatch:
    """The server as a whole, apart from its models: a dead server is not a dead model.

    While the server refuses connections, rows do not burn their attempts or open their
    models' circuits: they wait, and one probe a `probe_every_s` goes to see whether it is
    back. When it has been unreachable for `give_up_s` with no answer in between, `gave_up`
    turns true and the run stops (rows stay pending, exit 3). The clock is injectable."""

    def __init__(
        self,
        *,
        give_up_s: float = 60.0,
        probe_every_s: float = 1.0,
        clock: Callable[[], float] = running_s,
        endpoint: str | None = None,
    ) -> None:
        self.endpoint = endpoint  # one server of a pool (pool.py): its rows go to the others while it is down
        self.give_up_s = give_up_s
        self.probe_every_s = probe_every_s
        self._clock = clock
        self.down_since: float | None = None
        self.cause = ""  # the last connection error, for the message
        self._probing = False
        self._next_probe = 0.0
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def failed(self, cause: str) -> None:
        """A request could not reach the server at all."""
        now = self._clock()
        if self.down_since is None:
            self.down_since = now
            self._next_probe = now + self.probe_every_s
            if self.endpoint is not None:
                log.warning(
                    "cannot reach %s (%s): its rows go to the other endpoints while it is probed", self.endpoint, cause
                )
            else:
                log.warning(
                    "cannot reach the server (%s): rows wait for it; the run stops if it stays unreachable for %g s",
                    cause,
                    self.give_up_s,
                )
        self.cause = cause
        self._probing = False
        self._notify()

    def answered(self) -> None:
        """The server answered (anything, even an error): it is there."""
        if self.down_since is not None:
            log.info("%s answers again after %.0f s", self.endpoint or "the server", self._clock() - self.down_since)
            self.down_since = None
        self._probing = False
        self._notify()

    def release(self) -> None:
        """The probe this task was given did not reach the server (the run stopped, a file changed, it was
        cancelled): another may go, rather than every row waiting for an answer that never comes."""
        if self._probing:
            self._probing = False
            self._notify()

    def probe_in_s(self) -> float | None:
        """Without taking anything (a pool asks this of each endpoint before it picks one): 0 when a request may go
        now (up, or a probe is due), the seconds until the next probe, or None while a probe is out."""
        if self.down_since is None:
            return 0.0
        if self._probing:
            return None
        return max(0.0, self._next_probe - self._clock())

    def take(self) -> None:
        """A pool sends a request here now: while the server is down, it is the probe (probe_in_s said one is due);
        unlike `admit`, a server given up on is still probed, as a pool waits for it while others answer."""
        if self.down_since is not None:
            self._probing = True
            self._next_probe = self._clock() + self.probe_every_s

    @property
    def gave_up(self) -> bool:
        return self.down_since is not None and self._clock() - self.down_since >= self.give_up_s

    async def admit(self) -> bool:
        """Wait until a request may go: at once while the server is up, else as the next probe.
        False once the server has been unreachable for `give_up_s`."""
        while self.down_since is not None:
            if self.gave_up:
                return False
            now = self._clock()
            if not self._probing and now >= self._next_probe:
                self._probing = True
                self._next_probe = now + self.probe_every_s
                return True
            give_up_in_s = self.down_since + self.give_up_s - now
            wait_s = give_up_in_s if self._probing else min(self._next_probe - now, give_up_in_s)
            event = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), max(0.0, wait_s) + 0.001)
        return True
