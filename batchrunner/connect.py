"""Where a job's requests go: OpenRouter, another server, or the built-in sandbox. Decided here, once.

`Connection(spec, sandbox=...)` checks the key when it is made (a SpecError before anything
is opened); `async with` it starts the sandbox when asked for, opens the HTTP client, and
knows the server's identity for the checkpoint (spec.server()). `run`, `estimate` and
`models` all connect through it; `status` and `export` only need the identity.
"""

from __future__ import annotations

from types import TracebackType

from batchrunner.client import MAX_REPLY_BYTES, Client
from batchrunner.preflight import api_key
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import SANDBOX_SERVER, JobSpec, env_base_url

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
            self.sandbox = Sandbox(self._sandbox_config)
            self.base_url = await self.sandbox.start()
        try:
            self._client = await Client(
                self.base_url,
                api_key=self.key,
                headers=self.spec.api.headers if self.spec else None,
                timeout_s=self._timeout_s,
                max_connections=self._max_connections,
                stream_max_s=self.spec.stream_max_s if self.spec else 3600.0,
                max_reply_bytes=int(self.spec.max_reply_mb * 2**20) if self.spec else MAX_REPLY_BYTES,
            ).__aenter__()
        except BaseException:
            await self._stop_sandbox()
            raise
        self._client.sandbox = self.sandbox is not None
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            if self._client is not None:
                await self._client.__aexit__(kind, error, trace)
                self._client = None
        finally:
            await self._stop_sandbox()

    async def _stop_sandbox(self) -> None:
        if self.sandbox is not None:
            await self.sandbox.stop()
