"""The sandbox's Batch API: OpenRouter's shapes (judged by the official SDK's models), turnaround, price,
partial failures, expiry, cancelling, and the body order OpenRouter insists on; and the other routes the
SDK parses with typed models (/key, a model's endpoints)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from openrouter import OpenRouter
from openrouter.components import BatchListResponse, BatchObject

from batchrunner.sandbox import Sandbox, SandboxConfig

MODEL = "openai/gpt-4o-mini"


def batch_body(n: int, *, order: tuple[str, ...] = ("endpoint", "model", "requests")) -> str:
    parts = {
        "endpoint": "/v1/chat/completions",
        "model": MODEL,
        "requests": [
            {"custom_id": f"r{i}", "body": {"messages": [{"role": "user", "content": f"row {i}"}], "max_tokens": 20}}
            for i in range(n)
        ],
    }
    return "{" + ",".join(f"{json.dumps(key)}:{json.dumps(parts[key])}" for key in order) + "}"


async def call(sandbox: Sandbox, method: str, path: str, body: str | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, sandbox.base_url + path, data=body, headers={"Content-Type": "application/json"}
        ) as response,
    ):
        return response.status, json.loads(await response.text())


async def test_a_batch_is_answered_at_the_batch_price_in_openrouters_shapes() -> None:
    """Submit answers 202 validating; the batch completes with one result per custom_id, costed at half the
    realtime price; the listing carries no results; every object parses with the official SDK's models."""
    async with Sandbox() as sandbox:
        status, submitted = await call(sandbox, "POST", "/batches", batch_body(3))
        assert status == 202 and submitted["status"] == "validating"
        BatchObject.model_validate(submitted)
        status, done = await call(sandbox, "GET", f"/batches/{submitted['id']}")
        batch = BatchObject.model_validate(done)
        assert batch.status == "completed" and batch.request_counts.total == 3 and batch.request_counts.failed == 0
        assert sorted(r["custom_id"] for r in done["results"]) == ["r0", "r1", "r2"]
        _, realtime = await call(
            sandbox,
            "POST",
            "/chat/completions",
            json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "row 0"}], "max_tokens": 20}),
        )
        first = next(r for r in done["results"] if r["custom_id"] == "r0")["response"]["body"]
        assert Decimal(str(first["usage"]["cost"])) == Decimal(str(realtime["usage"]["cost"])) / 2
        status, listing = await call(sandbox, "GET", "/batches")
        parsed = BatchListResponse.model_validate(listing)
        assert status == 200 and parsed.data[0].id == submitted["id"] and listing["data"][0]["results"] is None


async def test_requests_before_endpoint_and_model_are_refused_as_openrouter_does() -> None:
    """OpenRouter stream-parses the body: `requests` before `endpoint` and `model` is a 400."""
    async with Sandbox() as sandbox:
        status, error = await call(sandbox, "POST", "/batches", batch_body(1, order=("requests", "endpoint", "model")))
    assert status == 400 and "before `requests`" in error["error"]["message"]


async def test_turnaround_partial_failures_expiry_and_cancel() -> None:
    """A batch stays in_progress until its turnaround; a completed one may hold failed results (one of
    response or error each); an old one expires; a pending one can be cancelled."""
    async with Sandbox(SandboxConfig(batch_turnaround_s=3600)) as sandbox:
        _, slow = await call(sandbox, "POST", "/batches", batch_body(2))
        _, seen = await call(sandbox, "GET", f"/batches/{slow['id']}")
        assert seen["status"] == "in_progress" and seen["results"] is None
        _, cancelled = await call(sandbox, "DELETE", f"/batches/{slow['id']}")
        assert cancelled["status"] == "cancelled"
    async with Sandbox(SandboxConfig(faults={"server_error": 0.5}, seed=2)) as sandbox:
        _, submitted = await call(sandbox, "POST", "/batches", batch_body(20))
        _, done = await call(sandbox, "GET", f"/batches/{submitted['id']}")
        counts = done["request_counts"]
        assert 0 < counts["failed"] < 20 and counts["completed"] + counts["failed"] == 20
        assert all((r["response"] is None) != (r["error"] is None) for r in done["results"])
    async with Sandbox(SandboxConfig(batch_turnaround_s=3600, batch_expire_s=0)) as sandbox:
        _, submitted = await call(sandbox, "POST", "/batches", batch_body(1))
        _, expired = await call(sandbox, "GET", f"/batches/{submitted['id']}")
        assert expired["status"] == "expired"


async def test_media_as_data_is_refused_in_batches_urls_are_not() -> None:
    """As OpenRouter's Batch API: an image as a data: URL (or any input_audio) fails the submission; a URL passes."""

    def with_image(url: str) -> str:
        content = [{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": url}}]
        request = {"custom_id": "r0", "body": {"messages": [{"role": "user", "content": content}]}}
        return json.dumps({"endpoint": "/v1/chat/completions", "model": MODEL, "requests": [request]})

    async with Sandbox() as sandbox:
        inline, refused = await call(sandbox, "POST", "/batches", with_image("data:image/png;base64,iVBORw0KGgo="))
        url, _ = await call(sandbox, "POST", "/batches", with_image("https://cdn.example.com/a.png"))
    assert inline == 400 and "base64 and data: URIs are rejected" in refused["error"]["message"]
    assert url == 202


@pytest.mark.filterwarnings("ignore:.*DEPRECATED:DeprecationWarning")  # the SDK's own rate_limit model warns
async def test_key_and_model_endpoints_parse_with_the_sdks_client() -> None:
    """The official SDK's client reads /key (with free_model_daily_requests) and a model's endpoints (with
    native_tools, service_tier, supports_diarization, supports_tool_choice) from the sandbox without error."""
    async with (
        Sandbox(SandboxConfig(free_daily_cap=7)) as sandbox,
        OpenRouter(api_key="sk-or-v1-sandbox", server_url=sandbox.base_url) as sdk,
    ):
        await call(
            sandbox,
            "POST",
            "/chat/completions",
            json.dumps(
                {"model": "meta-llama/llama-3.3-70b-instruct:free", "messages": [{"role": "user", "content": "hi"}]}
            ),
        )
        key = await sdk.api_keys.get_current_key_metadata_async()
        listed = await sdk.endpoints.list_async(author="meta-llama", slug="llama-3.3-70b-instruct")
    daily = key.data.free_model_daily_requests
    assert (daily.limit, daily.used, daily.remaining) == (7, 1, 6)
    first, second = listed.data.endpoints
    assert first.supports_tool_choice.function and not second.supports_tool_choice.function, "Together takes no tools"
    assert first.native_tools == {} and first.service_tier is None and first.supports_diarization is False
