"""The OpenRouter HTTP client: the only module that speaks aiohttp.

Every way a request can go wrong (an HTTP status, an error inside a 200, an empty answer,
a dropped connection, a timeout) leaves this module as one of the ApiError classes of
errors.py, decided once by `classify`. Everything else sees a `Completion` or an ApiError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import io
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError

from batchrunner.clock import within
from batchrunner.costs import ZERO_USD, Usage, to_decimal
from batchrunner.errors import (
    ApiError,
    FatalApiError,
    RateLimited,
    RequestRejected,
    TransientError,
    first_line,
)
from batchrunner.media import EncodedBody, encode_body
from batchrunner.spec import is_openrouter

TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 524, 529})
REJECTED_STATUSES = frozenset({400, 404, 413, 422})
BUDGET_LIMIT_SOURCES = frozenset(
    {"openrouter_guardrail_budget", "openrouter_workspace_budget", "openrouter_key_limit", "openrouter_credits"}
)
FREE_DAILY_MARKERS = ("free-models-per-day", "openrouter_free_tier_daily")
CONNECT_TIMEOUT_S = 30.0  # a server that does not accept a connection in this time is unreachable
MAX_TOKEN_COUNT = 2**31 - 1  # more tokens than any model's context: a reply claiming more is malformed
MAX_REPORTED_COST_USD = Decimal(10_000)  # no single request costs this: a reported cost above it is not used
MAX_REPLY_BYTES = 64 * 2**20  # a completion (whole or streamed) longer than this is not an answer (max_reply_mb)
MAX_LISTING_BYTES = 256 * 2**20  # /models, a batch and its results: large, never gigabytes
SANDBOX_MARK = "x_batchrunner_sandbox"  # a key the built-in sandbox adds to its batch listing
MAX_LISTING_PAGES = 1000  # pages of GET /batches read to find one batch
MAX_REDIRECTS = 5  # same-origin redirects followed for one request
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
READ_CHUNK_BYTES = 2**16
LARGE_BODY_BYTES = 2**20  # aiohttp writes a larger bytes body in one go, holding up the event loop


@dataclass(frozen=True)
class Completion:
    """A usable answer."""

    text: str
    model: str  # the model that answered, as the response says
    finish_reason: str | None
    usage: Usage
    generation_id: str | None
    provider: str | None
    latency_s: float
    tool_calls: list[dict[str, Any]] | None = None
    refusal: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    ttft_s: float | None = None  # streamed: seconds from sending to the first token
    service_tier: str | None = None  # the tier that served it, as the response says (flex, default, priority)


def _object_of(payload: Any) -> dict[str, Any]:
    """A start-up answer's object: its `data` (or the payload itself, as older servers answer) when that is a JSON
    object; {} for any other shape, a server that said nothing we can read (never an AttributeError later)."""
    data = payload.get("data", payload) if isinstance(payload, dict) else None
    return data if isinstance(data, dict) else {}


class Client:
    """An async client for OpenRouter or any OpenAI-compatible server.

    Use as `async with Client(...) as client:`; the session (and its connection pool) is
    created inside the running event loop and closed on exit. The API key goes into the
    Authorization header and nowhere else: it is never logged, printed or put in a repr.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 300.0,
        max_connections: int = 100,
        stream_max_s: float = 3600.0,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.openrouter = is_openrouter(self.base_url + "/")  # its key format and hints apply
        self.sandbox = False  # the built-in sandbox (it says so in its batch listing): OpenRouter's shapes
        self._connect_timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s
        self.stream_max_s = stream_max_s  # the longest a streamed answer may take, keep-alives or not
        self.max_reply_bytes = max_reply_bytes
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"

    async def __aenter__(self) -> Client:
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=self._max_connections)
        self._session = aiohttp.ClientSession(headers=self._headers, connector=connector)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- requests -------------------------------------------------------------------------

    async def chat(self, body: dict[str, Any], *, timeout_s: float | None = None) -> Completion:
        """POST /chat/completions; a Completion, or an ApiError saying what to do about it."""
        return await self._complete("/chat/completions", body, timeout_s)

    async def text_completion(self, body: dict[str, Any], *, timeout_s: float | None = None) -> Completion:
        """POST /completions (a raw `prompt`, answered in `choices[0].text`)."""
        return await self._complete("/completions", body, timeout_s)

    async def key_info(self) -> dict[str, Any]:
        """GET /key (falling back to the older /auth/key): the key's limit and what remains."""
        try:
            payload, _ = await self._get("/key")
        except RequestRejected as exc:
            if exc.status != 404:
                raise
            payload, _ = await self._get("/auth/key")
        return _object_of(payload)

    async def models(self) -> list[dict[str, Any]]:
        """GET /models: every model with its pricing (USD per token, as strings)."""
        payload, _ = await self._get("/models")
        data = payload.get("data") if isinstance(payload, dict) else None
        return [model for model in data if isinstance(model, dict)] if isinstance(data, list) else []

    async def endpoints(self, model: str) -> list[dict[str, Any]]:
        """GET /models/{author}/{slug}/endpoints: the providers that serve `model`, with what each supports."""
        payload, _ = await self._get(f"/models/{quote(model, safe='/:')}/endpoints")
        data = payload.get("data") if isinstance(payload, dict) else None
        found = data.get("endpoints") if isinstance(data, dict) else None
        return [item for item in found if isinstance(item, dict)] if isinstance(found, list) else []

    async def generation(self, generation_id: str) -> dict[str, Any]:
        """GET /generation?id=...: the stats OpenRouter kept for one generation."""
        payload, _ = await self._get("/generation", params={"id": generation_id})
        return _object_of(payload)

    # -- the Batch API ----------------------------------------------------------------------

    async def submit_batch(
        self, model: str, requests: list[dict[str, Any]], *, timeout_s: float = 300.0
    ) -> dict[str, Any]:
        """POST /batches: `endpoint` and `model` written before `requests`, as OpenRouter stream-parses the body."""
        head = json.dumps({"endpoint": "/v1/chat/completions", "model": model})[:-1]
        text = f'{head}, "requests": {json.dumps(requests, ensure_ascii=False)}}}'
        payload, _ = await self._request(
            "POST", "/batches", raw_body=text, timeout_s=timeout_s, max_bytes=MAX_LISTING_BYTES
        )
        return _batch_object(payload)

    async def batch(self, batch_id: str) -> dict[str, Any]:
        """GET /batches/{id}: its status and counts, and its results once completed."""
        payload, _ = await self._request(
            "GET", f"/batches/{batch_id}", timeout_s=min(self.timeout_s, 120.0), max_bytes=MAX_LISTING_BYTES
        )
        return _batch_object(payload)

    async def batches(self, *, max_pages: int = MAX_LISTING_PAGES) -> list[dict[str, Any]]:
        """GET /batches, every page: the workspace's batches, newest first (without results). Paged by cursor
        (`next_cursor`, `has_more`) or, as the SDK knows it, by `after` (the last id seen)."""
        found: list[dict[str, Any]] = []
        params: dict[str, str] = {}
        for _ in range(max_pages):
            payload, _ = await self._get("/batches", params=params or None)
            page = _page(payload)
            self.sandbox = self.sandbox or payload.get(SANDBOX_MARK) is True
            found += page.items
            if page.next_cursor:
                params = {"cursor": page.next_cursor}
            elif page.more and page.items and isinstance(page.items[-1].get("id"), str):
                params = {"after": page.items[-1]["id"]}
            else:
                return found
        raise TransientError(f"the batch listing goes on past {max_pages} pages", code="listing_too_long")

    async def batch_results(self, batch_id: str, cursor: str | None = None, *, limit: int = 1000) -> BatchPage:
        """GET /batches/{id}/results: one page of a batch's results, from `cursor` (None: the first)."""
        params = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
        payload, _ = await self._request(
            "GET",
            f"/batches/{batch_id}/results",
            params=params,
            timeout_s=min(self.timeout_s, 120.0),
            max_bytes=MAX_LISTING_BYTES,
        )
        return _page(payload)

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """POST /batches/{id}/cancel: the batch goes `cancelling`, then `cancelled` (no result rows; what
        finished before is billed). Not DELETE, which deletes a final batch and its results."""
        payload, _ = await self._request(
            "POST", f"/batches/{batch_id}/cancel", timeout_s=min(self.timeout_s, 60.0), max_bytes=MAX_LISTING_BYTES
        )
        return _batch_object(payload)

    # -- plumbing -------------------------------------------------------------------------

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use the client as `async with Client(...) as client:`")
        return self._session

    async def _complete(self, path: str, body: dict[str, Any], timeout_s: float | None) -> Completion:
        started = time.monotonic()
        stream = _Stream(started) if body.get("stream") is True else None
        payload, status = await self._request(
            "POST", path, json_body=body, timeout_s=timeout_s, stream=stream, max_bytes=self.max_reply_bytes
        )
        completion = parse_completion(payload, status=status, latency_s=time.monotonic() - started)
        if stream is not None and stream.first_token_s is not None:
            completion = dataclasses.replace(completion, ttft_s=stream.first_token_s - started)
        return completion

    async def _get(self, path: str, params: dict[str, str] | None = None) -> tuple[Any, int]:
        return await self._request(
            "GET", path, params=params, timeout_s=min(self.timeout_s, 60.0), max_bytes=MAX_LISTING_BYTES
        )

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: dict[str, Any] | None = None,
        raw_body: str | None = None,
        params: dict[str, str] | None = None,
        timeout_s: float | None,
        stream: _Stream | None = None,
        max_bytes: int = MAX_REPLY_BYTES,
    ) -> tuple[Any, int]:
        """One request and its whole reply, within `timeout_s` of running time (clock.py: a suspended process
        is not a slow server); a stream within `stream_max_s`, silent at most `timeout_s` at a time. A reply
        may expand to `max_bytes` at most. Redirects are followed within the base URL's origin only: a
        prompt never goes to a host the job did not name."""
        session = self._require_session()
        total_s = timeout_s or self.timeout_s
        connect = self._connect_timeout(total_s)
        url = self.base_url + path
        encoded: EncodedBody | None = None
        got_headers = False
        try:
            async with within(self.stream_max_s if stream is not None else total_s):
                for _ in range(MAX_REDIRECTS + 1):
                    encoded, data, sent_headers = _request_body(json_body, raw_body)
                    sending = session.request(
                        method,
                        url,
                        data=data,
                        headers=sent_headers,
                        params=params,
                        timeout=connect,
                        allow_redirects=False,
                    )
                    if stream is None:
                        response = await sending
                    else:  # a stream's first bytes come within the silence a stream may keep
                        async with _silence(total_s):
                            response = await sending
                    async with response:
                        status, headers = response.status, response.headers
                        if status in REDIRECT_STATUSES:
                            url = self._redirected(url, status, headers.get("Location"))
                            params = None  # the Location carries its own query
                            continue
                        if (
                            stream is not None
                            and status == 200
                            and "text/event-stream" in headers.get("Content-Type", "")
                        ):
                            return await stream.read(response, idle_s=total_s, max_bytes=max_bytes), status
                        got_headers = True  # from here a failure abandons a reply the server may have billed
                        if stream is None:
                            body = await _read_capped(response, max_bytes)
                        else:  # a stream asked for and a whole reply sent: it too may be silent at most timeout_s
                            async with _silence(total_s):
                                body = await _read_capped(response, max_bytes)
                    break
                else:
                    raise RequestRejected(f"more than {MAX_REDIRECTS} redirects", status=status, code="redirect")
        except (_StreamSilent, TimeoutError, aiohttp.ClientError, HttpProcessingError) as exc:
            raise self._failure(
                exc, total_s, streaming=stream is not None, encoded=encoded, got_headers=got_headers
            ) from None
        return self._payload(status, body, headers), status

    def _connect_timeout(self, total_s: float) -> aiohttp.ClientTimeout:
        """aiohttp's timeout for a request of `total_s`: only connecting is bounded by it (clock.within bounds the
        whole, in running time). One per timeout_s: the same few for a whole run."""
        connect = self._connect_timeouts.get(total_s)
        if connect is None:
            connect = self._connect_timeouts[total_s] = aiohttp.ClientTimeout(
                total=None, sock_connect=min(total_s, CONNECT_TIMEOUT_S)
            )
        return connect

    def _failure(
        self, exc: BaseException, total_s: float, *, streaming: bool, encoded: EncodedBody | None, got_headers: bool
    ) -> Exception:
        """The error a request's failure is, as the rest of batchrunner knows errors (errors.py): told apart in the
        order they were caught in, most specific first (a connect timeout is a TimeoutError and a ClientError too).
        `got_headers`: the reply had begun, so the server may have billed an answer this abandons."""
        if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):  # never reached the server
            detail = str(exc) or type(exc).__name__
            return TransientError(f"cannot connect: {detail}", code="unreachable")
        if isinstance(exc, _StreamSilent):
            return TransientError(
                f"the stream was silent for {total_s:g} s (timeout_s)", code="timeout", abandoned=True
            )
        if isinstance(exc, TimeoutError):
            if streaming:  # not retried: the same answer would take as long again, and be paid again
                return RequestRejected(
                    f"the stream went on past {self.stream_max_s:g} s (stream_max_s)",
                    code="stream_too_long",
                    abandoned=True,
                )
            return TransientError(f"no answer within {total_s:g} s", code="timeout", abandoned=True)
        if isinstance(exc, aiohttp.ClientError):  # dropped connections, refused connections, bad payloads
            if encoded is not None and encoded.failure is not None:  # a file could not be sent: the body stopped short
                return encoded.failure
            detail = str(exc) or type(exc).__name__
            return TransientError(f"connection failed: {detail}", code="connection", abandoned=got_headers)
        # a reply that is not HTTP as aiohttp reads it (a header line too long)
        detail = first_line(exc) or type(exc).__name__
        return TransientError(f"the reply is not valid HTTP ({detail})", code="bad_reply", abandoned=True)

    def _payload(self, status: int, body: bytes, headers: Any) -> Any:
        """A whole reply's JSON, or the error its status says (classified once, here)."""
        payload = _parse_json(body)
        if status >= 400 or status < 200:
            error = classify(status, payload, headers)
            if error.code == "auth" and self.openrouter:
                error.message += " (OpenRouter keys start with sk-or-v1-)"
            raise error
        if payload is None:
            raise TransientError(
                f"HTTP {status} with a body that is not JSON: {body[:120].decode('utf-8', errors='replace')!r}",
                status=status,
                code="bad_body",
            )
        return payload

    def _redirected(self, url: str, status: int, location: str | None) -> str:
        """Where a redirect points, if it stays on the base URL's origin; else the request's error, naming it."""
        target = urljoin(url, location or "")
        if not location or _origin(target) != _origin(self.base_url):
            where = _origin(target) if location else "nowhere (no Location)"
            raise RequestRejected(
                f"the server redirected to {where}; not followed, as prompts go only to {_origin(self.base_url)}: "
                "if that server is yours, set api.base_url to it",
                status=status,
                code="redirect",
            )
        return target


def _request_body(
    json_body: dict[str, Any] | None, raw_body: str | None
) -> tuple[EncodedBody | None, Any, dict[str, str]]:
    """What a request sends: the encoded JSON body (None for a raw one), the data aiohttp sends, its headers. A
    body's files are streamed into it as base64 (media.py), never built whole in memory; made afresh for each
    redirect, as a stream is read once."""
    encoded = encode_body(json_body) if json_body is not None else None
    data: Any = raw_body.encode() if raw_body is not None else None
    sent_headers = {}
    if encoded is not None:
        data = encoded.chunks() if encoded.streamed else encoded.whole()
        if isinstance(data, bytes) and len(data) > LARGE_BODY_BYTES:  # sent in pieces, not at once
            data = io.BytesIO(data)
        sent_headers["Content-Length"] = str(encoded.length)
    return encoded, data, sent_headers


class _StreamSilent(Exception):
    """Internal: a stream sent nothing for its whole idle allowance."""


@contextlib.asynccontextmanager
async def _silence(idle_s: float) -> AsyncIterator[None]:
    """A wait on a stream that may last `idle_s` at most: past it, _StreamSilent (within the stream's whole
    bound, whose own TimeoutError says the stream went on too long)."""
    try:
        async with within(idle_s):
            yield
    except TimeoutError:
        raise _StreamSilent from None


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """A reply's body, decompressed, if it fits in `max_bytes`: a gzip bomb is cut off, not held in memory."""
    declared = response.content_length
    if declared is not None and not response.headers.get("Content-Encoding"):
        if declared > max_bytes:
            raise _too_large(max_bytes)
        return await response.read()  # as long as it says: aiohttp reads no further
    parts: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(max_bytes: int) -> RequestRejected:
    return RequestRejected(
        f"the reply passed {max_bytes / 2**20:g} MB (max_reply_mb); the rest was not read",
        code="reply_too_large",
        abandoned=True,
    )


def _origin(url: str) -> str:
    """scheme://host[:port], as a browser's same-origin rule compares them (the default port made explicit)."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


class _Stream:
    """Reads an answer sent as server-sent events into the shape of a whole answer, for parse_completion.

    The body is read as bytes and split into lines here (a `data:` line may be as long as the stream's
    cap: large tool-call arguments, image deltas), each read waiting at most the idle allowance.
    `: OPENROUTER PROCESSING` comments keep the connection alive and are skipped; `delta`s are
    joined (content, refusal, tool calls by index); an `error` chunk (a 200 already sent) and
    the final chunk's `usage` are kept; a stream that ends without a finish_reason was cut off."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.first_token_s: float | None = None  # monotonic time of the first content

    async def _lines(self, response: aiohttp.ClientResponse, idle_s: float, max_bytes: int) -> AsyncIterator[bytes]:
        """The body's lines (without their ends), until it ends or the connection closes. A line that
        spans many chunks is kept as its pieces until its end comes: joined once, not once a chunk."""
        pieces: list[bytes] = []  # the start of a line whose end has not come yet
        received = 0
        while True:
            try:
                async with _silence(idle_s):
                    chunk = await response.content.readany()
            except (aiohttp.ClientPayloadError, ConnectionError):  # the connection closed mid-answer: read() says cut
                return
            if not chunk:
                break
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes)
            if b"\n" not in chunk and b"\r" not in chunk:
                pieces.append(chunk)
                continue
            lines = (b"".join(pieces) + chunk if pieces else chunk).splitlines(keepends=True)
            pieces = [lines.pop()] if not lines[-1].endswith((b"\n", b"\r")) else []
            for line in lines:
                yield line.rstrip(b"\r\n")
        if pieces:
            yield b"".join(pieces)

    async def read(self, response: aiohttp.ClientResponse, *, idle_s: float, max_bytes: int) -> dict[str, Any]:
        payload: dict[str, Any] = {}
        text: list[str] = []
        refusal: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        choice: dict[str, Any] = {"index": 0, "finish_reason": None}
        done = False
        async for raw in self._lines(response, idle_s, max_bytes):
            line = raw.decode("utf-8", errors="replace")
            if not line.startswith("data:"):
                continue  # a blank line between events, or a `:` comment (a keep-alive)
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = _parse_json(data)
            if not isinstance(chunk, dict):
                raise TransientError(f"a stream chunk that is not a JSON object: {data[:120]!r}", code="malformed")
            for key in ("id", "model", "provider", "service_tier"):
                if chunk.get(key) is not None:
                    payload[key] = chunk[key]
            if chunk.get("usage") is not None:
                payload["usage"] = chunk["usage"]
            if chunk.get("error") is not None:
                payload["error"] = chunk["error"]
            choices = chunk.get("choices")
            first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
            delta = _mapping(first.get("delta"))
            if isinstance(delta.get("content"), str) and delta["content"]:
                text.append(delta["content"])
                if self.first_token_s is None:
                    self.first_token_s = time.monotonic()
            if isinstance(delta.get("refusal"), str):
                refusal.append(delta["refusal"])
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    _merge_call(calls, call)
                    if self.first_token_s is None:
                        self.first_token_s = time.monotonic()
            if first.get("finish_reason") is not None:
                choice["finish_reason"] = first["finish_reason"]
            if first.get("error") is not None:
                choice["error"] = first["error"]
        if not done and choice["finish_reason"] is None and "error" not in payload:
            usage = _usage(payload.get("usage")) if isinstance(payload.get("usage"), dict) else None
            raise TransientError(  # what it generated until then may have been billed
                "the stream was cut off before the answer ended", code="stream_cut", usage=usage, abandoned=True
            )
        message: dict[str, Any] = {"role": "assistant", "content": "".join(text), "refusal": "".join(refusal) or None}
        if calls:
            message["tool_calls"] = [calls[index] for index in sorted(calls)]
        payload["choices"] = [{**choice, "message": message}] if choice["finish_reason"] or text or calls else []
        return payload


def _merge_call(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    """A tool call arrives in pieces: its id, type and name once, its arguments in fragments."""
    index = delta["index"] if isinstance(delta.get("index"), int) else len(calls)
    call = calls.setdefault(index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    for key in ("id", "type"):
        if isinstance(delta.get(key), str):
            call[key] = delta[key]
    function = _mapping(delta.get("function"))
    if isinstance(function.get("name"), str):
        call["function"]["name"] += function["name"]
    if isinstance(function.get("arguments"), str):
        call["function"]["arguments"] += function["arguments"]


@dataclass(frozen=True)
class BatchPage:
    """One page of a paged listing (batches, or a batch's results): its items, and where the next one starts."""

    items: list[dict[str, Any]]
    next_cursor: str | None
    more: bool


def _page(payload: Any) -> BatchPage:
    """`{data, has_more, next_cursor}`, checked: a list of objects, a cursor that is a string."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise TransientError("a page whose data is not a list of objects", code="malformed")
    cursor, more = payload.get("next_cursor"), payload.get("has_more")
    follow = isinstance(cursor, str) and cursor and more is not False  # a cursor is followed unless told it ends
    return BatchPage(data, cursor if follow else None, more is True)


def _batch_object(payload: Any) -> dict[str, Any]:
    """A batch object from the API, checked for what batchrunner reads: an id, a status, counts."""
    if (
        not isinstance(payload, dict)
        or not isinstance(payload.get("id"), str)
        or not isinstance(payload.get("status"), str)
    ):
        raise TransientError("a batch answer without an id and a status", code="malformed")
    results = payload.get("results")
    if results is not None and not (isinstance(results, list) and all(isinstance(r, dict) for r in results)):
        raise TransientError("a batch's results are not a list of objects", code="malformed")
    return payload


def _parse_json(body: bytes | str) -> Any:
    """JSON from a body that OpenRouter may precede with whitespace keep-alives; None if it is not
    JSON, or nested too deeply to parse.

    orjson reads a reply 2-3x as fast as the standard library (bench/speed.py's 400-byte and 64 KB
    answers); what it refuses (bytes that are not UTF-8, a lone surrogate's escape, NaN, a number past a
    double, nesting past 1,024) goes to json as before, which reads more of it. Where both read a body
    they agree, but for whole numbers past 64 bits, which orjson reads as floats: no field batchrunner
    takes from a reply can hold one (a token count or cost that large is refused either way)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body)
    except (ValueError, RecursionError):
        return None


class _Malformed(Exception):
    """Internal: a 2xx body whose fields are not what the API's schema says."""


def _text(value: Any, name: str) -> str | None:
    """A field that must be a string (or absent)."""
    if value is None or isinstance(value, str):
        return value
    raise _Malformed(f"{name} is a {type(value).__name__}, not a string")


def _count(value: Any, name: str) -> int:
    """A token count: a whole number from 0 to MAX_TOKEN_COUNT (absent is 0)."""
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKEN_COUNT:
        raise _Malformed(f"{name} is {str(value)[:40]!r}, not a token count")
    return value


def _mapping(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one: answers are not always what they should be."""
    return value if isinstance(value, dict) else {}


def _error_object(payload: Any) -> dict[str, Any]:
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) else {}


def retry_after_s(headers: Any, error: dict[str, Any] | None = None, *, now_s: float | None = None) -> float | None:
    """How long the server asked us to wait, from whichever hint it gave, in seconds."""
    headers = headers or {}
    now = now_s if now_s is not None else time.time()
    if (wait := _seconds(headers.get("retry-after-ms"), scale=1000)) is not None:
        return wait
    if (value := headers.get("Retry-After")) is not None:
        if (wait := _seconds(value)) is not None:
            return wait
        try:  # an HTTP date
            return _seconds(email.utils.parsedate_to_datetime(value).timestamp() - now)
        except (TypeError, ValueError, IndexError, OverflowError):
            pass  # neither: no hint, the usual backoff
    if (reset := _seconds(headers.get("X-RateLimit-Reset"), scale=1000)) is not None:
        return max(0.0, reset - now)
    error = error or {}
    metadata = _mapping(error.get("metadata"))
    for hint in (metadata.get("retry_after_seconds"), _mapping(error.get("availability")).get("retry_after")):
        if not isinstance(hint, bool) and (wait := _seconds(hint)) is not None:
            return wait
    return None


def _seconds(value: Any, *, scale: float = 1.0) -> float | None:
    """A header's or field's number of seconds (given in 1/scale units), at least 0; None if it is not a
    finite number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value) / scale
    except (TypeError, ValueError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def classify(status: int, payload: Any, headers: Any = None) -> ApiError:
    """The one place an error answer becomes a kind of ApiError (see errors.py)."""
    error = _error_object(payload)
    metadata = _mapping(error.get("metadata"))
    said = str(error.get("message") or _plain_message(payload) or "")
    if status == 404 and not error and said in ("", "Not Found"):  # the path is not there, not the model
        message = "HTTP 404, no such path: check api.base_url (an OpenAI-compatible server's ends in /v1)"
    else:
        message = said or f"HTTP {status}"
    raw = metadata.get("raw")
    if raw and isinstance(raw, str) and raw not in message:
        message = f"{message}: {raw[:200]}"
    limit_source = str(metadata.get("limit_source") or "")
    wait_s = retry_after_s(headers, error)
    common: dict[str, Any] = {"status": status, "retry_after_s": wait_s, "metadata": metadata}
    availability = _mapping(error.get("availability"))

    if status == 401:
        return FatalApiError(f"{message}; check that the API key is right", code="auth", **common)
    if status == 402:
        if limit_source == "openrouter_in_flight_budget":
            return RateLimited(message, code="in_flight_budget", **common)
        return FatalApiError(f"{message}; add credits, or lower max_tokens", code="credits", **common)
    if status == 403:
        if metadata.get("reasons") or metadata.get("flagged_input") is not None:
            reasons = ", ".join(map(str, metadata.get("reasons") or [])) or "flagged"
            return RequestRejected(f"moderation: {reasons}", code="moderation", **common)
        if limit_source in BUDGET_LIMIT_SOURCES or "limit" in message.lower() or "budget" in message.lower():
            return FatalApiError(
                f"{message}; raise the key's limit or budget, or wait for it to reset", code="key_limit", **common
            )
        if "blocked" in message.lower() or availability:
            return RequestRejected(message, code="forbidden", **common)
        return FatalApiError(message, code="forbidden", **common)
    if status in (429, 503) and _flex_capacity(availability):
        return RateLimited(
            f"{message} (service_tier flex: no capacity now; asked again later, never at the default tier)",
            code="flex_capacity",
            **common,
        )
    if status == 429:
        if any(marker in f"{message} {limit_source}" for marker in FREE_DAILY_MARKERS):
            return FatalApiError(
                f"{message}; the free-model daily cap resets at UTC midnight", code="free_daily_cap", **common
            )
        return RateLimited(message, code="rate_limited", **common)
    if availability.get("retryable") is False and status in (400, 404, 403):
        return RequestRejected(message, code=str(availability.get("code") or "unavailable"), **common)
    if status in TRANSIENT_STATUSES or status >= 500:
        return TransientError(message, code=f"http_{status}", **common)
    if status in REJECTED_STATUSES or 400 <= status < 500:
        return RequestRejected(message, code=str(metadata.get("error_type") or f"http_{status}"), **common)
    return TransientError(message, code=f"http_{status}", **common)


def _plain_message(payload: Any) -> str | None:
    """What an error answer without OpenRouter's `error` object says: vLLM's top-level `message` ("The model `x`
    does not exist."), FastAPI's `detail`."""
    if not isinstance(payload, dict):
        return None
    said = payload.get("message") or payload.get("detail")
    return said[:500] if isinstance(said, str) and said.strip() else None


def _flex_capacity(availability: dict[str, Any]) -> bool:
    """Whether an availability error (capacity_exhausted, temporarily_unavailable) is the service tier's: a flex
    request finds no flex capacity, and OpenRouter does not fall back to the default tier for it."""
    constraint = _mapping(availability.get("constraint"))
    return constraint.get("field") == "service_tier" and availability.get("retryable") is not False


def parse_completion(payload: Any, *, status: int = 200, latency_s: float = 0.0) -> Completion:
    """A Completion from a 2xx body, or the ApiError the body really is.

    This is where a reply is validated, once: every field the rest of batchrunner reads is
    checked for its type and range here, so a reply that does not fit (a token count of
    2^70, content that is an object, an id that is a list) is a classified error for its
    row, retried like any bad answer, and never an exception in a worker or the checkpoint."""
    try:
        return _completion(payload, status, latency_s)
    except _Malformed as exc:
        raise TransientError(f"malformed answer: {exc}", status=status, code="malformed") from None


def _completion(payload: Any, status: int, latency_s: float) -> Completion:
    if not isinstance(payload, dict):
        raise TransientError("answer is not a JSON object", status=status, code="bad_body")
    usage = _usage(payload.get("usage"))
    error = _error_object(payload)
    choices = payload.get("choices")
    if error and not choices:  # a 200 whose body is only {"error": ...}
        code = error.get("code")
        inner = classify(code, payload) if isinstance(code, int) and code >= 400 else None
        if inner is not None and not isinstance(inner, TransientError):
            raise inner
        raise TransientError(
            f"error inside a {status} answer: {error.get('message', error)}",
            status=status,
            code="error_in_200",
            usage=usage,
        )
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise TransientError("answer has no choices", status=status, code="bad_body", usage=usage)
    choice = choices[0]
    finish_reason = _text(choice.get("finish_reason"), "finish_reason")
    if finish_reason == "error":
        detail = _error_object(choice).get("message") or error.get("message") or "provider error"
        raise TransientError(
            f"the provider failed mid-answer: {detail}", status=status, code="finish_error", usage=usage
        )
    if "message" in choice and not isinstance(choice["message"], dict):
        raise _Malformed("choices[0].message is not an object")
    message = _mapping(choice.get("message"))
    text = message.get("content") if message else choice.get("text")
    if isinstance(text, list):  # content parts
        text = "".join(str(part.get("text", "")) for part in text if isinstance(part, dict))
    text = _text(text, "the answer's content")
    tool_calls = message.get("tool_calls") or None
    if tool_calls is not None and not (
        isinstance(tool_calls, list) and all(isinstance(call, dict) for call in tool_calls)
    ):
        raise _Malformed("tool_calls is not a list of objects")
    refusal = _text(message.get("refusal"), "refusal") or None
    if not text and not tool_calls and not refusal:
        raise TransientError(
            "empty answer (no content and no tool calls)", status=status, code="empty_answer", usage=usage
        )
    return Completion(
        text=text or "",
        model=_text(payload.get("model"), "model") or "",
        finish_reason=finish_reason,
        usage=usage,
        generation_id=_text(payload.get("id"), "id"),
        provider=_text(payload.get("provider"), "provider"),
        latency_s=latency_s,
        tool_calls=tool_calls,
        refusal=refusal,
        raw=payload,
        service_tier=_text(payload.get("service_tier"), "service_tier"),
    )


def _usage(usage: Any) -> Usage:
    """Token counts and cost, checked: counts must be counts; a cost that is not a finite,
    non-negative, believable number is set aside (and said why) so the cost is computed instead."""
    if not isinstance(usage, dict):
        return Usage()
    prompt_details = _mapping(usage.get("prompt_tokens_details"))
    completion_details = _mapping(usage.get("completion_tokens_details"))
    cost, rejected = _reported_cost(usage.get("cost"), "usage.cost")
    upstream, upstream_rejected = _reported_cost(
        _mapping(usage.get("cost_details")).get("upstream_inference_cost"),
        "usage.cost_details.upstream_inference_cost",
    )
    return Usage(
        prompt_tokens=_count(usage.get("prompt_tokens"), "usage.prompt_tokens"),
        completion_tokens=_count(usage.get("completion_tokens"), "usage.completion_tokens"),
        cached_tokens=_count(prompt_details.get("cached_tokens"), "usage.prompt_tokens_details.cached_tokens"),
        cache_write_tokens=_count(
            prompt_details.get("cache_write_tokens"), "usage.prompt_tokens_details.cache_write_tokens"
        ),
        reasoning_tokens=_count(
            completion_details.get("reasoning_tokens"), "usage.completion_tokens_details.reasoning_tokens"
        ),
        audio_tokens=_count(prompt_details.get("audio_tokens"), "usage.prompt_tokens_details.audio_tokens"),
        cost_usd=cost,
        cost_rejected=rejected,
        is_byok=usage.get("is_byok") is True,
        upstream_cost_usd=upstream,
        upstream_rejected=upstream_rejected,
    )


def _reported_cost(raw: Any, name: str) -> tuple[Decimal | None, str | None]:
    """A reported cost as the decimal it was written as, and None with why when it is not a finite, non-negative,
    believable number (absent: None, and no reason)."""
    cost = to_decimal(raw)
    if raw is not None and cost is None:
        return None, f"{name} {str(raw)[:40]!r} is not a finite number"
    if cost is not None and not ZERO_USD <= cost <= MAX_REPORTED_COST_USD:
        return None, f"{name} {str(raw)[:40]} is {'negative' if cost < 0 else 'not believable'}"
    return cost, None


__all__ = ["Client", "Completion", "Usage", "classify", "parse_completion", "retry_after_s"]
