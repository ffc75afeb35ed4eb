"""The live driver of the row flow over real loopback HTTP: retries, the breaker, fallbacks, repairs, halts, prompt release."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import run_pairs
from helpers.scripted import Reply, Scripted, answer

from batchrunner import openapi
from batchrunner.breaker import Breaker
from batchrunner.costs import PriceTable
from batchrunner.halt import Halt, StopReason
from batchrunner.retries import RetryPolicy
from batchrunner.runner import RunReport
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import JobSpec, load_spec

REPO = Path(__file__).resolve().parent.parent


async def run(spec: JobSpec, sandbox: Sandbox, **options: Any) -> RunReport:
    return await run_pairs(spec, sandbox, **options)


async def test_every_request_of_the_example_jobs_validates_against_chat_request() -> None:
    """What the client sends for each example job conforms to OpenRouter's ChatRequest schema."""
    jobs = sorted((REPO / "jobs").glob("*.yaml"))
    for job in jobs:
        spec = load_spec(job)
        async with Sandbox(SandboxConfig(record_bodies=True)) as sandbox:
            report = await run(spec, sandbox, limit=3)
        assert report.summary.ok == 3 * len(spec.models), job
        assert sandbox.stats.statuses[400] == 0
        for body in sandbox.stats.bodies:
            assert openapi.validation_errors("ChatRequest", body) == [], (job, body)
            assert set(body) <= openapi.request_fields(), (job, set(body) - openapi.request_fields())


async def test_fault_mix_ends_with_every_row_answered_once(write_spec: Callable[..., Path]) -> None:
    """429s, 5xx, errors in 200s, empty answers and dropped connections are retried until every row is answered, none twice."""
    faults = {
        "rate_limit": 0.1,
        "bad_gateway": 0.1,
        "overloaded": 0.1,
        "error_in_200": 0.08,
        "empty": 0.06,
        "drop": 0.06,
        "finish_error": 0.05,
    }
    spec = load_spec(write_spec(concurrency=6))
    config = SandboxConfig(seed=3, faults=faults, retry_after_s=0)
    async with Sandbox(config) as sandbox:
        report = await run(spec, sandbox, retry=RetryPolicy.immediate(max_attempts=12))
    assert report.summary.ok == 12 and report.summary.failed == 0
    assert sum(r.attempts for r in report.results) == sandbox.stats.requests
    assert sandbox.stats.requests > 12, "the seed should have produced some faults"
    assert set(sandbox.stats.answered.values()) == {1}
    assert len(sandbox.stats.answered) == 12


async def test_rows_go_to_the_fallback_when_the_model_is_down(write_spec: Callable[..., Path]) -> None:
    """A model that is down: every row is answered by the fallback, and the breaker caps calls to the dead model."""
    spec = load_spec(write_spec(fallbacks=["anthropic/claude-3.5-haiku"], concurrency=3))
    breaker = Breaker(threshold=4, cooldown_s=60)
    async with Sandbox(SandboxConfig(down_models={"openai/gpt-4o-mini"})) as sandbox:
        report = await run(spec, sandbox, retry=RetryPolicy.immediate(max_attempts=3), breaker=breaker)
    assert report.summary.ok == 12
    assert {(r.requested_model, r.model) for r in report.results} == {
        ("openai/gpt-4o-mini", "anthropic/claude-3.5-haiku")
    }
    assert sandbox.stats.by_model["openai/gpt-4o-mini"] <= breaker.threshold + spec.concurrency
    assert sandbox.stats.by_model["anthropic/claude-3.5-haiku"] == 12
    assert breaker.is_open("openai/gpt-4o-mini")


async def test_without_a_fallback_rows_wait_for_the_probe_and_fail_when_it_fails(
    write_spec: Callable[..., Path],
) -> None:
    """With no fallback, rows wait on the open circuit; failed probes count as their attempts, so they end failed."""
    spec = load_spec(write_spec(concurrency=4))
    breaker = Breaker(threshold=2, cooldown_s=0.01, max_cooldown_s=0.02)
    async with Sandbox(SandboxConfig(down_models={"openai/gpt-4o-mini"})) as sandbox:
        report = await run(spec, sandbox, retry=RetryPolicy.immediate(max_attempts=3), breaker=breaker)
    assert report.summary.failed == 12
    assert sandbox.stats.requests < 12 * 3, "the breaker should have spared the dead model some requests"
    probed = [r.error or "" for r in report.results if "every probe" in (r.error or "")]
    assert probed and all("(last: HTTP 502" in error and error.count("every probe") == 1 for error in probed)


async def test_rejected_request_fails_the_row_without_retrying(write_spec: Callable[..., Path]) -> None:
    """A 400 is not retried: the row fails after one attempt per model, with the reason."""
    spec = load_spec(write_spec(models=["not-a-model-id"]))
    async with Sandbox() as sandbox:
        report = await run(spec, sandbox)
    assert report.summary.failed == 12 and sandbox.stats.requests == 12
    assert all(r.status == "failed" and r.attempts == 1 for r in report.results)
    assert "not a valid model ID" in (report.results[0].error or "")


async def test_bad_key_halts_within_the_requests_in_flight(write_spec: Callable[..., Path]) -> None:
    """A 401 stops dispatch: no more requests than were in flight, every row left pending."""
    spec = load_spec(write_spec(concurrency=3))
    config = SandboxConfig(require_key=True, api_key="sk-or-v1-right")
    async with Sandbox(config) as sandbox:
        report = await run(spec, sandbox, api_key="sk-or-v1-wrong")
    assert report.halted and "check that the API key is right" in report.halted
    assert sandbox.stats.requests <= spec.concurrency
    assert report.summary.done == 0 and report.pending == 12


async def test_out_of_credits_halts_and_keeps_what_was_answered(write_spec: Callable[..., Path]) -> None:
    """A 402 stops the run; answers already paid for are kept, the rest stay pending."""
    spec = load_spec(write_spec(concurrency=1, models=["openai/gpt-4o"]))
    async with Sandbox(SandboxConfig(credits_usd=Decimal("0.0015"))) as sandbox:
        report = await run(spec, sandbox)
    assert report.halted and "credits" in report.halted
    assert 0 < report.summary.ok < 12
    assert report.pending == 12 - report.summary.ok
    assert sandbox.stats.statuses[402] == 1


@pytest.mark.parametrize("endpoint", ["completions"])
async def test_completions_endpoint(write_spec: Callable[..., Path], endpoint: str) -> None:
    """endpoint: completions sends a raw prompt to /completions and reads choices[0].text."""
    spec = load_spec(write_spec(endpoint=endpoint))
    async with Sandbox(SandboxConfig(record_bodies=True)) as sandbox:
        report = await run(spec, sandbox)
    assert report.summary.ok == 12
    assert sandbox.stats.bodies[0]["prompt"].startswith("Ticket T-")
    assert all(r.response and "Ticket T-" in r.response for r in report.results)


async def test_server_fallbacks_let_openrouter_fall_back_within_one_request(write_spec: Callable[..., Path]) -> None:
    """server_fallbacks sends OpenRouter's `models` array; one request per row, the output says who answered."""
    spec = load_spec(write_spec(fallbacks=["anthropic/claude-3.5-haiku"], server_fallbacks=True))
    async with Sandbox(SandboxConfig(down_models={"openai/gpt-4o-mini"}, record_bodies=True)) as sandbox:
        report = await run(spec, sandbox)
    assert sandbox.stats.requests == 12
    assert sandbox.stats.bodies[0]["models"] == ["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"]
    assert all(r.model == "anthropic/claude-3.5-haiku" and r.attempts == 1 and r.fallback_used for r in report.results)


async def test_stop_releases_rows_waiting_on_backoff_at_once(
    write_spec: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Rows told to wait 60 s (429 with Retry-After) are not on the wire: a stop releases them at once,
    without the 30 s grace, and nothing is reported as abandoned in flight."""
    spec = load_spec(write_spec(concurrency=4))
    async with Sandbox(SandboxConfig(faults={"rate_limit": 1.0}, retry_after_s=60)) as sandbox:
        halt = Halt()
        running = asyncio.create_task(run(spec, sandbox, halt=halt, retry=RetryPolicy()))
        while sandbox.stats.requests < 4:
            await asyncio.sleep(0.01)
        stopped_at = time.monotonic()
        halt.stop(StopReason.INTERRUPTED, "SIGTERM")
        report = await asyncio.wait_for(running, 10)
    assert time.monotonic() - stopped_at < 2
    assert report.pending == 12
    assert "gave up on" not in caplog.text


HINT_S = 0.3


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (429, {"Retry-After": str(HINT_S)}),
        (429, {"retry-after-ms": str(int(HINT_S * 1000))}),
        (429, lambda now_s: {"X-RateLimit-Reset": str(int((now_s + HINT_S) * 1000))}),
        (503, {"Retry-After": str(HINT_S)}),
    ],
    ids=["retry-after", "retry-after-ms", "x-ratelimit-reset", "503-retry-after"],
)
async def test_a_row_waits_what_the_server_asked_before_its_next_attempt(
    write_spec: Callable[..., Path], tickets_csv: Path, status: int, headers: Any
) -> None:
    """The policy waits the server's hint before the next attempt, though its own backoff would not wait at all."""
    tickets_csv.write_text("ticket_id,subject,text\nT-0,s,t\n")
    spec = load_spec(write_spec())
    body = {"error": {"code": status, "message": "slow down"}}
    async with Scripted([Reply(status, body, headers)]) as server:
        no_backoff = RetryPolicy(max_attempts=3, base_delay_s=0.0, max_delay_s=0.0)
        report = await run(spec, server, retry=no_backoff)  # type: ignore[arg-type]
    assert [r.status for r in report.results] == ["ok"]
    first, second = server.arrivals_s
    assert HINT_S - 0.001 <= second - first < HINT_S + 1.0  # X-RateLimit-Reset is in whole milliseconds


@pytest.mark.parametrize(
    ("reported_usd", "cost_usd", "source"),
    [
        ("0.02", "0.00104", "computed"),  # 19x what 1,000 + 10 tokens at $1/$4 per million cost: set aside
        ("0.0105", "0.00104", "computed"),  # just above ten times the worst case
        ("0.0104", "0.0104", "reported"),  # ten times: unusual, but believable
        ("0.00104", "0.00104", "reported"),
        ("0.0009", "0.0009", "reported"),  # cheaper than the list price (a discount, a cache): believed
    ],
)
async def test_a_reported_cost_above_ten_times_what_the_prices_allow_is_set_aside(
    write_spec: Callable[..., Path], tickets_csv: Path, reported_usd: str, cost_usd: str, source: str
) -> None:
    """usage.cost is the bill unless it is more than ten times what the model's prices allow for its tokens."""
    tickets_csv.write_text("ticket_id,subject,text\nT-0,s,t\n")
    spec = load_spec(write_spec())
    prices = PriceTable([{"id": "openai/gpt-4o-mini", "pricing": {"prompt": "0.000001", "completion": "0.000004"}}])
    reply = answer(prompt_tokens=1000, completion_tokens=10, cost_usd=float(reported_usd))
    async with Scripted([Reply(200, reply)]) as server:
        report = await run(spec, server, pricing=prices)  # type: ignore[arg-type]
    [result] = report.results
    assert (result.cost_usd, result.cost_source) == (Decimal(cost_usd), source)


async def test_a_timed_out_attempt_is_counted_and_charged_at_its_worst_case(
    write_spec: Callable[..., Path], tickets_csv: Path
) -> None:
    """A reply abandoned after the request went out may have been billed: the attempt counts, at its worst case
    (marked estimated), beside the retry that answered."""
    tickets_csv.write_text("ticket_id,subject,text\nT-0,s,t\n")
    spec = load_spec(write_spec(timeout_s=0.3, params={"max_tokens": 100}))

    async def slow(request: Any, response: Any) -> None:
        await asyncio.sleep(0.6)

    prices = PriceTable([{"id": "openai/gpt-4o-mini", "pricing": {"prompt": "0.000001", "completion": "0.000004"}}])
    answered = answer(prompt_tokens=10, completion_tokens=2, cost_usd=0.00002)
    async with Scripted([Reply(200, write=slow), Reply(200, answered)]) as server:
        report = await run(spec, server, pricing=prices)  # type: ignore[arg-type]
    [result] = report.results
    assert result.status == "ok" and result.attempts == 2 and result.cost_source == "estimated"
    worst = (len("Ticket T-0: t") + 8 + 8) * Decimal("0.000001") + 100 * Decimal("0.000004")  # bytes, markers
    assert result.cost_usd == Decimal("0.00002") + worst
