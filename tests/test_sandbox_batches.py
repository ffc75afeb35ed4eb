"""The sandbox's Batch API as OpenRouter documents it (judged by the official SDK's models and client): a
batch's statuses over its turnaround, its price, partial failures, expiry, failed validation, results a page at a
time, cancelling (billing what finished), deleting, the listing's pages, what the stats count, and the body order
OpenRouter insists on; and the other routes the SDK parses with typed models (/key, a model's endpoints).

Most tests move the Batch API's clock by hand (SandboxConfig(batch_clock=...)) instead of waiting.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from openrouter import OpenRouter, errors
from openrouter.components import BatchDeletedObject, BatchListResponse, BatchObject, Result

from batchrunner.sandbox import Sandbox, SandboxConfig

MODEL = "openai/gpt-4o-mini"


class Clock:
    """A wall clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def batch_body(
    n: int = 0, *, rows: Iterable[int] | None = None, order: tuple[str, ...] = ("endpoint", "model", "requests")
) -> str:
    parts = {
        "endpoint": "/v1/chat/completions",
        "model": MODEL,
        "requests": [
            {"custom_id": f"r{i}", "body": {"messages": [{"role": "user", "content": f"row {i}"}], "max_tokens": 20}}
            for i in (range(n) if rows is None else rows)
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


async def submit(sandbox: Sandbox, n: int = 0, **kwargs: Any) -> str:
    status, submitted = await call(sandbox, "POST", "/batches", batch_body(n, **kwargs))
    assert status == 202 and BatchObject.model_validate(submitted).status == "validating"
    return str(submitted["id"])


async def look(sandbox: Sandbox, batch_id: str) -> dict[str, Any]:
    """GET /batches/{id}, checked against the SDK's BatchObject."""
    status, batch = await call(sandbox, "GET", f"/batches/{batch_id}")
    assert status == 200
    BatchObject.model_validate(batch)
    return dict(batch)


async def all_results(sandbox: Sandbox, batch_id: str, limit: int) -> list[dict[str, Any]]:
    """Every row of GET /batches/{id}/results, page by page."""
    rows: list[dict[str, Any]] = []
    query = f"?limit={limit}"
    while True:
        status, page = await call(sandbox, "GET", f"/batches/{batch_id}/results{query}")
        assert status == 200 and page["object"] == "list"
        rows += page["data"]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return rows
        query = f"?limit={limit}&cursor={page['next_cursor']}"


async def test_a_batch_is_answered_at_the_batch_price_in_openrouters_shapes() -> None:
    """A batch is answered at half the realtime price, one result per custom_id, every object the SDK's shape."""
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
    """The SDK's own client reads the sandbox's /key and a model's endpoints with every field its models require."""
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


async def test_a_batch_validates_runs_finalizes_and_completes_as_its_requests_finish() -> None:
    """Over 100 s: validating, in_progress as its 4 requests finish (counts growing), finalizing, completed."""
    clock = Clock()
    async with Sandbox(SandboxConfig(batch_turnaround_s=100, batch_clock=clock)) as sandbox:
        batch_id = await submit(sandbox, 4)
        seen = []
        for at in (0, 9.9, 10, 29.9, 30, 50, 89.9, 90, 99.9, 100):
            clock.now = 1_800_000_000.0 + at
            batch = await look(sandbox, batch_id)
            counts = batch["request_counts"]
            seen.append((at, batch["status"], counts["completed"] + counts["failed"]))
            assert (batch["results"] is None) == (batch["status"] != "completed")
            assert (batch["usage"] is None) == (batch["status"] != "completed")
    assert seen == [
        (0, "validating", 0),
        (9.9, "validating", 0),
        (10, "in_progress", 0),
        (29.9, "in_progress", 0),
        (30, "in_progress", 1),
        (50, "in_progress", 2),
        (89.9, "in_progress", 3),
        (90, "finalizing", 4),
        (99.9, "finalizing", 4),
        (100, "completed", 4),
    ]
    assert batch["finalized_at"] == 1_800_000_100 and len(batch["results"]) == 4


async def test_partial_failures_and_an_expired_batch_that_bills_what_finished() -> None:
    """A completed batch may hold failed rows; an expired one has no rows but bills the requests that finished."""
    async with Sandbox(SandboxConfig(faults={"server_error": 0.5}, seed=2)) as sandbox:
        done = await look(sandbox, await submit(sandbox, 20))
        counts = done["request_counts"]
        assert 0 < counts["failed"] < 20 and counts["completed"] + counts["failed"] == 20
        assert all((r["response"] is None) != (r["error"] is None) for r in done["results"])
    clock = Clock()
    config = SandboxConfig(batch_turnaround_s=100, batch_expire_s=60, batch_clock=clock)
    async with Sandbox(config) as sandbox:
        batch_id = await submit(sandbox, 4)
        clock.now += 60
        expired = await look(sandbox, batch_id)
        assert expired["status"] == "expired" and expired["results"] is None
        assert expired["expires_at"] == expired["finalized_at"] == 1_800_000_060
        assert expired["request_counts"] == {"total": 4, "completed": 2, "failed": 0}, "those done at 30 and 50 s"
        assert await all_results(sandbox, batch_id, 10) == []
        assert expired["usage"]["cost"] > 0 and Decimal(str(expired["usage"]["cost"])) == sandbox.stats.charged_usd


async def test_results_come_a_page_at_a_time_with_a_cursor_that_gives_the_same_page_again() -> None:
    """Results come a page at a time in order, the same page again for a cursor; 400 bad paging, 404, 409 open."""
    clock = Clock()
    async with Sandbox(SandboxConfig(batch_clock=clock)) as sandbox:
        batch_id = await submit(sandbox, 25)
        inline = (await look(sandbox, batch_id))["results"]
        paged = await all_results(sandbox, batch_id, 10)
        assert paged == inline and [r["custom_id"] for r in paged] == [f"r{i}" for i in range(25)]
        for row in paged:
            Result.model_validate(row)
        _, first = await call(sandbox, "GET", f"/batches/{batch_id}/results?limit=10")
        second_path = f"/batches/{batch_id}/results?limit=10&cursor={first['next_cursor']}"
        (_, second), (_, again) = await call(sandbox, "GET", second_path), await call(sandbox, "GET", second_path)
        assert second == again and [r["custom_id"] for r in second["data"]] == [f"r{i}" for i in range(10, 20)]
        _, whole = await call(sandbox, "GET", f"/batches/{batch_id}/results")
        assert len(whole["data"]) == 25 and whole["has_more"] is False, "100 a page when no limit is asked"
        other_id = await submit(sandbox, 12)
        _, other = await call(sandbox, "GET", f"/batches/{other_id}/results?limit=5")
        for query in ("limit=0", "limit=1001", "limit=ten", "cursor=nonsense", f"cursor={other['next_cursor']}"):
            status, refused = await call(sandbox, "GET", f"/batches/{batch_id}/results?{query}")
            assert status == 400 and refused["error"]["code"] == 400, query
        assert (await call(sandbox, "GET", "/batches/batch_missing/results"))[0] == 404
        sandbox.config.batch_turnaround_s = 100
        status, early = await call(sandbox, "GET", f"/batches/{await submit(sandbox, 1)}/results")
        assert status == 409 and "validating" in early["error"]["message"]


async def test_results_can_be_left_out_of_the_batch_object() -> None:
    """With batch_inline_results False a completed batch says results: null; the paged endpoint has its rows."""
    async with Sandbox(SandboxConfig(batch_inline_results=False)) as sandbox:
        batch_id = await submit(sandbox, 3)
        batch = await look(sandbox, batch_id)
        assert batch["status"] == "completed" and batch["results"] is None
        assert [r["custom_id"] for r in await all_results(sandbox, batch_id, 2)] == ["r0", "r1", "r2"]


async def test_a_cancel_half_way_returns_no_rows_and_bills_the_half_that_finished() -> None:
    """A cancel half-way: in_progress until confirmed, then cancelled, no rows, billed for the 5 of 10 finished."""
    clock = Clock()
    async with Sandbox() as twin:  # the same 10 requests, completed: what each costs
        full = await look(twin, await submit(twin, 10))
    first_five = sum(Decimal(str(r["response"]["body"]["usage"]["cost"])) for r in full["results"][:5])
    async with Sandbox(SandboxConfig(batch_turnaround_s=100, batch_clock=clock)) as sandbox:
        batch_id = await submit(sandbox, 10)
        clock.now += 50
        status, cancelling = await call(sandbox, "POST", f"/batches/{batch_id}/cancel")
        assert status == 200 and BatchObject.model_validate(cancelling).status == "in_progress"
        clock.now += 0.4
        status, again = await call(sandbox, "POST", f"/batches/{batch_id}/cancel")
        assert status == 200 and again["status"] == "in_progress", "asking again does not restart the wait"
        clock.now += 0.1
        cancelled = await look(sandbox, batch_id)
        assert cancelled["status"] == "cancelled" and cancelled["results"] is None
        assert cancelled["finalized_at"] == int(1_800_000_050.5)
        assert cancelled["request_counts"] == {"total": 10, "completed": 5, "failed": 0}
        assert Decimal(str(cancelled["usage"]["cost"])) == first_five == sandbox.stats.charged_usd
        assert await all_results(sandbox, batch_id, 100) == []
        status, late = await call(sandbox, "POST", f"/batches/{batch_id}/cancel")
        assert status == 409 and late["error"]["code"] == 409


async def test_cancelling_status_a_provider_that_finished_first_and_a_cancel_not_enabled() -> None:
    """Cancel says cancelling when configured, loses to a provider that finished first, and is 403 where not enabled."""
    clock = Clock()
    config = SandboxConfig(batch_turnaround_s=100, batch_cancel_status="cancelling", batch_clock=clock)
    async with Sandbox(config) as sandbox:
        batch_id = await submit(sandbox, 2)
        clock.now += 99.8
        assert (await call(sandbox, "POST", f"/batches/{batch_id}/cancel"))[1]["status"] == "cancelling"
        assert (await look(sandbox, batch_id))["status"] == "cancelling"
        _, listing = await call(sandbox, "GET", "/batches")
        assert BatchListResponse.model_validate(listing).data[0].status == "in_progress"
        clock.now += 0.2
        finished = await look(sandbox, batch_id)
        assert finished["status"] == "completed" and len(finished["results"]) == 2
    async with Sandbox(SandboxConfig(batch_turnaround_s=100, batch_cancel_allowed=False)) as sandbox:
        status, refused = await call(sandbox, "POST", f"/batches/{await submit(sandbox, 1)}/cancel")
    assert status == 403 and errors.BatchErrorResponseData.model_validate(refused).error.code == 403


async def test_delete_removes_an_ended_batch_and_refuses_an_open_one() -> None:
    """Through the SDK's client: DELETE is 409 for an open batch; an ended one is deleted, then 404 and unlisted."""
    clock = Clock()
    config = SandboxConfig(batch_turnaround_s=100, batch_cancel_delay_s=0, batch_clock=clock)
    async with Sandbox(config) as sandbox, OpenRouter(api_key="sk-or-v1-sandbox", server_url=sandbox.base_url) as sdk:
        open_id, done_id = await submit(sandbox, 2), await submit(sandbox, 2)
        with pytest.raises(errors.BatchErrorResponse) as refused:
            await sdk.batch.delete_async(id=open_id)
        assert refused.value.data.error.code == 409 and (await look(sandbox, open_id))["status"] == "validating"
        clock.now += 100
        deleted = await sdk.batch.delete_async(id=done_id)
        assert isinstance(deleted, BatchDeletedObject) and deleted.id == done_id
        assert deleted.deletion.openrouter == "deleted" and deleted.deletion.upstream is not None
        assert deleted.deletion.upstream.status == "deleted"
        for path in (f"/batches/{done_id}", f"/batches/{done_id}/results"):
            assert (await call(sandbox, "GET", path))[0] == 404
        assert [b.id for b in (await sdk.batch.list_async()).result.data] == [open_id]
        with pytest.raises(errors.BatchErrorResponse) as missing:
            await sdk.batch.delete_async(id=done_id)
        assert missing.value.data.error.code == 404
    assert sandbox.stats.batches_submitted == 2 and sandbox.stats.charged_usd > 0, "billing is not erased"


async def test_a_batch_that_fails_validation_after_its_202() -> None:
    """With batch_fail_message a batch accepted with a 202 fails: error.message, no rows, no usage, nothing billed."""
    async with Sandbox(SandboxConfig(batch_fail_message="requests[3].body.messages: required")) as sandbox:
        batch_id = await submit(sandbox, 4)
        failed = await look(sandbox, batch_id)
        assert failed["status"] == "failed" and failed["error"] == {"message": "requests[3].body.messages: required"}
        assert failed["results"] is None and failed["usage"] is None
        assert failed["request_counts"] == {"total": 4, "completed": 0, "failed": 0}
        assert await all_results(sandbox, batch_id, 10) == []
        _, deleted = await call(sandbox, "DELETE", f"/batches/{batch_id}")
        upstream = BatchDeletedObject.model_validate(deleted).deletion.upstream
        assert upstream is not None and upstream.status == "not_applicable"
    assert sandbox.stats.requests == 0 and sandbox.stats.charged_usd == 0


async def test_the_listing_pages_newest_first_by_cursor_and_by_the_sdks_after() -> None:
    """45 batches list newest first, 20 a page, by next_cursor and by the SDK's ?after= paging; bad paging is 400."""
    clock = Clock()
    async with Sandbox(SandboxConfig(batch_clock=clock)) as sandbox, OpenRouter(server_url=sandbox.base_url) as sdk:
        submitted = []
        for i in range(45):
            clock.now += 1
            submitted.append(await submit(sandbox, rows=[i]))
        pages, query = [], ""
        while True:
            _, page = await call(sandbox, "GET", f"/batches{query}")
            parsed = BatchListResponse.model_validate(page)
            pages.append([b.id for b in parsed.data])
            assert (parsed.first_id, parsed.last_id) == (pages[-1][0], pages[-1][-1])
            if not page["has_more"]:
                break
            query = f"?cursor={page['next_cursor']}"
        assert [len(p) for p in pages] == [20, 20, 5] and [i for p in pages for i in p] == submitted[::-1]
        through_sdk: list[str] = []
        response = await sdk.batch.list_async(limit=7)
        while response is not None:
            through_sdk += [b.id for b in response.result.data]
            response = await response.next()
        assert through_sdk == submitted[::-1]
        for query in ("limit=0", "limit=101", "cursor=nonsense", "after=batch_missing"):
            status, refused = await call(sandbox, "GET", f"/batches?{query}")
            assert status == 400 and refused["error"]["code"] == 400, query


async def test_stats_count_batches_requests_and_requests_submitted_again() -> None:
    """stats count batches, their requests, and requests (same custom_id and body) submitted in a second batch."""
    async with Sandbox() as sandbox:
        await submit(sandbox, rows=[0, 1, 2])
        await submit(sandbox, rows=[2, 3])
        assert (sandbox.stats.batches_submitted, sandbox.stats.batch_requests_submitted) == (2, 5)
        assert sandbox.stats.batch_duplicates == 1, "r2 went twice"
        stats_url = sandbox.base_url.removesuffix("/api/v1") + "/sandbox/stats"
        async with aiohttp.ClientSession() as session, session.get(stats_url) as response:
            seen = await response.json()
    assert (seen["batches_submitted"], seen["batch_requests_submitted"], seen["batch_duplicates"]) == (2, 5, 1)


def test_the_sandbox_command_takes_a_batch_turnaround(monkeypatch: pytest.MonkeyPatch) -> None:
    """`batchrunner sandbox --batch-turnaround 600` serves batches that stay open for ten minutes (to try cancel)."""
    from batchrunner.cli import main
    from batchrunner.sandbox import server

    served: list[SandboxConfig] = []

    async def serve(config: SandboxConfig, port: int, ready: Any = None) -> None:
        served.append(config)

    monkeypatch.setattr(server, "serve", serve)
    result = CliRunner().invoke(main, ["sandbox", "--port", "0", "--batch-turnaround", "600"])
    assert result.exit_code == 0, result.output
    assert served[0].batch_turnaround_s == 600
    refused = CliRunner().invoke(main, ["sandbox", "--batch-turnaround", "-1"])
    assert refused.exit_code == 2
