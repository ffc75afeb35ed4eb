"""Where a job's requests go: OpenRouter, another server, or the built-in sandbox. Decided here, once.

`Connection(spec, sandbox=...)` checks the key when it is made (a SpecError before anything
is opened); `async with` it starts the sandbox when asked for, opens the HTTP client, and
knows the server's identity for the checkpoint (spec.server()). `run`, `estimate` and
`models` all connect through it; `status` and `export` only need the identity.

With a pool (`api.endpoints`, not under --sandbox) it opens one client per endpoint, each with its own key and
its cap of connections (`endpoint_clients`); `client` is the first endpoint's, which answers the start-up
questions (the key, the models) for the pool.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from batchrunner.client import MAX_REPLY_BYTES, Client
from batchrunner.preflight import api_key
from batchrunner.sandbox import SandboxConfig
from batchrunner.spec import SANDBOX_SERVER, JobSpec, env_base_url

if TYPE_CHECKING:
    from batchrunner.sandbox import Sandbox

SANDBOX_KEY = "sk-or-v1-sandbox-not-a-real-key"


class Connection:
    """A job's client to its server (or to a sandbox started for it), as an async context."""

    def __init__(
        self,
        spec: JobSpec | None,
        *,
        sandbox: SandboxConfig | None = None,
        timeout_s: float | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.spec = spec
        self._sandbox_config = sandbox
        self.key: str | None
        if sandbox is not None:
            self.base_url, self.key = "", SANDBOX_KEY
        elif spec is not None and spec.api.endpoints:  # a pool: the first endpoint's key asks the start-up questions
            self.base_url = spec.base_url()
            self.key = api_key(spec, self.base_url, endpoint=0)
        elif spec is not None:
            self.base_url = spec.base_url()
            self.key = api_key(spec, self.base_url)
        else:  # `batchrunner models`: no job, no key needed
            self.base_url = env_base_url()
            self.key = None
        self.server = (
            spec.server(sandbox=sandbox is not None) if spec else (SANDBOX_SERVER if sandbox is not None else "")
        )
        self._timeout_s = timeout_s or (spec.timeout_s if spec else 60.0)
        self._max_connections = max_connections or (spec.most_in_flight if spec else 16)
        self.sandbox: Sandbox | None = None
        self._client: Client | None = None
        # A pool's endpoints: (URL, key, cap), each key checked now, as the one above is
        self._pool = (
            [(url, api_key(spec, url, endpoint=i), cap) for i, (url, cap) in enumerate(spec.endpoint_caps())]
            if spec is not None and sandbox is None
            else []
        )
        self.endpoint_clients: list[tuple[str, Client, int]] = []  # (URL, its client, its cap), once connected

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("use the connection as `async with Connection(...) as connection:`")
        return self._client

    @property
    def strict(self) -> bool:
        """Whether OpenRouter's rules apply: its model list, its parameters (OpenRouter or the sandbox)."""
        return self.sandbox is not None or self.client.openrouter

    async def __aenter__(self) -> Connection:
        if self._sandbox_config is not None:
            from batchrunner.sandbox import Sandbox  # only a sandboxed run imports the server

            self.sandbox = Sandbox(self._sandbox_config)
            self.base_url = await self.sandbox.start()
        try:
            if self._pool:
                for url, key, cap in self._pool:
                    client = await self._open(url, key, cap)
                    self.endpoint_clients.append((url, client, cap))
                self._client = self.endpoint_clients[0][1]
            else:
                self._client = await self._open(self.base_url, self.key, self._max_connections)
        except BaseException:
            await self._close_clients(None, None, None)
            await self._stop_sandbox()
            raise
        self._client.sandbox = self.sandbox is not None
        return self

    async def _open(self, base_url: str, key: str | None, max_connections: int) -> Client:
        return await client_for(self.spec, base_url, key, max_connections, timeout_s=self._timeout_s).__aenter__()

    async def _close_clients(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        clients = [client for _, client, _ in self.endpoint_clients] or ([self._client] if self._client else [])
        self.endpoint_clients, self._client = [], None
        for client in clients:
            await client.__aexit__(kind, error, trace)

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            await self._close_clients(kind, error, trace)
        finally:
            await self._stop_sandbox()

    async def _stop_sandbox(self) -> None:
        if self.sandbox is not None:
            await self.sandbox.stop()


def client_for(
    spec: JobSpec | None, base_url: str, key: str | None, max_connections: int, *, timeout_s: float | None = None
) -> Client:
    """A client to `base_url` with the spec's headers, timeouts and reply cap (not yet opened: `async with` it)."""
    return Client(
        base_url,
        api_key=key,
        headers=spec.api.headers if spec else None,
        timeout_s=timeout_s or (spec.timeout_s if spec else 60.0),
        max_connections=max_connections,
        stream_max_s=spec.stream_max_s if spec else 3600.0,
        max_reply_bytes=int(spec.max_reply_mb * 2**20) if spec else MAX_REPLY_BYTES,
    )
