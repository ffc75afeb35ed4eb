"""A chat completions server on loopback that answers from a script, for tests that need one exact reply.

The sandbox simulates a whole provider with faults drawn at random; some promises are about what the
tool does with one particular reply (a 429 with a given Retry-After, a cost the prices cannot
explain). `Scripted` answers its requests, in order, with the replies it was given, then with a
plain answer, and notes when each request arrived and what it asked. GET routes (`/models`, `/key`,
...) answer from scripts of their own, given by path: in order, then the last reply again (a server's
steady state); a path without a script is a 404, as on a server that does not have it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Reply:
    """One scripted reply: a status, a JSON body, headers (a function of the arrival time, for reset times);
    or, with `drop`, none: the connection is closed."""

    status: int = 200
    body: dict[str, Any] | None = None  # None: a plain answer
    headers: dict[str, str] | Callable[[float], dict[str, str]] = field(default_factory=dict)
    # Writes the reply itself (a stream, a bomb, a body that never ends), given the request and a prepared
    # response; `status` and `headers` are already set on it.
    write: Callable[[web.Request, web.StreamResponse], Awaitable[None]] | None = None
    drop: bool = False  # close the connection without an answer (the client sees a dropped connection)


def answer(
    text: str = "ok", *, prompt_tokens: int = 10, completion_tokens: int = 2, cost_usd: float | None = None
) -> dict[str, Any]:
    """A chat completion as OpenRouter writes it, with its usage (and usage.cost when given)."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cost_usd is not None:
        usage["cost"] = cost_usd
    return {
        "id": "gen-scripted",
        "object": "chat.completion",
        "created": 0,
        "model": "openai/gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": usage,
    }


class Scripted:
    """`async with Scripted([Reply(429, ...), ...]) as server:` then point a client at `server.base_url`."""

    def __init__(self, replies: list[Reply] | None = None, *, gets: dict[str, list[Reply]] | None = None) -> None:
        self.replies = list(replies or [])
        self.gets = {path: list(script) for path, script in (gets or {}).items()}  # "/models" -> its replies
        self.arrivals_s: list[float] = []  # time.monotonic() of each request's arrival
        self.bodies: list[dict[str, Any]] = []
        self.got: list[tuple[str, float]] = []  # (path, time.monotonic()) of each GET
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def _get(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        self.got.append((path, time.monotonic()))
        script = self.gets.get(path)
        if not script:
            return web.json_response({"error": {"code": 404, "message": f"no route {path}"}}, status=404)
        reply = script.pop(0) if len(script) > 1 else script[0]
        if reply.drop:
            assert request.transport is not None
            request.transport.close()
            return web.Response()  # never reaches the client: its connection is gone
        headers = reply.headers(time.time()) if callable(reply.headers) else reply.headers
        return web.json_response(reply.body or {}, status=reply.status, headers=headers)

    def gets_of(self, path: str) -> int:
        """How many GETs of `path` arrived."""
        return sum(1 for got, _ in self.got if got == path)

    async def _chat(self, request: web.Request) -> web.Response:
        self.arrivals_s.append(time.monotonic())
        self.bodies.append(await request.json())
        reply = self.replies.pop(0) if self.replies else Reply()
        headers = reply.headers(time.time()) if callable(reply.headers) else reply.headers
        if reply.write is not None:
            response = web.StreamResponse(status=reply.status, headers=headers)
            await response.prepare(request)
            await reply.write(request, response)
            return response
        return web.json_response(reply.body or answer(), status=reply.status, headers=headers)

    async def __aenter__(self) -> Scripted:
        app = web.Application()
        app.router.add_post("/api/v1/chat/completions", self._chat)
        app.router.add_post("/elsewhere/chat/completions", self._chat)  # a redirect's target on the same origin
        app.router.add_get("/api/v1/{path:.+}", self._get)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/api/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
