"""Batch mode from cron, against the Batch API as OpenRouter documents it now: --no-wait runs that collect what
ended, cancel that never discards an ended batch, lost submissions looked for on every page, results read page by
page and resumed after a crash, reservations that outlive the run, failed and cancelled batches."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import polars as pl
import pytest
from conftest import cli_here, run_cli
from helpers.scripted import Reply, Scripted

from batchrunner.client import Client
from batchrunner.errors import SpecError
from batchrunner.offline import job_status
from batchrunner.queries import cancel_batches
from batchrunner.runner import RunSettings, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import JobSpec, load_spec


class Clock:
    """The sandbox Batch API's time, moved by hand: a batch ends when the test says so, not after a wait."""

    def __init__(self) -> None:
        self.now_s = 1_000_000.0

    def __call__(self) -> float:
        return self.now_s


def batch_job(write_spec: Callable[..., Path], tmp_path: Path, sandbox: Sandbox, rows: int, **changes: Any) -> JobSpec:
    name = f"rows{rows}.csv"
    pl.DataFrame({"ticket_id": [f"T-{i}" for i in range(rows)], "text": [f"text {i}" for i in range(rows)]}).write_csv(
        tmp_path / name
    )
    return load_spec(write_spec(input=name, mode="batch", api={"base_url": sandbox.base_url}, **changes))


async def test_no_wait_runs_collect_what_ended_and_submit_each_request_once(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """From cron: --no-wait submits; the next --no-wait finds the batch still running and leaves it; the one after
    it ended collects it, paying nothing new (before: every --no-wait run said 'submitted 0 batches' for ever)."""
    clock = Clock()
    async with Sandbox(SandboxConfig(batch_turnaround_s=600, batch_clock=clock)) as sandbox:
        spec = batch_job(write_spec, tmp_path, sandbox, 20)
        first = await run_job(spec, RunSettings(wait=False))
        clock.now_s += 60
        second = await run_job(spec, RunSettings(wait=False))
        clock.now_s += 600
        third = await run_job(spec, RunSettings(wait=False))
        fourth = await run_job(spec, RunSettings(wait=False))
    assert [run.report.summary.ok for run in (first, second, third, fourth)] == [0, 0, 20, 0]
    assert sandbox.stats.batches_submitted == 1 and sandbox.stats.batch_requests_submitted == 20
    assert sandbox.stats.batch_duplicates == 0
    assert pl.read_parquet(spec.output)["status"].to_list() == ["ok"] * 20


async def test_cancel_of_an_ended_batch_collects_it_and_buys_nothing_again(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """A batch that completed is not cancelled (its answers are paid for): cancel says the next run collects it,
    and the next run does, submitting nothing (before: it was marked requeued and bought again)."""
    clock = Clock()
    async with Sandbox(SandboxConfig(batch_turnaround_s=60, batch_clock=clock)) as sandbox:
        spec = batch_job(write_spec, tmp_path, sandbox, 10)
        await run_job(spec, RunSettings(wait=False))
        clock.now_s += 120
        done = await cancel_batches(spec)
        rerun = await run_job(spec, RunSettings(wait=False))
    assert done.cancelling == [] and [status for _, status in done.ended] == ["completed"]
    assert rerun.report.summary.ok == 10 and sandbox.stats.batches_submitted == 1


async def test_a_lost_submission_is_found_on_a_later_page_of_the_listing(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """A submission whose answer was lost, with 25 newer batches of the account ahead of it (the listing's first
    page holds 20): found on the second page and collected, never submitted again (before: 20 re-sent)."""
    async with Sandbox(SandboxConfig(batch_turnaround_s=0)) as sandbox:
        spec = batch_job(write_spec, tmp_path, sandbox, 20)
        await run_job(spec, RunSettings(wait=False))
        with sqlite3.connect(spec.checkpoint_path()) as db:  # as if the submit call's answer never came back
            db.execute("UPDATE batches SET batch_id = NULL, state = 'submitting'")
        async with aiohttp.ClientSession() as session:
            for i in range(25):
                body = {
                    "endpoint": "/v1/chat/completions",
                    "model": "openai/gpt-4o-mini",
                    "requests": [{"custom_id": f"o{i}", "body": {"messages": [{"role": "user", "content": "x"}]}}],
                }
                async with session.post(f"{sandbox.base_url}/batches", data=json.dumps(body)) as response:
                    assert response.status == 202
        rerun = await run_job(spec)
    assert rerun.report.summary.ok == 20
    assert sandbox.stats.batches_submitted == 26 and sandbox.stats.batch_duplicates == 0


async def test_results_are_read_page_by_page_and_a_crash_mid_download_resumes_at_its_cursor(
    write_spec: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A completed batch without inline results is collected through GET .../results, 100 a page; a run that dies
    after its second page keeps those 200 answers, and the next run reads from the third page on: nothing is asked
    again and no page is read twice (before: missing inline results meant every pair asked again)."""
    pages: list[str | None] = []
    read = Client.batch_results

    async def counted(self: Client, batch_id: str, cursor: str | None = None, *, limit: int = 1000) -> Any:
        if len(pages) == 2 and crash:
            raise RuntimeError("the process dies here")
        pages.append(cursor)
        return await read(self, batch_id, cursor, limit=100)

    monkeypatch.setattr(Client, "batch_results", counted)
    async with Sandbox(SandboxConfig(batch_turnaround_s=0, batch_inline_results=False)) as sandbox:
        spec = batch_job(write_spec, tmp_path, sandbox, 250)
        crash = True
        with pytest.raises(RuntimeError):
            await run_job(spec)
        assert job_status(spec, sandbox=False)["models"]["openai/gpt-4o-mini"]["ok"] == 200
        crash = False
        rerun = await run_job(spec)
    assert rerun.report.summary.ok == 50 and pl.read_parquet(spec.output).height == 250
    assert len(pages) == 3 and len(set(pages)) == 3, "each page read once"
    assert sandbox.stats.batches_submitted == 1 and sandbox.stats.batch_duplicates == 0


async def test_no_wait_with_the_built_in_sandbox_is_refused(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """--sandbox --no-wait would strand the job (the sandbox and its batches end with the run): exit 2, saying how
    to keep a sandbox running instead."""
    async with Sandbox() as sandbox:
        spec = batch_job(write_spec, tmp_path, sandbox, 5)
    with pytest.raises(SpecError, match="batchrunner sandbox --port"):
        await run_job(spec, RunSettings(sandbox=SandboxConfig(), wait=False))


async def test_a_batch_api_that_is_not_openrouters_is_refused_before_submitting(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """A LiteLLM-style server answers the listing in OpenAI's shape (its POST fails, run after run): exit 2 before
    anything is submitted, saying batch mode needs OpenRouter's Batch API."""
    listing = {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    async with Scripted(gets={"/batches": [Reply(200, listing)]}) as server:
        spec = batch_job(write_spec, tmp_path, server, 5)  # type: ignore[arg-type]
        with pytest.raises(SpecError, match="batch mode needs OpenRouter's Batch API"):
            await run_job(spec)
    assert server.bodies == []


async def test_no_wait_runs_never_commit_more_than_the_budget(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """Three --no-wait runs while the first run's batch is still open: its reservation is held again by each later
    run, so they submit nothing more (before: each run committed the whole budget again)."""
    clock = Clock()
    async with Sandbox(SandboxConfig(batch_turnaround_s=3600, batch_clock=clock)) as sandbox:
        spec = batch_job(write_spec, tmp_path, sandbox, 300, budget_usd=0.002)
        await run_job(spec, RunSettings(wait=False))
        first = sandbox.stats.batch_requests_submitted
        for _ in range(2):
            await run_job(spec, RunSettings(wait=False))
    assert 0 < first < 300 and sandbox.stats.batch_requests_submitted == first


async def test_a_batch_that_fails_validation_fails_its_rows_with_its_message(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """A 202 is not a valid batch: one that moves to `failed` fails each of its rows with the batch's message."""
    config = SandboxConfig(batch_turnaround_s=0, batch_fail_message="model openai/gpt-4o-mini has no batch variant")
    async with Sandbox(config) as sandbox:
        spec = batch_job(write_spec, tmp_path, sandbox, 5)
        outcome = await run_job(spec)
    assert outcome.report.summary.failed == 5
    output = pl.read_parquet(spec.output)
    assert output["error"].str.contains("the batch failed: model openai/gpt-4o-mini has no batch variant").all()


async def test_a_cancelled_batch_is_billed_for_what_it_finished_and_the_job_knows(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Cancelled half-way, a batch returns no rows but bills the requests it had finished: that cost is recorded
    against the job (status and the budget know it) and its rows are asked again by the next run."""
    clock = Clock()
    config = SandboxConfig(batch_turnaround_s=100, batch_clock=clock, batch_cancel_delay_s=0)
    async with Sandbox(config) as sandbox:
        spec = batch_job(write_spec, tmp_path, sandbox, 10)
        await run_job(spec, RunSettings(wait=False))
        clock.now_s += 50
        done = await cancel_batches(spec)
        billed_for_cancelled = sandbox.stats.charged_usd
        clock.now_s += 1
        sandbox.config.batch_turnaround_s = 0
        rerun = await run_job(spec)
    assert len(done.cancelling) == 1 and billed_for_cancelled > 0
    assert rerun.report.summary.ok == 10 and sandbox.stats.batches_submitted == 2
    assert Decimal(job_status(spec)["cost_usd"]) == sandbox.stats.charged_usd


@pytest.mark.slow
def test_twelve_thousand_results_paged_survive_a_kill_9_mid_download(
    write_spec: Callable[..., Path], tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """12,000 requests in 3 batches without inline results, read 1,000 a page; kill -9 once some pages are
    committed and before the last: the next run reads the rest from its cursors, losing nothing and asking
    nothing again."""
    sandbox = sandbox_in_thread(SandboxConfig(batch_turnaround_s=0, batch_inline_results=False))
    rows = 12_000
    pl.DataFrame({"ticket_id": [f"T-{i}" for i in range(rows)], "text": [f"text {i}" for i in range(rows)]}).write_csv(
        tmp_path / "many.csv"
    )
    job = write_spec(input="many.csv", mode="batch", batch={"poll_s": 0.1})
    env = {**os.environ, "OPENROUTER_BASE_URL": sandbox.base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "run", str(job)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / "out" / "result.checkpoint.sqlite"
    committed = 0
    deadline = time.monotonic() + 120
    while committed < 1000 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
        with contextlib.suppress(sqlite3.Error), sqlite3.connect(checkpoint) as db:
            committed = db.execute("SELECT count(*) FROM results WHERE status = 'ok'").fetchone()[0]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 1000 <= committed < rows, "killed mid-download"
    final = run_cli("run", str(job), env=env)
    assert final.returncode == 0, final.stderr[-2000:]
    output = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert output.height == rows and (output["status"] == "ok").all()
    assert sandbox.stats.batches_submitted == 3 and sandbox.stats.batch_duplicates == 0


def test_no_wait_in_a_live_run_is_refused_before_anything_is_sent(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """`run job.yaml --no-wait` without `--mode batch` (or `mode: batch`): before, the flag was ignored and the
    whole job ran live, at twice the price a batch would cost, when the user meant to submit and leave. Now exit 2
    naming --no-wait and the fix, before a request, a lock or a checkpoint."""
    spec = write_spec()
    env = {**os.environ, "OPENROUTER_API_KEY": ""}
    refused = cli_here("run", str(spec), "--sandbox", "--no-wait", env=env)
    assert refused.returncode == 2, refused.stderr
    assert "--no-wait: goes with batch mode" in refused.stderr and "--mode batch" in refused.stderr
    assert not (tmp_path / "out").exists()
