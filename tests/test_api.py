"""The Python API (api.py): a job from a dict or a file, in plain code, inside a running event loop and off the
main thread; outcomes as the command line's exit codes say them (a job that cannot start raises; a run that
stopped early returns, saying why; failed rows are rows)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from conftest import cli_here

import batchrunner
from batchrunner.halt import StopReason
from batchrunner.lock import job_lock, lock_path
from batchrunner.sandbox import Sandbox, SandboxConfig

VARYING = ["latency_s", "ttft_s", "generation_id"]  # what differs between two runs of the same job


def job_dict(tickets_csv: Path, tmp_path: Path, **changes: Any) -> dict[str, Any]:
    return {
        "name": "api-job",
        "input": str(tickets_csv),
        "id_column": "ticket_id",
        "output": str(tmp_path / "out" / "result.parquet"),
        "models": ["openai/gpt-4o-mini"],
        "prompt": "Ticket {ticket_id}: {text}",
        "params": {"temperature": 0, "max_tokens": 50},
        **changes,
    }


def test_a_job_from_a_dict_runs_on_the_sandbox_and_its_frame_is_the_clis_output(
    tickets_csv: Path, tmp_path: Path
) -> None:
    """run() of a dict: every row answered, the frame is the output file, and the same job through the command
    line writes the same rows and answers."""
    result = batchrunner.run(job_dict(tickets_csv, tmp_path), sandbox=True)
    assert (result.exit_code, result.stop, result.complete) == (0, None, True)
    assert result.summary.ok == 12 and result.summary.cost_usd > 0 and result.pending == 0
    assert result.frame is not None and result.frame.equals(pl.read_parquet(result.output_path))
    cli_job = tmp_path / "cli" / "job.yaml"
    cli_job.parent.mkdir()
    cli_job.write_text(yaml.safe_dump(job_dict(tickets_csv, tmp_path / "cli")))
    done = cli_here("run", str(cli_job), "--sandbox", env={**os.environ, "OPENROUTER_API_KEY": ""})
    assert done.returncode == 0, done.stderr
    by_cli = pl.read_parquet(tmp_path / "cli" / "out" / "result.parquet")
    assert result.frame.drop(VARYING).equals(by_cli.drop(VARYING))


async def test_arun_inside_a_running_event_loop(tickets_csv: Path, tmp_path: Path) -> None:
    """arun() is awaited where a loop already runs (a notebook, an async pipeline), and run() works there too, on a
    thread of its own (asyncio.run alone would refuse: a loop is already running)."""
    result = await batchrunner.arun(job_dict(tickets_csv, tmp_path), sandbox=True, limit=4)
    assert result.summary.ok == 4 and result.exit_code == 0
    again = batchrunner.run(job_dict(tickets_csv, tmp_path), sandbox=True, limit=6)
    assert (again.resumed, again.summary.ok) == (4, 2)


def test_run_off_the_main_thread(tickets_csv: Path, tmp_path: Path) -> None:
    """run() from a worker thread (where no signal handler can be installed) runs the job all the same."""
    results: list[Any] = []
    thread = threading.Thread(
        target=lambda: results.append(batchrunner.run(job_dict(tickets_csv, tmp_path), sandbox=True))
    )
    thread.start()
    thread.join(60)
    assert results and results[0].summary.ok == 12


def test_a_budget_stop_is_returned_with_its_reason(tickets_csv: Path, tmp_path: Path) -> None:
    """A run the budget stops returns (exit 3's meaning): its stop names the reason, rows left are pending."""
    result = batchrunner.run(job_dict(tickets_csv, tmp_path, concurrency=1), sandbox=True, max_cost="0.00005")
    assert result.stop is not None and result.stop.reason is StopReason.BUDGET
    assert "budget of $0.00005" in result.stop.message
    assert result.exit_code == 3 and not result.complete and result.pending > 0
    assert result.summary.cost_usd <= Decimal("0.00005")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"models": []}, "job: models"),
        ({"prompt": "Ticket {nope}"}, "nope"),
        ({"concurrency": 0}, "job: concurrency"),
    ],
)
def test_a_bad_job_raises_before_anything_is_sent(
    tickets_csv: Path, tmp_path: Path, change: dict[str, Any], named: str
) -> None:
    """A job that cannot start (exit 2's meaning) raises SpecError, from the one error tree, naming the field;
    nothing is opened or sent."""
    with pytest.raises(batchrunner.SpecError, match=named):
        batchrunner.run(job_dict(tickets_csv, tmp_path, **change), sandbox=True)
    assert not (tmp_path / "out").exists()


def test_a_bad_option_raises(tickets_csv: Path, tmp_path: Path) -> None:
    """max_cost that is not an amount of USD is refused as a spec problem, before anything is opened."""
    with pytest.raises(batchrunner.SpecError, match="max_cost"):
        batchrunner.run(job_dict(tickets_csv, tmp_path), sandbox=True, max_cost="two dollars")


def test_a_job_another_run_holds_returns_not_started(tickets_csv: Path, tmp_path: Path) -> None:
    """While another run holds the job's lock, run() returns at once with stop NOT_STARTED (exit 3's meaning:
    wait it out), not an exception."""
    spec = batchrunner.job_spec(job_dict(tickets_csv, tmp_path))
    spec.checkpoint_path().parent.mkdir(parents=True, exist_ok=True)
    with job_lock(lock_path(spec.checkpoint_path())):
        result = batchrunner.run(spec, sandbox=True)
    assert result.stop is not None and result.stop.reason is StopReason.NOT_STARTED
    assert "already running" in result.stop.message and result.exit_code == 3 and result.frame is None


def test_a_spec_file_with_the_clis_overrides(
    tickets_csv: Path, tmp_path: Path, write_spec: Callable[..., Path]
) -> None:
    """A spec file and the command line's options as keywords: --output and --limit."""
    result = batchrunner.run(write_spec(), sandbox=True, limit=3, output=tmp_path / "elsewhere.csv")
    assert result.output_path == tmp_path / "elsewhere.csv"
    assert result.frame is not None and result.frame.height == 3


def test_estimate_status_and_report_return_values(tickets_csv: Path, tmp_path: Path) -> None:
    """estimate(), status() and report() return what `--json` prints and the report's figures, as values."""
    job = job_dict(
        tickets_csv,
        tmp_path,
        evaluate={"reference": "subject", "metric": "contains"},
    )
    estimate = batchrunner.estimate(job, sandbox=True)
    assert estimate["rows"] == 12 and Decimal(estimate["max_cost_usd"]) > 0
    batchrunner.run(job, sandbox=True)
    status = batchrunner.status(job, sandbox=True)
    assert status["models"]["openai/gpt-4o-mini"]["ok"] == 12
    report = batchrunner.report(job, sandbox=True)
    assert [model.model for model in report.models] == ["openai/gpt-4o-mini"]


@pytest.mark.slow  # a script in its own interpreter, signalled twice: the long set (CI's second step)
def test_a_second_ctrl_c_returns_from_run_instead_of_ending_the_process(
    write_spec: Callable[..., Path], sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """In a program using the API (a notebook's kernel), a second Ctrl-C gives up on the requests in flight and
    run() returns, recording them at their estimate, where the command line would exit at once."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=3.0))
    job = write_spec(concurrency=4, api={"base_url": sandbox.base_url})
    script = textwrap.dedent(
        f"""
        import batchrunner
        result = batchrunner.run({str(job)!r})
        print("returned", result.stop.reason.name, result.exit_code, flush=True)
        """
    )
    env = {**os.environ, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 30
    while sandbox.stats.requests < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert "returned INTERRUPTED 3" in out, err
    assert "giving up on the requests in flight" in err
