"""The engine over real loopback HTTP: ordering, retries, fallbacks, halts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchrunner import openapi
from batchrunner.breaker import Breaker
from batchrunner.client import Client
from batchrunner.engine import Engine, RunReport
from batchrunner.output import export
from batchrunner.preflight import prepare
from batchrunner.request import RequestBuilder
from batchrunner.retries import RetryPolicy
from batchrunner.sandbox import Sandbox, SandboxConfig, request_key
from batchrunner.spec import JobSpec, load_spec
from batchrunner.store import Store

REPO = Path(__file__).resolve().parent.parent


async def run(
    spec: JobSpec,
    sandbox: Sandbox,
    *,
    api_key: str | None = None,
    retry: RetryPolicy | None = None,
    limit: int | None = None,
    **engine_options: Any,
) -> RunReport:
    dataset = prepare(spec)
    async with Client(sandbox.base_url, api_key=api_key, max_connections=spec.concurrency) as client:
        engine_options.setdefault("keep_results", True)
        engine = Engine(spec, client, retry=retry or RetryPolicy.immediate(), **engine_options)
        return await engine.run(dataset, limit=limit)


async def test_answers_land_on_their_own_rows_when_they_complete_out_of_order(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Later rows answer first (latency falls with the row number), yet each answer is on its own row."""

    def latency(body: dict[str, Any]) -> float:
        number = int(body["messages"][-1]["content"].rsplit(" ", 1)[-1])
        return 0.02 * (12 - number)

    spec = load_spec(write_spec(concurrency=12))
    store = Store.open(tmp_path / "checkpoint.sqlite")
    async with Sandbox(SandboxConfig(latency_s=latency)) as sandbox:
        report = await run(spec, sandbox, store=store)
    finished = [r.row_index for r in report.results]
    assert finished != sorted(finished), "answers should have completed out of order"
    store.flush()
    export(prepare(spec), RequestBuilder(spec), store, tmp_path / "out.parquet")
    frame = pl.read_parquet(tmp_path / "out.parquet")
    assert frame["ticket_id"].to_list() == [f"T-{i}" for i in range(12)]
    for ticket_id, text, response in frame.select("ticket_id", "text", "response").iter_rows():
        assert f"Ticket {ticket_id}: {text}" in response


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


async def test_each_row_runs_once_per_model(write_spec: Callable[..., Path]) -> None:
    """With several models every row gets one result per model, and costs add up exactly."""
    spec = load_spec(write_spec(models=["openai/gpt-4o-mini", "meta-llama/llama-3.1-8b-instruct"]))
    async with Sandbox() as sandbox:
        report = await run(spec, sandbox)
    pairs = sorted((r.row_index, r.requested_model) for r in report.results)
    assert len(pairs) == len(set(pairs)) == 24
    assert report.summary.cost_usd == sandbox.stats.charged_usd


async def test_stop_finishes_requests_in_flight_and_leaves_the_rest_pending(write_spec: Callable[..., Path]) -> None:
    """stop() (Ctrl-C) lets in-flight answers land, sends nothing new, and reports pending rows."""
    spec = load_spec(write_spec(concurrency=2))
    async with Sandbox(SandboxConfig(latency_s=0.05)) as sandbox:
        dataset = prepare(spec)
        async with Client(sandbox.base_url) as client:
            engine = Engine(spec, client, retry=RetryPolicy.immediate())
            task = asyncio.create_task(engine.run(dataset))
            while sandbox.stats.requests < 3:
                await asyncio.sleep(0.005)
            engine.stop("interrupted")
            report = await task
    assert report.halted == "interrupted"
    assert report.summary.ok == sandbox.stats.statuses[200] == sandbox.stats.requests
    assert report.pending == 12 - report.summary.ok > 0


def test_request_key_ignores_params_that_do_not_change_the_question() -> None:
    """The sandbox's duplicate counter keys on model and prompt."""
    body = {"model": "a/b", "messages": [{"role": "user", "content": "x"}]}
    assert request_key(body) == request_key({**body, "temperature": 1}) != request_key({**body, "model": "a/c"})


@pytest.mark.parametrize("endpoint", ["completions"])
async def test_completions_endpoint(write_spec: Callable[..., Path], endpoint: str) -> None:
    """endpoint: completions sends a raw prompt to /completions and reads choices[0].text."""
    spec = load_spec(write_spec(endpoint=endpoint))
    async with Sandbox(SandboxConfig(record_bodies=True)) as sandbox:
        report = await run(spec, sandbox)
    assert report.summary.ok == 12
    assert sandbox.stats.bodies[0]["prompt"].startswith("Ticket T-")
    assert all(r.response and "Ticket T-" in r.response for r in report.results)


async def test_requests_in_flight_past_the_grace_period_are_abandoned(write_spec: Callable[..., Path]) -> None:
    """After stop(), requests still in flight when the grace period ends are cancelled; their rows stay pending."""
    spec = load_spec(write_spec(concurrency=2))
    async with Sandbox(SandboxConfig(latency_s=1.0)) as sandbox:
        dataset = prepare(spec)
        async with Client(sandbox.base_url) as client:
            engine = Engine(spec, client, retry=RetryPolicy.immediate(), grace_s=0.05)
            task = asyncio.create_task(engine.run(dataset))
            while sandbox.stats.requests < 2:
                await asyncio.sleep(0.005)
            engine.stop("interrupted")
            report = await asyncio.wait_for(task, 0.8)
    assert report.summary.done == 0 and report.pending == 12


async def test_server_fallbacks_let_openrouter_fall_back_within_one_request(write_spec: Callable[..., Path]) -> None:
    """server_fallbacks sends OpenRouter's `models` array; one request per row, the output says who answered."""
    spec = load_spec(write_spec(fallbacks=["anthropic/claude-3.5-haiku"], server_fallbacks=True))
    async with Sandbox(SandboxConfig(down_models={"openai/gpt-4o-mini"}, record_bodies=True)) as sandbox:
        report = await run(spec, sandbox)
    assert sandbox.stats.requests == 12
    assert sandbox.stats.bodies[0]["models"] == ["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"]
    assert all(r.model == "anthropic/claude-3.5-haiku" and r.attempts == 1 and r.fallback_used for r in report.results)


async def test_an_input_unreadable_midway_stops_the_run_instead_of_hanging(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """An input edited into an unreadable file after it was checked stops the run with a reason, instead of hanging."""
    # polars parses ahead in parallel: the error may surface before the first batch or after it.
    lines = ["ticket_id,subject,text", *[f"{i},s,text {i}" for i in range(12_000)]]
    (tmp_path / "late.csv").write_text("\n".join(lines) + "\n")
    spec = load_spec(write_spec(input="late.csv", id_column=None, concurrency=32))
    async with Sandbox() as sandbox:
        dataset = prepare(spec)
        with (tmp_path / "late.csv").open("a") as late:
            late.write("12000,s,text,one field too many\n")
        async with Client(sandbox.base_url) as client:
            report = await asyncio.wait_for(Engine(spec, client, retry=RetryPolicy.immediate()).run(dataset), 60)
    assert report.halted and "reading late.csv failed after" in report.halted
    read = int(report.halted.split("failed after ")[1].split()[0])
    assert report.summary.done >= read - 2 * spec.concurrency, "rows read before the bad one were answered"


async def test_stop_releases_rows_waiting_on_backoff_at_once(
    write_spec: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Rows told to wait 60 s (429 with Retry-After) are not on the wire: a stop releases them at once,
    without the 30 s grace, and nothing is reported as abandoned in flight."""
    spec = load_spec(write_spec(concurrency=4))
    async with Sandbox(SandboxConfig(faults={"rate_limit": 1.0}, retry_after_s=60)) as sandbox:
        dataset = prepare(spec)
        async with Client(sandbox.base_url) as client:
            engine = Engine(spec, client, retry=RetryPolicy(), grace_s=30)
            running = asyncio.create_task(engine.run(dataset))
            while sandbox.stats.requests < 4:
                await asyncio.sleep(0.01)
            stopped_at = time.monotonic()
            engine.stop("SIGTERM")
            report = await asyncio.wait_for(running, 10)
    assert time.monotonic() - stopped_at < 2
    assert report.pending == 12
    assert "gave up on" not in caplog.text
