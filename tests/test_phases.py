"""run_job's phases, each driven alone: plan refuses before anything is opened, write rebuilds from the checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from batchrunner import interrupts
from batchrunner.errors import SpecError
from batchrunner.files import summary_path
from batchrunner.lock import lock_path
from batchrunner.runner import Opened, RunSettings, plan_run, run_job, write_run
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec
from batchrunner.store import Store


@pytest.mark.parametrize(
    ("changes", "settings", "named"),
    [
        ({"mode": "batch"}, RunSettings(sandbox=SandboxConfig(), wait=False), "--no-wait"),
        ({"prompt": "Ticket {nope}"}, RunSettings(sandbox=SandboxConfig()), "nope"),
        ({"id_column": "missing"}, RunSettings(sandbox=SandboxConfig()), "missing"),
    ],
)
def test_the_plan_refuses_a_bad_job_before_anything_is_opened(
    write_spec: Callable[..., Path], changes: dict[str, object], settings: RunSettings, named: str
) -> None:
    """plan_run alone refuses a job that cannot run (SpecError naming why), leaving no lock, checkpoint or output."""
    spec = load_spec(write_spec(**changes))
    with pytest.raises(SpecError, match=named):
        plan_run(spec, settings)
    assert not lock_path(spec.checkpoint_path()).exists()
    assert not spec.checkpoint_path().exists()
    assert not spec.output.parent.exists()


def test_the_plan_counts_the_pairs_a_limited_run_sets_out_to_do(write_spec: Callable[..., Path]) -> None:
    """plan_run alone knows the rows read (--limit caps them) and the pairs: rows x models x samples."""
    spec = load_spec(write_spec(models=["a/one", "b/two"], samples=3))
    limited = plan_run(spec, RunSettings(limit=5, sandbox=SandboxConfig()))
    whole = plan_run(spec, RunSettings(limit=500, sandbox=SandboxConfig()))
    assert (limited.rows, limited.total) == (5, 5 * 2 * 3)
    assert (whole.rows, whole.total) == (12, 12 * 2 * 3)
    assert limited.sandbox_url is None, "planned, not connected"


async def test_the_write_phase_rebuilds_the_output_from_the_checkpoint(write_spec: Callable[..., Path]) -> None:
    """write_run alone, with no report (a run that died), writes the output from the checkpoint's answers and
    no summary, and records the run as unfinished."""
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
    written_by_run = pl.read_parquet(spec.output)
    spec.output.unlink()
    summary_path(spec.output).unlink()
    plan = plan_run(spec, RunSettings())
    store = Store.open(spec.checkpoint_path(), server=plan.requests.server, job=spec.name)
    store.begin_run()
    with interrupts.caught() as caught:
        rows = write_run(plan, Opened(store, state=None), None, caught)
    assert rows == 12
    assert pl.read_parquet(spec.output).equals(written_by_run)
    assert not summary_path(spec.output).exists(), "no report, no summary"
    again = Store.open(spec.checkpoint_path(), server=plan.requests.server, job=spec.name)
    assert again.runs()[-1]["outcome"] == "unfinished"
    again.close()


async def test_the_write_phase_writes_the_summary_of_a_report(write_spec: Callable[..., Path]) -> None:
    """write_run alone, given a finished run's report, writes the summary JSON beside the output with its counts."""
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        outcome = await run_job(spec)
    summary_path(spec.output).unlink()
    plan = plan_run(spec, RunSettings())
    store = Store.open(spec.checkpoint_path(), server=plan.requests.server, job=spec.name)
    store.begin_run()
    with interrupts.caught() as caught:
        write_run(plan, Opened(store, state=None), outcome.report, caught)
    written = json.loads(summary_path(spec.output).read_text())
    assert written["job"] == "test-job" and written["rows_ok"] == 12 and written["rows_pending"] == 0
