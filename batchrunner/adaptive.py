"""How many requests may be in flight when the server gives no limit (`concurrency: auto`). Pure.

Self-hosted servers (vLLM, TGI, LiteLLM in front of a GPU) publish no rate or credits: too few
requests in flight leaves the GPU idle, too many queues them (latency climbs) until the server
sheds load with 429 or 503. The limit is found as TCP finds a link's capacity, additive increase,
multiplicative decrease (AIMD): each window of `limit` answers whose latency holds (within
`latency_tolerance` of the best seen) raises the limit by one; a 429 or 503 halves it, at most
once per window of `limit` answers or overloads (one overload sheds many requests at once: it is
one signal, not many). The
limit stays between `floor` and the ceiling the spec sets (`max_concurrency`).

No clock and no asyncio: the driver (live.py) reports each answer's latency and each overload,
and asks `limit` before sending.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Aimd:
    """The in-flight limit, learned from answers (latency) and overloads (429, 503)."""

    ceiling: int
    start: int = 4
    floor: int = 1
    latency_tolerance: float = 2.0  # latency holds while within this many times the best seen
    limit: float = field(init=False)
    reached: int = field(init=False)  # the highest limit held, for the summary
    best_latency_s: float | None = field(default=None, init=False)
    _since_change: int = field(default=0, init=False)  # answers since the limit last changed
    _since_cut: int | None = field(default=None, init=False)  # answers since the last cut; None: never cut

    def __post_init__(self) -> None:
        self.limit = float(max(self.floor, min(self.start, self.ceiling)))
        self.reached = int(self.limit)

    @property
    def allowed(self) -> int:
        """Requests that may be in flight now."""
        return int(self.limit)

    def answered(self, latency_s: float) -> None:
        """An answer: raise the limit by one per window of answers whose latency held, none if it did not."""
        if self.best_latency_s is None or latency_s < self.best_latency_s:
            self.best_latency_s = latency_s
        self._since_change += 1
        if self._since_cut is not None:
            self._since_cut += 1
        if latency_s > self.best_latency_s * self.latency_tolerance:
            return  # queueing at the server: hold, do not climb into it
        if self._since_change >= self.allowed and self.limit < self.ceiling:
            self.limit = min(float(self.ceiling), self.limit + 1)
            self.reached = max(self.reached, self.allowed)
            self._since_change = 0

    def overloaded(self) -> None:
        """A 429 or 503: halve the limit, once per window (the other requests of the same burst say the same). The
        window counts overloads as well as answers: sheds keep coming from requests sent at the halved limit when no
        answer comes back in between (a slow server at capacity), and they are a new signal."""
        if self._since_cut is not None and self._since_cut < self.allowed:
            self._since_cut += 1
            return
        self.limit = max(float(self.floor), self.limit / 2)
        self._since_change = 0
        self._since_cut = 0
