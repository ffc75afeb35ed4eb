"""A pool of servers answering the same models (`api.endpoints`): where each request goes. Shared by a run's pairs.

The flow (flow.py) decides what a pair takes; the pool decides only where each Ask is sent: to the endpoint with
the fewest requests outstanding, among those with room under their own cap whose server is up (or due a probe)
and whose circuit for the model is closed (or due a probe). Each endpoint has its own breaker (a 5xx storm opens
that endpoint's circuit, not the model's everywhere) and its own server watch (connections refused: the endpoint is
down, probed once a `probe_every_s`, and comes back at its first answer). A request that never reached an endpoint
is not an attempt (flow.unreachable), so its pair simply asks again and goes elsewhere: an endpoint going away
drains to the others with nothing failed and nothing paid twice. The run stops (server gone) only when every
endpoint has been unreachable for the spec's unreachable_timeout_s at once.

No HTTP here: an endpoint holds its client, and live.py's LiveAnswerer sends through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from batchrunner.breaker import Breaker, ServerWatch
from batchrunner.client import Client
from batchrunner.halt import Halt
from batchrunner.records import EndpointStats
from batchrunner.spec import JobSpec

MAX_WAIT_S = 1.0  # a pair waiting for an endpoint looks again at least this often (probes and cooldowns fall due)


class NoEndpoint(enum.Enum):
    """Why `Pool.take` found no endpoint to send to."""

    CIRCUITS_OPEN = "every endpoint's circuit for the model is open"  # the flow's circuit rules apply
    GONE = "every endpoint has been unreachable too long"  # the run stops: server gone


def display_url(url: str) -> str:
    """The base URL as the output and the summary show it: scheme, host, port and path, never a user name,
    password, query or fragment (spec.base_url_problem refuses credentials; this keeps the rule where it is shown)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class Endpoint:
    """One server of the pool: its client, its cap, its breaker and server watch, what it was asked."""

    url: str  # as shown: display_url
    client: Client
    cap: int
    breaker: Breaker
    server: ServerWatch
    outstanding: int = 0  # requests taken for it and not yet back
    stats: EndpointStats = field(default_factory=EndpointStats)

    def ready_in_s(self, model: str) -> float | None:
        """0 when a request for `model` may go now, else the seconds until its server's or circuit's probe falls
        due (None: waiting on a probe already out, or on a place under the cap)."""
        if self.outstanding >= self.cap:
            return None
        server = self.server.probe_in_s()
        circuit = self.breaker.probe_in_s(model)
        if server is None or circuit is None:
            return None
        return max(server, circuit)


class Pool:
    """The endpoints, and the choice of one for each request (`take`, then `give_back` when it is back)."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        if not endpoints:
            raise ValueError("a pool needs at least one endpoint")
        self.endpoints = list(endpoints)
        self._changed = asyncio.Event()

    @property
    def stats(self) -> dict[str, EndpointStats]:
        """Each endpoint's requests, ok and errors, by URL: the summary's lines (updated as requests come back)."""
        return {endpoint.url: endpoint.stats for endpoint in self.endpoints}

    def notify(self) -> None:
        """Something changed (a request came back, the run is stopping): pairs waiting for an endpoint look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    def failed_probes(self, model: str) -> int:
        """The failed probes of `model` on every endpoint: what a pair waiting on open circuits is charged."""
        return sum(endpoint.breaker.failed_probes(model) for endpoint in self.endpoints)

    def last_failure(self, model: str) -> str:
        return next((f for e in self.endpoints if (f := e.breaker.last_failure(model))), "")

    def pick(self, model: str) -> Endpoint | None:
        """The endpoint a request for `model` goes to now, or None: of those ready, the fewest outstanding (a tie
        goes to the one listed first). A server or circuit due a probe is preferred, so that the probe goes."""
        best: Endpoint | None = None
        best_key: tuple[int, int] | None = None
        for endpoint in self.endpoints:
            if endpoint.ready_in_s(model) != 0:
                continue
            probing = endpoint.server.down_since is not None or endpoint.breaker.is_open(model)
            key = (0 if probing else 1, endpoint.outstanding)
            if best_key is None or key < best_key:
                best, best_key = endpoint, key
        return best

    async def take(self, model: str, halt: Halt) -> Endpoint | NoEndpoint | None:
        """An endpoint for one request to `model`, counted outstanding (give it back), as soon as one is ready;
        NoEndpoint when none will be (every circuit open, or every server gone); None once the run is stopping
        (the answerer tells the halt to `notify` the pool, so a waiting pair sees it at once)."""
        while True:
            if halt.stopping:
                return None
            if all(endpoint.server.gave_up for endpoint in self.endpoints):
                return NoEndpoint.GONE
            endpoint = self.pick(model)
            if endpoint is not None:
                endpoint.server.take()  # after the last await: the probe, if it is one, is this request's
                endpoint.outstanding += 1
                return endpoint
            if all(endpoint.breaker.is_open(model) and endpoint.breaker.probe_in_s(model) != 0 for endpoint in self):
                return NoEndpoint.CIRCUITS_OPEN
            await self._changed_within(self._wait_s(model))

    def give_back(self, endpoint: Endpoint) -> None:
        endpoint.outstanding -= 1
        self.notify()

    async def wait_circuits(self, model: str) -> None:
        """Wait until some endpoint's circuit for `model` changes or falls due a probe (every one was open)."""
        await self._changed_within(self._wait_s(model))

    def _wait_s(self, model: str) -> float:
        due = [s for endpoint in self.endpoints if (s := endpoint.ready_in_s(model)) is not None]
        return min([MAX_WAIT_S, *due])

    async def _changed_within(self, timeout_s: float) -> None:
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(timeout_s, 0.001))

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self.endpoints)


def pool_of(spec: JobSpec, clients: Sequence[tuple[str, Client, int]]) -> Pool:
    """The spec's pool (api.endpoints) over these clients (URL, client, cap), each endpoint with its own breaker
    and server watch."""
    give_up_s = spec.unreachable_timeout_s
    return Pool(
        [
            Endpoint(shown, client, cap, Breaker(), ServerWatch(give_up_s=give_up_s, endpoint=shown))
            for shown, client, cap in ((display_url(url), client, cap) for url, client, cap in clients)
        ]
    )
