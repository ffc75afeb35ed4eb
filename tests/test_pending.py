"""pending.py: which pairs are left, and the rerun that knows without reading a row that none are."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from batchrunner.request import RequestBuilder
from batchrunner.retries import RetryPolicy
from batchrunner.runner import run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec


def no_rows_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a row was rendered")

    monkeypatch.setattr(RequestBuilder, "for_rows", refuse)


async def test_an_unchanged_complete_job_is_rerun_without_reading_a_row_or_rewriting_the_output(
    write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a run that left every pair answered, a rerun of the same input and spec renders no row, sends
    nothing and leaves the output file as it was; every pair counts as answered by earlier runs."""
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
        written = spec.output.stat().st_mtime_ns
        with monkeypatch.context() as patch:
            no_rows_read(patch)
            outcome = await run_job(spec)
    assert sandbox.stats.requests == 12 and outcome.report.resumed == 12 and outcome.report.pending == 0
    assert outcome.output_rows == 12 and spec.output.stat().st_mtime_ns == written


@pytest.mark.parametrize("change", ["append", "touch", "prompt", "output deleted"])
async def test_any_change_goes_the_long_way(
    write_spec: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """An input appended to (or only touched), an edited prompt, or a deleted output: the rerun reads the rows
    again, sends exactly what changed, and writes the output."""
    source = tmp_path / "tickets.csv"
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
        if change == "append":
            with source.open("a") as handle:
                handle.write("T-new,s,a new ticket\n")
        elif change == "touch":
            source.touch()
        elif change == "prompt":
            spec = load_spec(write_spec(api={"base_url": sandbox.base_url}, prompt="Other {text}"))
        else:
            spec.output.unlink()
        outcome = await run_job(spec)
    sent = {"append": 1, "touch": 0, "prompt": 12, "output deleted": 0}[change]
    assert sandbox.stats.requests == 12 + sent and outcome.report.summary.done == sent
    assert pl.read_parquet(spec.output).height == (13 if change == "append" else 12)


async def test_a_run_that_left_failures_or_ran_a_limit_is_not_complete(
    write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed rows are asked again by the next run, and a --limit run says nothing of the rows it did not read."""
    async with Sandbox(SandboxConfig(faults={"hostile_error": 1.0})) as sandbox:  # a 400 for every request
        spec = load_spec(write_spec(retry={"max_attempts": 1}, api={"base_url": sandbox.base_url}))
        await run_job(spec, retry=RetryPolicy.immediate(max_attempts=1))
        await run_job(spec, retry=RetryPolicy.immediate(max_attempts=1))
    assert sandbox.stats.requests == 24, "the failed rows were asked again"
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(checkpoint="out/limited.sqlite", api={"base_url": sandbox.base_url}))
        await run_job(spec, limit=5)
        outcome = await run_job(spec)
    assert sandbox.stats.requests == 12 and outcome.report.resumed == 5
