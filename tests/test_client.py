"""The client: every error shape OpenRouter returns becomes the right ApiError, once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import zlib
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers.scripted import Reply, Scripted

from batchrunner.client import Client, _parse_json, classify, parse_completion, retry_after_s
from batchrunner.errors import FatalApiError, MediaProblem, RateLimited, RequestRejected, TransientError
from batchrunner.media import MediaReader
from batchrunner.sandbox import Sandbox, SandboxConfig

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


def envelope(code: int, message: str = "x", **metadata: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if metadata:
        error["metadata"] = metadata
    return {"error": error}


@pytest.mark.parametrize(
    ("status", "payload", "kind", "code"),
    [
        (401, envelope(401, "User not found."), FatalApiError, "auth"),
        (402, envelope(402, "Insufficient credits"), FatalApiError, "credits"),
        (402, envelope(402, "busy", limit_source="openrouter_in_flight_budget"), RateLimited, "in_flight_budget"),
        (403, envelope(403, "flagged", reasons=["violence"], flagged_input="..."), RequestRejected, "moderation"),
        (403, envelope(403, "Key limit exceeded", limit_source="openrouter_key_limit"), FatalApiError, "key_limit"),
        (403, envelope(403, "Request blocked: prompt injection patterns detected"), RequestRejected, "forbidden"),
        (429, envelope(429, "Rate limit exceeded"), RateLimited, "rate_limited"),
        (
            429,
            envelope(429, "Rate limit exceeded: free-models-per-day. Add 10 credits"),
            FatalApiError,
            "free_daily_cap",
        ),
        (429, envelope(429, "x", limit_source="openrouter_free_tier_daily"), FatalApiError, "free_daily_cap"),
        (
            400,
            envelope(400, "context length exceeded", error_type="context_length_exceeded"),
            RequestRejected,
            "context_length_exceeded",
        ),
        (404, envelope(404, "No endpoints found for x:free."), RequestRejected, "http_404"),
        (413, envelope(413), RequestRejected, "http_413"),
        (422, envelope(422), RequestRejected, "http_422"),
        (408, envelope(408), TransientError, "http_408"),
        (500, envelope(500), TransientError, "http_500"),
        (502, envelope(502, "Provider returned error", raw="upstream said no"), TransientError, "http_502"),
        (503, envelope(503), TransientError, "http_503"),
        (524, None, TransientError, "http_524"),
        (529, envelope(529), TransientError, "http_529"),
    ],
)
def test_classify_maps_each_status(status: int, payload: Any, kind: type, code: str) -> None:
    """Each documented status and body maps to its action: retry, fall back, or halt."""
    error = classify(status, payload)
    assert type(error) is kind
    assert error.code == code
    assert error.status == status


@pytest.mark.parametrize(
    ("status", "payload", "message"),
    [
        (404, None, "HTTP 404, no such path: check api.base_url (an OpenAI-compatible server's ends in /v1)"),
        (
            404,
            {"detail": "Not Found"},
            "HTTP 404, no such path: check api.base_url (an OpenAI-compatible server's ends in /v1)",
        ),
        (404, envelope(404, "No endpoints found for x:free."), "No endpoints found for x:free."),
        (
            404,
            {"object": "error", "message": "The model `x` does not exist.", "code": 404},
            "The model `x` does not exist.",
        ),
        (400, {"detail": "max_tokens must be at least 1"}, "max_tokens must be at least 1"),
        (500, None, "HTTP 500"),
    ],
    ids=["no-body", "fastapi-not-found", "openrouter-model", "vllm-model", "fastapi-detail", "nothing-said"],
)
def test_an_error_says_what_the_server_said_or_where_to_look(status: int, payload: Any, message: str) -> None:
    """An error without OpenRouter's `error` object keeps what the server said (vLLM's `message`, FastAPI's
    `detail`: before, a bare "HTTP 404"), and a 404 that says nothing else names the likely cause, a base URL
    without /v1 (before: "HTTP 404" on every row)."""
    assert classify(status, payload).message == message


def test_classify_keeps_provider_raw_message() -> None:
    """OpenRouter's generic 'Provider returned error' keeps metadata.raw, which says why."""
    assert "upstream said no" in str(classify(502, envelope(502, "Provider returned error", raw="upstream said no")))


async def test_unauthorised_message_mentions_the_key_prefix_only_for_openrouter() -> None:
    """A 401 says to check the key; OpenRouter's sk-or-v1- format is mentioned only when the server is OpenRouter."""
    assert Client("https://openrouter.ai/api/v1").openrouter and not Client("http://127.0.0.1:8000/v1").openrouter
    async with Sandbox(SandboxConfig(require_key=True)) as sandbox:
        for openrouter in (False, True):
            async with Client(sandbox.base_url, api_key="wrong") as client:
                client.openrouter = openrouter  # as if the sandbox were openrouter.ai
                with pytest.raises(FatalApiError, match="check that the API key is right") as caught:
                    await client.chat(CHAT)
            assert ("sk-or-v1-" in str(caught.value)) == openrouter


def test_retry_after_sources() -> None:
    """Retry-After seconds, retry-after-ms, X-RateLimit-Reset (epoch ms) and body hints are all read."""
    assert retry_after_s({"Retry-After": "7"}) == 7.0
    assert retry_after_s({"retry-after-ms": "1500"}) == 1.5
    assert retry_after_s({"X-RateLimit-Reset": "1000012000"}, now_s=1_000_000.0) == pytest.approx(12.0)
    assert retry_after_s({}, {"metadata": {"retry_after_seconds": 17}}) == 17.0
    assert retry_after_s({}, {"availability": {"retry_after": 3}}) == 3.0
    assert retry_after_s({}, {}) is None


def test_error_inside_a_200_is_transient() -> None:
    """A 200 whose body is only {"error": ...} is retried, not taken as an answer."""
    with pytest.raises(TransientError, match="error inside a 200"):
        parse_completion({"error": {"code": 502, "message": "Provider returned error"}, "user_id": "u"})


def test_error_inside_a_200_keeps_fatal_codes_fatal() -> None:
    """A 200 carrying a 402 error still halts the run rather than retrying forever."""
    with pytest.raises(FatalApiError):
        parse_completion({"error": {"code": 402, "message": "Insufficient credits"}})


def test_finish_reason_error_and_empty_answers_are_transient() -> None:
    """finish_reason "error" and an answer with no content and no tool calls are retried."""
    base = {"id": "gen-1", "model": "m", "usage": {"cost": 0.5}}
    with pytest.raises(TransientError, match="mid-answer") as info:
        parse_completion({**base, "choices": [{"finish_reason": "error", "message": {"content": "part"}}]})
    assert info.value.usage is not None and info.value.usage.cost_usd == Decimal("0.5")
    with pytest.raises(TransientError, match="empty answer"):
        parse_completion({**base, "choices": [{"finish_reason": "stop", "message": {"content": ""}}]})


def test_tool_calls_without_content_are_an_answer() -> None:
    """An answer that is only tool calls is not 'empty'."""
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    completion = parse_completion(
        {"model": "m", "choices": [{"finish_reason": "tool_calls", "message": {"content": None, "tool_calls": calls}}]}
    )
    assert completion.tool_calls == calls and completion.text == ""


def test_usage_is_parsed_exactly() -> None:
    """Token details and cost come through; cost is the Decimal that was written."""
    completion = parse_completion(
        {
            "id": "gen-9",
            "model": "openai/gpt-4o-mini",
            "provider": "OpenAI",
            "choices": [{"finish_reason": "stop", "message": {"content": "hi"}}],
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 4},
                "completion_tokens_details": {"reasoning_tokens": 2},
                "cost": 0.0000123,
            },
        }
    )
    assert completion.usage.cost_usd == Decimal("0.0000123")
    assert (completion.usage.cached_tokens, completion.usage.reasoning_tokens) == (4, 2)
    assert (completion.generation_id, completion.provider) == ("gen-9", "OpenAI")


async def test_chat_against_the_sandbox() -> None:
    """A real loopback request returns the answer, model, tokens and cost."""
    async with Sandbox() as sandbox, Client(sandbox.base_url) as client:
        completion = await client.chat(CHAT)
    assert completion.text.startswith("Simulated answer from openai/gpt-4o-mini")
    assert completion.model == "openai/gpt-4o-mini"
    assert completion.usage.prompt_tokens > 0 and completion.usage.cost_usd and completion.usage.cost_usd > 0
    assert completion.generation_id and completion.generation_id.startswith("gen-")


@pytest.mark.parametrize(
    ("fault", "kind", "code"),
    [
        ("rate_limit", RateLimited, "rate_limited"),
        ("in_flight_budget", RateLimited, "in_flight_budget"),
        ("server_error", TransientError, "http_500"),
        ("bad_gateway", TransientError, "http_502"),
        ("overloaded", TransientError, "http_503"),
        ("error_in_200", TransientError, "error_in_200"),
        ("finish_error", TransientError, "finish_error"),
        ("empty", TransientError, "empty_answer"),
        ("drop", TransientError, "connection"),
    ],
)
async def test_sandbox_faults_arrive_classified(fault: str, kind: type, code: str) -> None:
    """Each simulated fault, over real HTTP, leaves the client as the right error."""
    config = SandboxConfig(faults={fault: 1.0}, retry_after_s=2)
    async with Sandbox(config) as sandbox, Client(sandbox.base_url) as client:
        with pytest.raises(kind) as info:
            await client.chat(CHAT)
    assert info.value.code == code
    if kind is RateLimited:
        assert info.value.retry_after_s == 2.0


async def test_timeout_is_transient() -> None:
    """A request slower than timeout_s becomes a TransientError 'timeout'."""
    async with Sandbox(SandboxConfig(latency_s=1.0)) as sandbox, Client(sandbox.base_url, timeout_s=0.05) as client:
        with pytest.raises(TransientError) as info:
            await client.chat(CHAT)
    assert info.value.code == "timeout"


async def test_connection_refused_is_transient() -> None:
    """Nothing listening on the port is an `unreachable` TransientError (the server, not the row), not an aiohttp exception."""
    async with Sandbox() as sandbox:
        url = sandbox.base_url
    async with Client(url) as client:
        with pytest.raises(TransientError, match="cannot connect") as caught:
            await client.chat(CHAT)
    assert caught.value.code == "unreachable"


async def test_key_info_and_models() -> None:
    """GET /key reports the limit and what remains; GET /models lists prices as strings."""
    async with Sandbox(SandboxConfig(credits_usd=Decimal("5"))) as sandbox, Client(sandbox.base_url) as client:
        info = await client.key_info()
        models = await client.models()
    assert info["limit"] == 5 and info["limit_remaining"] == 5
    prices = {m["id"]: m["pricing"] for m in models}
    assert prices["openai/gpt-4o-mini"]["prompt"] == "0.00000015"


async def test_bad_key_is_fatal() -> None:
    """A rejected key (401) halts: retrying it would only repeat the refusal."""
    config = SandboxConfig(require_key=True, api_key="sk-or-v1-right")
    async with Sandbox(config) as sandbox, Client(sandbox.base_url, api_key="sk-or-v1-wrong") as client:
        with pytest.raises(FatalApiError) as info:
            await client.chat(CHAT)
    assert info.value.code == "auth"


def test_client_repr_hides_the_key() -> None:
    """The API key never appears in the client's repr."""
    assert "secret" not in repr(Client("http://x", api_key="sk-or-v1-secret"))


def answer(**changes: Any) -> dict[str, Any]:
    """A well-formed chat answer, with `changes` applied at the top level, in `usage` or in the message."""
    payload: dict[str, Any] = {
        "id": "gen-1",
        "model": "openai/gpt-4o-mini",
        "provider": "OpenAI",
        "choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "cost": 0.00001},
    }
    for key, value in changes.items():
        if key in ("prompt_tokens", "completion_tokens", "cost"):
            payload["usage"][key] = value
        elif key in ("content", "tool_calls", "refusal"):
            payload["choices"][0]["message"][key] = value
        else:
            payload[key] = value
    return payload


@pytest.mark.parametrize(
    "changes",
    [
        {"prompt_tokens": 2**70},
        {"completion_tokens": -1},
        {"prompt_tokens": "12"},
        {"content": {"text": "hi"}},
        {"id": {"x": 1}},
        {"provider": ["OpenAI"]},
        {"model": 7},
        {"tool_calls": "call it"},
        {"choices": [{"finish_reason": "stop", "message": "hi"}]},
    ],
)
def test_a_reply_that_does_not_fit_is_a_malformed_transient_error(changes: dict[str, Any]) -> None:
    """Each field the rest of batchrunner reads is checked once here; one of the wrong type or range is a
    `malformed` TransientError for the row, never a value that crashes a worker or the checkpoint later."""
    with pytest.raises(TransientError, match="malformed answer") as caught:
        parse_completion(answer(**changes))
    assert caught.value.code == "malformed"


@pytest.mark.parametrize("cost", [-15, float("nan"), float("inf"), 1e30, "lots"])
def test_an_unbelievable_reported_cost_is_set_aside_with_the_reason(cost: Any) -> None:
    """A negative, non-finite, absurd or non-numeric usage.cost is not used; the reason travels with the usage."""
    usage = parse_completion(answer(cost=cost)).usage
    assert usage.cost_usd is None and usage.cost_rejected and "usage.cost" in usage.cost_rejected
    assert parse_completion(answer(cost=0.00001)).usage.cost_usd == Decimal("0.00001")


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": 1, "a": 2}',  # a repeated key: the last
        b'  \n\n{"a": [1.5, -0.0, 1e-400, "\\u00e9\\/\\u0000"]}',  # keep-alive whitespace first
        b'{"a": NaN, "b": 1e400}',  # not JSON; Python's parser reads it
        b'{"a": "\\ud800"}',  # a lone surrogate's escape
        b'{"a": "\xff\xfe"}',  # bytes that are not UTF-8: replaced
        b"[" * 2_000 + b"]" * 2_000,  # past both parsers' depth
        b'{"a": 1}garbage',
        b"\xef\xbb\xbf{}",
        b"",
    ],
)
def test_a_reply_reads_as_the_standard_library_reads_it(body: bytes) -> None:
    """The fast parser changes nothing a reply means: what it refuses is read by json as before, and what it reads
    is what json reads (a NaN, a lone surrogate, bytes that are not UTF-8 included)."""
    try:
        expected = json.loads(body.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        expected = None
    assert repr(_parse_json(body)) == repr(expected)


async def test_a_body_nested_too_deeply_to_parse_is_a_bad_body() -> None:
    """A 200 whose JSON is nested 100,000 deep (Python's parser gives up) is a classified error, not a RecursionError."""

    async def deep(_: web.Request) -> web.Response:
        return web.Response(text="[" * 100_000 + "]" * 100_000, content_type="application/json")

    app = web.Application()
    app.router.add_post("/chat/completions", deep)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # aiohttp exposes no public accessor
    try:
        async with Client(f"http://127.0.0.1:{port}") as client:
            with pytest.raises(TransientError) as caught:
                await client.chat(CHAT)
        assert caught.value.code == "bad_body"
    finally:
        await runner.cleanup()


async def test_a_file_changed_before_its_request_went_out_raises_media_problem(tmp_path: Path) -> None:
    """Over real HTTP: the body stops before its last chunk, the sandbox never answers, and the client raises
    MediaProblem (a row problem, not an ApiError to retry); an unchanged file is answered."""
    (tmp_path / "a.png").write_bytes((SAMPLE / "shapes" / "img_001.png").read_bytes() + b"\x00" * 300_000)
    image = MediaReader(tmp_path).resolve("image", "a.png", column="photo")
    body = {
        "model": "openai/gpt-4o-mini",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}],
    }
    async with Sandbox() as sandbox, Client(sandbox.base_url) as client:
        answered = await client.chat(body)
        assert answered.text and sandbox.stats.images == 1
        (tmp_path / "a.png").write_bytes((SAMPLE / "shapes" / "img_002.png").read_bytes() + b"\x00" * 300_000)
        with pytest.raises(MediaProblem, match="changed while the run was sending it"):
            await client.chat(body)
    assert sandbox.stats.statuses[200] == 1 and sandbox.stats.images == 1


async def test_a_streamed_answer_reads_as_the_whole_one_with_its_time_to_first_token() -> None:
    """Streamed: the joined deltas, model, provider, finish_reason, usage and cost equal the whole answer's, and
    ttft_s is set (and within the latency); tool calls arriving in pieces are put back together."""
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 50}
    tools = [{"type": "function", "function": {"name": "label", "parameters": {"type": "object", "properties": {}}}}]
    async with Sandbox() as sandbox, Client(sandbox.base_url) as client:
        whole = await client.chat(body)
        streamed = await client.chat({**body, "stream": True})
        called = await client.chat({**body, "stream": True, "tools": tools})
    assert (streamed.text, streamed.model, streamed.provider, streamed.finish_reason) == (
        whole.text,
        whole.model,
        whole.provider,
        whole.finish_reason,
    )
    assert streamed.usage == whole.usage and whole.ttft_s is None
    assert streamed.ttft_s is not None and 0 <= streamed.ttft_s <= streamed.latency_s
    assert called.tool_calls and called.tool_calls[0]["function"]["name"] == "label"


@pytest.mark.parametrize(("fault", "code"), [("stream_error", "finish_error"), ("stream_cut", "stream_cut")])
async def test_a_stream_that_breaks_is_a_transient_error(fault: str, code: str) -> None:
    """An error chunk after the 200 (finish_reason "error"), or a connection closed before the answer ended, is a
    TransientError to retry, like the same failure of a whole answer."""
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 400}], "stream": True}
    async with Sandbox(SandboxConfig(faults={fault: 1.0})) as sandbox, Client(sandbox.base_url) as client:
        with pytest.raises(TransientError) as caught:
            await client.chat(body)
    assert caught.value.code == code


async def test_keep_alive_comments_keep_a_slow_stream_under_the_idle_timeout() -> None:
    """An answer that takes 0.6 s: a whole one times out at a 0.25 s timeout; streamed, the keep-alive comments
    OpenRouter sends while it works keep the connection alive and the answer arrives."""
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "slow"}]}
    async with Sandbox(SandboxConfig(latency_s=0.6)) as sandbox, Client(sandbox.base_url) as client:
        with pytest.raises(TransientError, match=r"no answer within 0\.25 s"):
            await client.chat(body, timeout_s=0.25)
        streamed = await client.chat({**body, "stream": True}, timeout_s=0.25)
    assert streamed.text and streamed.latency_s >= 0.6


# -- hostile servers and a stopped process ------------------------------------------------------


def sse(*chunks: dict[str, Any]) -> bytes:
    """Server-sent events as OpenRouter streams them, ending with [DONE]."""
    return b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"


def delta(content: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "gen-1",
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish_reason}],
    }


def writing(body: bytes) -> Any:
    async def write(request: web.Request, response: web.StreamResponse) -> None:
        await response.write(body)

    return write


async def test_an_answer_that_arrived_while_the_process_was_stopped_is_an_answer(
    sandbox_in_thread: Callable[[SandboxConfig], Sandbox],
) -> None:
    """The process stops (Ctrl-Z) for three times timeout_s with a request on the wire; the answer that came
    meanwhile is the answer, not a timeout to pay for again."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.2))
    async with Client(sandbox.base_url, timeout_s=0.5) as client:
        asyncio.get_running_loop().call_later(0.05, time.sleep, 1.5)  # the whole event loop stands still
        completion = await client.chat(CHAT)
    assert completion.text and sandbox.stats.requests == 1


async def test_a_stream_line_longer_than_aiohttps_line_limit_is_read_whole() -> None:
    """One `data:` line of 1 MB (a large tool call or image delta) is part of the answer, not a traceback."""
    big = "x" * 2**20
    stream = sse(delta(big), delta("", "stop"), {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}})
    headers = {"Content-Type": "text/event-stream"}
    async with (
        Scripted([Reply(200, headers=headers, write=writing(stream))]) as server,
        Client(server.base_url) as client,
    ):
        completion = await client.chat({**CHAT, "stream": True})
    assert completion.text == big and completion.usage.completion_tokens == 9


async def test_a_gzip_bomb_is_cut_off_at_the_reply_cap_and_marked_as_maybe_billed() -> None:
    """A 1 MB gzip reply that would expand to 256 MB is read only to max_reply_bytes: the request's error,
    not the process's memory; and its reply was abandoned, so it may have been billed."""

    async def bomb(request: web.Request, response: web.StreamResponse) -> None:
        packer = zlib.compressobj(wbits=31)  # gzip
        zeros = bytes(2**20)
        for _ in range(256):
            await response.write(packer.compress(zeros))
        await response.write(packer.flush())

    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with (
        Scripted([Reply(200, headers=headers, write=bomb)]) as server,
        Client(server.base_url, max_reply_bytes=2**20) as client,
    ):
        with pytest.raises(RequestRejected) as caught:
            await client.chat(CHAT)
    assert caught.value.code == "reply_too_large" and caught.value.abandoned
    assert "max_reply_mb" in str(caught.value)


async def test_a_stream_of_keep_alives_ends_at_stream_max_s() -> None:
    """A server that only ever sends `: OPENROUTER PROCESSING` proves the connection lives, not that an answer
    comes: the stream ends at stream_max_s as the row's error (not retried: it would pay again)."""

    async def forever(request: web.Request, response: web.StreamResponse) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await response.write(b": OPENROUTER PROCESSING\n\n")
                await asyncio.sleep(0.05)

    headers = {"Content-Type": "text/event-stream"}
    async with (
        Scripted([Reply(200, headers=headers, write=forever)]) as server,
        Client(server.base_url, timeout_s=0.3, stream_max_s=0.8) as client,
    ):
        started = time.monotonic()
        with pytest.raises(RequestRejected) as caught:
            await client.chat({**CHAT, "stream": True})
    assert caught.value.code == "stream_too_long" and caught.value.abandoned
    assert 0.8 <= time.monotonic() - started < 3


async def test_a_silent_stream_times_out_after_timeout_s_and_may_have_been_billed() -> None:
    """A stream that sends its headers and then nothing for timeout_s is a timeout, retried, with its reply
    abandoned (the server may have billed what it generated)."""

    async def silent(request: web.Request, response: web.StreamResponse) -> None:
        await response.write(sse(delta("partial"))[:40])
        await asyncio.sleep(1)

    headers = {"Content-Type": "text/event-stream"}
    async with (
        Scripted([Reply(200, headers=headers, write=silent)]) as server,
        Client(server.base_url, timeout_s=0.3) as client,
    ):
        with pytest.raises(TransientError) as caught:
            await client.chat({**CHAT, "stream": True})
    assert caught.value.code == "timeout" and caught.value.abandoned


async def test_a_redirect_to_another_origin_is_not_followed() -> None:
    """A 307 to another host would carry every prompt there: the request fails naming where it pointed, and the
    other host receives nothing."""
    async with Scripted([]) as elsewhere:
        target = elsewhere.base_url.replace("127.0.0.1", "localhost") + "/chat/completions"
        async with Scripted([Reply(307, {}, {"Location": target})]) as server, Client(server.base_url) as client:
            with pytest.raises(RequestRejected) as caught:
                await client.chat(CHAT)
    assert caught.value.code == "redirect" and "localhost" in str(caught.value)
    assert elsewhere.bodies == [] and len(server.bodies) == 1


async def test_a_redirect_within_the_same_origin_is_followed_with_the_body() -> None:
    """A 308 to another path on the same server is followed, the body sent again, and its answer kept."""
    async with Scripted([]) as server:
        server.replies.append(Reply(308, {}, {"Location": "/elsewhere/chat/completions"}))
        async with Client(server.base_url) as client:
            completion = await client.chat(CHAT)
    assert completion.text == "ok" and server.bodies == [CHAT, CHAT]


@pytest.mark.parametrize("value", ["soon-ish", "", "Mon, 99 Foo 2026 99:99:99 GMT", "1e999", "nan", "-5"])
def test_an_unreadable_retry_after_is_no_hint(value: str) -> None:
    """A Retry-After that is neither seconds nor an HTTP date means 'no hint' (the usual backoff), never a traceback."""
    hint = retry_after_s({"Retry-After": value})
    assert hint is None or (hint >= 0 and math.isfinite(hint))
    assert isinstance(classify(429, envelope(429), {"Retry-After": value}), RateLimited)


def test_a_byok_answers_usage_keeps_its_fee_and_upstream_cost_apart() -> None:
    """usage.is_byok and usage.cost_details.upstream_inference_cost are read beside usage.cost (the fee), as the
    decimals they were written as; an upstream cost that is not a believable number is set aside, saying why; the
    response's service_tier is the tier that served it."""
    body = {
        "id": "gen-1",
        "model": "openai/gpt-4o-mini",
        "service_tier": "flex",
        "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 2,
            "cost": 0.0000061,
            "is_byok": True,
            "cost_details": {"upstream_inference_cost": 0.000122},
        },
    }
    completion = parse_completion(body)
    usage = completion.usage
    assert (usage.cost_usd, usage.upstream_cost_usd, usage.is_byok) == (Decimal("0.0000061"), Decimal("0.000122"), True)
    assert completion.service_tier == "flex"
    for bad, why in (("NaN", "is not a finite number"), (-1, "is negative"), (1e9, "is not believable")):
        body["usage"]["cost_details"] = {"upstream_inference_cost": bad}
        aside = parse_completion(body).usage
        assert aside.upstream_cost_usd is None and why in (aside.upstream_rejected or "")
        assert "usage.cost_details.upstream_inference_cost" in (aside.upstream_rejected or "")
    body["usage"] = {"prompt_tokens": 1, "completion_tokens": 1, "cost": 0.1, "is_byok": "yes", "cost_details": []}
    plain = parse_completion(body).usage
    assert not plain.is_byok and plain.upstream_cost_usd is None and plain.upstream_rejected is None
    body["service_tier"] = ["flex"]
    with pytest.raises(TransientError, match="service_tier is a list"):
        parse_completion(body)


@pytest.mark.parametrize(
    ("key", "models", "generation"),
    [
        ({"data": []}, {"data": {}}, {"data": "x"}),
        ({"data": "x"}, {"data": ["a", 1, None]}, {"data": []}),
        ([], [], []),
        ({"data": None}, {"data": None}, {"data": None}),
    ],
)
async def test_start_up_answers_of_the_wrong_shape_read_as_nothing_known(
    key: Any, models: Any, generation: Any
) -> None:
    """A server whose GET /key, /models or /generation answers JSON of another shape (`data` a list where an
    object belongs, a string, a list of non-objects) reads as a server that said nothing: no key info, no models,
    no generation, never an AttributeError half-way through the start (one such server crashed every run)."""
    gets = {"/key": [Reply(200, key)], "/models": [Reply(200, models)], "/generation": [Reply(200, generation)]}
    async with Scripted(gets=gets) as server, Client(server.base_url) as client:
        assert await client.key_info() == {}
        assert await client.models() == []
        assert await client.generation("gen-1") == {}
