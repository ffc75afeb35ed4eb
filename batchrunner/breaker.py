"""A circuit breaker per model: a model that keeps failing is not hammered.

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger("batchrunner")

Decision = Literal["send", "probe", "skip"]


@dataclass
class _Circuit:
    failures: int = 0  # in a row
    open_until: float | None = None  # None: closed
    cooldown_s: float = 0.0
    probing: bool = False
    failed_probes: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Breaker:
    def __init__(
        self,
        *,
        threshold: int = 5,
        cooldown_s: float = 30.0,
        max_cooldown_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
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

    def record(self, model: str, *, ok: bool) -> None:
        """The outcome of a request that tells about the model's health (not 429s, not bad rows)."""
        circuit = self._circuit(model)
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
