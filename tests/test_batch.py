"""Batch mode over the sandbox's Batch API: grouping, the batch price, partial failures, and resuming after a
kill without submitting anything twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import run_cli

from batchrunner.client import Client
from batchrunner.errors import SpecError, TransientError
from batchrunner.runner import RunSettings, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec
from batchrunner.store import Store


def rows_csv(tmp_path: Path, n: int) -> str:
    path = tmp_path / f"rows{n}.csv"
    pl.DataFrame({"ticket_id": [f"T-{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)]}).write_csv(path)
    return path.name


@pytest.mark.slow
async def test_twelve_thousand_rows_become_three_batches_at_the_batch_price(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """12,000 rows for one model: 3 batches (at most 5,000 each); every row answered, the output's columns
    those of a live run, and the cost the sandbox's batch price (half of what the live run pays)."""
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(input=rows_csv(tmp_path, 12_000), mode="batch", api={"base_url": sandbox.base_url}))
        outcome = await run_job(spec)
        batch_cost = sandbox.stats.charged_usd
        live = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 12_000),
                output="live/out.parquet",
                concurrency=64,
                rate_limit={"requests_per_second": 10_000},
                api={"base_url": sandbox.base_url},
            )
        )
        await run_job(live)
    assert sandbox.batches.submitted == 3
    assert outcome.report.summary.ok == 12_000
    batched, realtime = pl.read_parquet(spec.output), pl.read_parquet(live.output)
    assert batched.columns == realtime.columns and batched.schema == realtime.schema
    assert batched["response"].to_list() == realtime["response"].to_list()
    assert batched["cost_usd"].sum() == batch_cost == outcome.report.summary.cost_usd
    assert abs(realtime["cost_usd"].sum() - 2 * batch_cost) < Decimal("0.000001")
    assert outcome.report.batch_saved_usd is not None
    assert abs(outcome.report.batch_saved_usd - batch_cost) < Decimal("0.000001"), "half price: saved as much as paid"


async def test_partial_failures_are_asked_again_in_later_batches(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """A completed batch holding failed results: each is classified as a live error would be; transient ones go
    into a later batch; every row ends answered or failed with a reason."""
    async with Sandbox(SandboxConfig(faults={"server_error": 0.3}, seed=4)) as sandbox:
        spec = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 200),
                mode="batch",
                retry={"max_attempts": 3},
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec)
    output = pl.read_parquet(spec.output)
    assert output.height == 200 and outcome.report.pending == 0
    assert sandbox.batches.submitted >= 2, "failed results went into later batches"
    failed = output.filter(pl.col("status") == "failed")
    assert (failed["error"].str.contains("Provider returned error")).all()
    assert output.filter(pl.col("status") == "ok").height > 190


async def test_a_lost_submission_is_found_again_not_submitted_twice(
    write_spec: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submit call's answer is lost (the batch was created): the run stops; the next run finds the batch
    among the workspace's batches by model and size and collects it, submitting nothing again."""
    real_submit = Client.submit_batch

    async def submit_and_lose_the_answer(
        self: Client, model: str, requests: list[dict[str, Any]], **options: Any
    ) -> Any:
        await real_submit(self, model, requests, **options)
        raise TransientError("no answer within 300 s", code="timeout")

    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(input=rows_csv(tmp_path, 50), mode="batch", api={"base_url": sandbox.base_url}))
        monkeypatch.setattr(Client, "submit_batch", submit_and_lose_the_answer)
        first = await run_job(spec)
        monkeypatch.setattr(Client, "submit_batch", real_submit)
        second = await run_job(spec)
    assert first.report.stop is not None and "the next run looks for it" in first.report.stop.message
    assert sandbox.batches.submitted == 1
    assert second.report.summary.ok == 50 and pl.read_parquet(spec.output).height == 50


@pytest.mark.slow
def test_a_run_killed_while_waiting_collects_on_the_next_run(
    write_spec: Callable[..., Path], tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """kill -9 between submit and collect: the next run submits nothing and collects the batch; so does a
    --no-wait run's successor."""
    sandbox = sandbox_in_thread(SandboxConfig(batch_turnaround_s=1.5))
    spec_path = write_spec(input=rows_csv(tmp_path, 40), mode="batch", batch={"poll_s": 0.2})
    env = {**os.environ, "OPENROUTER_BASE_URL": sandbox.base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    run = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "run", str(spec_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while sandbox.batches.submitted < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    final = run_cli("run", str(spec_path), env=env)
    assert final.returncode == 0, final.stderr
    assert sandbox.batches.submitted == 1, "the batch was collected, not submitted again"
    assert pl.read_parquet(tmp_path / "out" / "result.parquet").height == 40
    no_wait_spec = write_spec(
        input=rows_csv(tmp_path, 10), mode="batch", output="later/out.parquet", batch={"poll_s": 0.2}
    )
    submitted = run_cli("run", str(no_wait_spec), "--no-wait", env=env)
    assert sandbox.batches.submitted == 2 and "run the job again to collect" in submitted.stderr
    time.sleep(1.6)
    collected = run_cli("run", str(no_wait_spec), env=env)
    assert collected.returncode == 0 and sandbox.batches.submitted == 2
    assert pl.read_parquet(tmp_path / "later" / "out.parquet").height == 10


def test_what_batches_cannot_take_is_refused_before_sending(write_spec: Callable[..., Path]) -> None:
    """Server-side fallbacks, provider preferences beyond only/allow_fallbacks, and the completions endpoint:
    exit 2 with the fix."""
    for changes, expected in [
        ({"fallbacks": ["anthropic/claude-3.5-haiku"], "server_fallbacks": True}, "fallbacks as later batches"),
        ({"provider": {"sort": "price"}}, "only provider.only and provider.allow_fallbacks"),
        ({"endpoint": "completions", "prompt": "{text}"}, "sends chat requests"),
    ]:
        with pytest.raises(SpecError, match=expected):
            load_spec(write_spec(mode="batch", **changes))


async def test_status_lists_batches_cancel_requeues_and_a_missing_batch_api_submits_nothing(
    write_spec: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """status shows each batch and its state; cancel cancels the open ones (the next run asks their rows again);
    a key the Batch API does not answer for stops the run before anything is submitted."""
    from batchrunner.errors import RequestRejected
    from batchrunner.offline import job_status
    from batchrunner.queries import cancel_batches

    async with Sandbox(SandboxConfig(batch_turnaround_s=3600, batch_cancel_delay_s=0)) as sandbox:
        spec = load_spec(write_spec(input=rows_csv(tmp_path, 20), mode="batch", api={"base_url": sandbox.base_url}))
        await run_job(spec, RunSettings(wait=False))
        listed = job_status(spec)["batches"]
        assert [b["state"] for b in listed] == ["submitted"] and listed[0]["requests"] == 20
        assert len((await cancel_batches(spec)).cancelling) == 1
        assert next(iter(sandbox.batches.batches.values())).status == "cancelled"
        sandbox.config.batch_turnaround_s = 0
        rerun = await run_job(spec)
        assert rerun.report.summary.ok == 20 and sandbox.batches.submitted == 2

        async def no_batch_api(self: Client) -> Any:
            raise RequestRejected("Not Found", status=404)

        monkeypatch.setattr(Client, "batches", no_batch_api)
        other = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 5),
                output="other/out.parquet",
                mode="batch",
                api={"base_url": sandbox.base_url},
            )
        )
        refused = await run_job(other)
    assert (
        refused.report.stop is not None and "the Batch API does not answer for this key" in refused.report.stop.message
    )
    assert sandbox.batches.submitted == 2


async def test_a_budget_in_batch_mode_submits_what_fits_and_never_goes_over(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """A batch's reservations settle only when it is collected: the run submits what the budget covers,
    collects, submits more, and stops (exit 3, saying so) only when nothing is out and the next does not fit."""
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(input=rows_csv(tmp_path, 300), mode="batch", api={"base_url": sandbox.base_url}))
        outcome = await run_job(spec, RunSettings(max_cost_usd=Decimal("0.002")))
    assert sandbox.batches.submitted >= 2, "the budget was used in several rounds"
    assert sandbox.stats.charged_usd <= Decimal("0.002")
    assert outcome.report.stop is not None and "budget of $0.002 reached" in outcome.report.stop.message
    assert 0 < outcome.report.summary.ok < 300


async def test_fallbacks_run_as_later_batches(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """A model that fails every request of its batch: its pairs go to their fallback in a later batch, which
    answers them; the output says which model answered and that a fallback was used."""
    config = SandboxConfig(down_models={"openai/gpt-4o-mini"})
    async with Sandbox(config) as sandbox:
        spec = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 20),
                mode="batch",
                fallbacks=["anthropic/claude-3.5-haiku"],
                retry={"max_attempts": 1},
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec)
    output = pl.read_parquet(spec.output)
    assert outcome.report.summary.ok == 20 and sandbox.batches.submitted == 2
    assert set(output["model"]) == {"anthropic/claude-3.5-haiku"} and (output["attempts"] == 2).all()
    assert outcome.report.summary.by_model["openai/gpt-4o-mini"].fallbacks == 20


async def test_invalid_structured_answers_are_repaired_in_a_later_batch(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Answers cut off at max_tokens come back invalid; the next batch asks again with the error fed back and
    twice the room, as a live repair would, and every row ends valid."""
    schema = {
        "type": "object",
        "properties": {
            "category": {"type": "string", "enum": ["bug", "billing", "account"]},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["category", "tags"],
        "additionalProperties": False,
    }
    async with Sandbox() as sandbox:
        spec = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 30),
                mode="batch",
                params={"max_tokens": 12},
                repair={"same_model": 3},
                response_format={"type": "json_schema", "json_schema": {"name": "t", "strict": True, "schema": schema}},
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec)
    batches = list(sandbox.batches.batches.values())
    repairs = [item["body"] for item in batches[1].requests]
    assert outcome.report.summary.ok == 30 and len(batches) >= 2 and repairs
    assert all(body["max_tokens"] == 24 and body["messages"][-2]["role"] == "assistant" for body in repairs)
    assert all("was not valid" in body["messages"][-1]["content"] for body in repairs)
    assert pl.read_parquet(spec.output)["category"].null_count() == 0


async def test_a_model_without_a_batch_endpoint_stops_the_run_or_runs_live(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """The Batch API refuses one model: the run says so, naming it and the fix; with fallback_to_realtime its
    rows run as live requests while the other model's go in a batch."""
    config = SandboxConfig(no_batch_models={"anthropic/claude-3.5-haiku"})
    models = ["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"]
    async with Sandbox(config) as sandbox:
        refused = load_spec(
            write_spec(input=rows_csv(tmp_path, 10), models=models, mode="batch", api={"base_url": sandbox.base_url})
        )
        stopped = await run_job(refused)
        mixed = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 10),
                models=models,
                mode="batch",
                output="mixed/out.parquet",
                batch={"fallback_to_realtime": True},
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(mixed)
    assert stopped.report.stop is not None
    assert "refused a batch for anthropic/claude-3.5-haiku" in stopped.report.stop.message
    assert "fallback_to_realtime" in stopped.report.stop.message
    assert outcome.report.stop is None and outcome.report.summary.ok == 20
    assert sandbox.stats.by_model["anthropic/claude-3.5-haiku"] == 10, "its rows ran live"


async def test_two_batches_that_could_be_the_lost_one_stop_the_run_and_say_what_to_do(
    write_spec: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lost submission matches two of the workspace's batches (same model and size): the run does not guess
    and does not submit again; it stops (exit 3) saying to cancel the wrong one."""
    real_submit = Client.submit_batch

    async def submit_twice_and_lose_the_answer(
        self: Client, model: str, requests: list[dict[str, Any]], **options: Any
    ) -> Any:
        await real_submit(self, model, requests, **options)
        await real_submit(self, model, requests, **options)  # someone else's batch of the same shape
        raise TransientError("no answer within 300 s", code="timeout")

    async with Sandbox(SandboxConfig(batch_turnaround_s=3600)) as sandbox:
        spec = load_spec(write_spec(input=rows_csv(tmp_path, 5), mode="batch", api={"base_url": sandbox.base_url}))
        monkeypatch.setattr(Client, "submit_batch", submit_twice_and_lose_the_answer)
        await run_job(spec)
        monkeypatch.setattr(Client, "submit_batch", real_submit)
        second = await run_job(spec)
    assert (
        second.report.stop is not None
        and "cancel the wrong ones with `batchrunner cancel`" in second.report.stop.message
    )
    assert sandbox.batches.submitted == 2, "nothing more was submitted"


async def test_image_urls_go_into_batches_as_they_are(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """Batch mode with an images column of https URLs: each request carries its URL unchanged (the Batch API
    takes URLs only, as OpenRouter says), and every row is answered at the batch price."""
    pl.DataFrame(
        {
            "ticket_id": [f"T-{i}" for i in range(5)],
            "text": ["x"] * 5,
            "photo": [f"https://cdn.example.com/{i}.png" for i in range(5)],
        }
    ).write_csv(tmp_path / "photos.csv")
    async with Sandbox() as sandbox:
        spec = load_spec(
            write_spec(input="photos.csv", mode="batch", images=["photo"], api={"base_url": sandbox.base_url})
        )
        outcome = await run_job(spec)
        submitted = [request for batch in sandbox.batches.batches.values() for request in batch.requests]
    assert outcome.report.summary.ok == 5 and sandbox.stats.images == 5
    urls = sorted(r["body"]["messages"][0]["content"][1]["image_url"]["url"] for r in submitted)
    assert urls == [f"https://cdn.example.com/{i}.png" for i in range(5)]


async def test_a_batch_run_stopped_between_repairs_keeps_what_the_invalid_answers_cost(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Every answer comes back invalid and is to be repaired in a later batch, but the budget stops the run first:
    the answers paid for are kept, each pair pending with its bill, so the checkpoint's spend is what the server
    charged (they were dropped: a rerun's budget and `status` did not count them, nor did the run's summary)."""
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string"}},
        "required": ["label"],
        "additionalProperties": False,
    }
    async with Sandbox(SandboxConfig(faults={"invalid_json": 1.0})) as sandbox:
        spec = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 40),
                mode="batch",
                repair={"same_model": 3},
                response_format={"type": "json_schema", "json_schema": {"name": "t", "strict": True, "schema": schema}},
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec, RunSettings(max_cost_usd=Decimal("0.0006")))
    assert outcome.report.stop is not None and outcome.report.stop.reason.name == "BUDGET"
    store = Store.open(spec.checkpoint_path(), job=spec.name)
    try:
        unfinished = store.unfinished([f"T-{i}" for i in range(40)])
        assert store.spent_usd(spec.server(sandbox=False)) == sandbox.stats.charged_usd > 0
    finally:
        store.close()
    assert any(status == "pending" and bill.attempts > 0 for status, bill in unfinished.values())
    assert outcome.report.summary.cost_usd == sandbox.stats.charged_usd
