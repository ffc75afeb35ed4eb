"""A slice of a job: run --retry-failed, --where, --ids (as promptfoo's --filter-failing and Inspect's eval-retry)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import polars as pl
from conftest import cli_here

from batchrunner.runner import RunSettings, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec


async def test_retry_failed_asks_only_the_failed_pairs(write_spec: Callable[..., Path]) -> None:
    """After a run where some rows failed (and others were never asked: --limit), --retry-failed sends exactly
    the failed ones, never the rows not yet asked, and they end answered."""
    async with Sandbox(SandboxConfig(faults={"hostile_error": 0.4}, seed=3)) as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        first = await run_job(spec, RunSettings(limit=8))
        failed = first.report.summary.failed
        assert 0 < failed < 8
        sandbox.config.faults.clear()  # the server is healthy again
        asked = sandbox.stats.requests
        again = await run_job(spec, RunSettings(retry_failed=True))
        assert sandbox.stats.requests - asked == failed, "only the failed pairs are asked"
    assert again.report.summary.ok == failed and again.report.summary.failed == 0
    output = pl.read_parquet(spec.output)
    assert (output["status"] == "ok").sum() == 8, "rows 8-11 were never asked: not part of a retry"


async def test_where_runs_the_rows_it_selects_and_a_later_run_the_rest(write_spec: Callable[..., Path]) -> None:
    """--where sends only the rows its SQL condition selects; the next full run sends the others, none twice."""
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        sliced = await run_job(spec, RunSettings(where="ticket_id IN ('T-3', 'T-7') OR subject = 'subject 10'"))
        assert sandbox.stats.requests == 3 and sliced.report.summary.ok == 3 and sliced.report.pending == 0
        rest = await run_job(spec, RunSettings())
        assert sandbox.stats.requests == 12 and rest.report.resumed == 3 and rest.report.summary.ok == 9


def test_retry_failed_with_fresh_is_refused_before_the_checkpoint_is_touched(write_spec: Callable[..., Path]) -> None:
    """--retry-failed retries the failures the checkpoint holds and --fresh deletes them first: together, exit 2
    naming both, the stored answers kept. Before: the checkpoint deleted, and a retry of nothing."""
    job = write_spec()
    env = {**os.environ, "OPENROUTER_API_KEY": ""}
    assert cli_here("run", str(job), "--sandbox", "--limit", "3", env=env).returncode == 0
    refused = cli_here("run", str(job), "--sandbox", "--retry-failed", "--fresh", "--yes", env=env)
    assert refused.returncode == 2, refused.stderr
    assert "--retry-failed: retries the failed rows" in refused.stderr and "--fresh" in refused.stderr
    status = json.loads(cli_here("status", str(job), "--sandbox", "--json", env=env).stdout)
    assert status["models"]["openai/gpt-4o-mini"]["ok"] == 3, "the stored answers are kept"


def test_ids_and_a_bad_where_through_the_cli(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """--ids FILE sends the rows listed (comments and blank lines skipped); a --where polars cannot read, or
    naming no column of the input, is refused before anything is sent (exit 2, naming --where)."""
    job = write_spec()
    ids = tmp_path / "ids.txt"
    ids.write_text("# the two to redo\nT-1\n\nT-5\n")
    env = {**os.environ, "OPENROUTER_API_KEY": ""}
    done = cli_here("run", str(job), "--sandbox", "--ids", str(ids), "--json", env=env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["rows_ok"], summary["rows_pending"]) == (2, 0)
    for clause, said in (("tier = = 'x'", "not a SQL condition"), ("tier = 'pro'", "the input's columns")):
        refused = cli_here("run", str(job), "--sandbox", "--where", clause, env=env)
        assert refused.returncode == 2 and "--where" in refused.stderr and said in refused.stderr, refused.stderr
        assert "__batchrunner_row" not in refused.stderr  # batchrunner's own column is not the user's to name
