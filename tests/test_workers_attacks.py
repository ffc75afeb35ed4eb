"""`workers: N` attacked: promises a one-process run keeps, kept with worker processes too."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import run_until
from test_workers import env_for, job

from batchrunner.retries import RetryPolicy
from batchrunner.sandbox import Sandbox, SandboxConfig


def run(spec: Path, sandbox: Sandbox) -> subprocess.CompletedProcess[str]:
    """`batchrunner run spec` in its own process against `sandbox`, as cron would run it."""
    return subprocess.run(
        [sys.executable, "-m", "batchrunner", "run", str(spec)],
        env=env_for(sandbox),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_two_workers_keep_to_the_account_rate(
    tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """Two workers under a rate limit of 20/s are paced as one process is: no 429 from the server (slots granted
    in a group used to reach the worker at once, and go out as a burst over the account's rate)."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.01, rate_limit=20))
    done = run(job(tmp_path, 60, concurrency=16, rate_limit={"requests_per_second": 20}), sandbox)
    assert done.returncode == 0, done.stderr
    assert "rate limited" not in done.stderr
    assert sandbox.stats.requests == 60  # none refused with a 429 and asked again


@pytest.mark.slow
def test_concurrency_auto_finds_the_servers_capacity_with_workers(
    tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """`concurrency: auto` with two workers backs off a server that holds 6 at once, as one process does: every
    row answered, few requests shed (the workers once sent max_concurrency regardless: hundreds of 503s, open
    circuits and failed rows)."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.05, capacity=6))
    done = run(job(tmp_path, 150, concurrency="auto", max_concurrency=64), sandbox)
    assert done.returncode == 0, done.stderr
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 150
    assert sandbox.stats.shed <= 60, f"{sandbox.stats.shed} requests shed"  # one process: ~7; two learners: ~20


def _stored_cost(checkpoint: Path) -> Decimal:
    """What the checkpoint's records say was (or may have been) paid, every record counted."""
    with contextlib.closing(sqlite3.connect(checkpoint)) as db:
        return sum(
            (Decimal(c) for (c,) in db.execute("SELECT cost_usd FROM results WHERE cost_usd IS NOT NULL")), Decimal(0)
        )


@pytest.mark.slow
def test_a_second_ctrl_c_records_what_the_workers_had_on_the_wire(
    tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """Ctrl-C twice with workers: the requests the workers had on the wire are recorded at their worst case (they
    may have been billed), as one process records its own, so the checkpoint holds at least what the server
    charged (the parent's last words once knew nothing of the workers' wire: it was lost, paid for)."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=1.0))
    process = run_until(job(tmp_path, 100), env_for(sandbox), lambda: sandbox.stats.requests >= 12)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 3, stderr
    assert "Traceback" not in stderr
    time.sleep(1.5)  # the requests the run gave up on land at the server, and are charged
    assert sandbox.stats.charged_usd > 0
    assert _stored_cost(tmp_path / "out.checkpoint.sqlite") >= sandbox.stats.charged_usd


WORKER_BUG = """
import builtins, multiprocessing, sys

_import = builtins.__import__


def _patched(name, *args, **kwargs):
    module = _import(name, *args, **kwargs)
    flow = sys.modules.get("batchrunner.flow")
    if hasattr(flow, "RowFlow") and not getattr(flow, "_bug", False):
        flow._bug = True
        answered = flow.RowFlow.answered

        def buggy(self, completion):
            if multiprocessing.current_process().name.startswith("batchrunner-worker"):
                raise RuntimeError("a bug in a worker")
            return answered(self, completion)

        flow.RowFlow.answered = buggy
    return module


builtins.__import__ = _patched
"""


@pytest.mark.slow
def test_a_bug_in_a_worker_ends_the_run_as_a_bug_in_one_process_does(
    tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """A bug raised in the workers ends the run as one process's does (exit 1, the bug's own trace once), not as
    workers killed by the system (exit 3, "memory?", which a scheduler reruns for ever), with workers restarted
    into the same bug and a traceback each."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(WORKER_BUG)
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.01))
    done = subprocess.run(
        [sys.executable, "-m", "batchrunner", "run", str(job(tmp_path, 40))],
        env={**env_for(sandbox), "PYTHONPATH": str(tmp_path / "inject")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "RuntimeError: a bug in a worker" in done.stderr
    assert "memory?" not in done.stderr and "ended unexpectedly" not in done.stderr
    assert done.stderr.count('raise RuntimeError("a bug in a worker")') == 1, done.stderr  # one trace, not one a worker


@pytest.mark.slow
def test_a_script_calling_run_with_workers_runs_once(
    tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """A script that calls batchrunner.run() with workers, without `if __name__ == "__main__"` (as the API's
    examples do), runs once: spawn re-imports the main script in every worker, so its top level ran again in each
    (here, its print: three times for two workers)."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.01))
    spec = job(tmp_path, 20)
    script = tmp_path / "script.py"
    script.write_text(f"import batchrunner\nbatchrunner.run({str(spec)!r})\nprint('the script ran')\n")
    done = subprocess.run(
        [sys.executable, str(script)], env=env_for(sandbox), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("the script ran") == 1, done.stdout


@pytest.mark.slow  # seconds of paced or multi-process runs: the long set (CI's second step)
async def test_the_progress_line_counts_the_pairs_waiting_to_retry_in_workers(tmp_path: Path) -> None:
    """Pairs a worker holds back to retry (a 429's Retry-After) are counted as waiting on the parent's progress
    line, as one process counts its own, and the count is back at zero when the run ends."""
    from batchrunner.progress import Progress
    from batchrunner.runner import RunSettings, run_job
    from batchrunner.spec import load_spec

    seen: list[int] = []

    class Watching(Progress):
        def retry(self, delta: int) -> None:
            super().retry(delta)
            seen.append(self.retrying)

    def factory(total: int, **kwargs: Any) -> Progress:
        return Watching(total, interactive=False, **kwargs)

    config = SandboxConfig(faults={"rate_limit": 0.3}, retry_after_s=0.05)
    settings = RunSettings(sandbox=config, progress_factory=factory, retry=RetryPolicy(5, 0.01, 0.05))
    outcome = await run_job(load_spec(job(tmp_path, 60)), settings)
    assert outcome.report.summary.ok == 60
    assert seen and max(seen) > 0 and seen[-1] == 0


async def test_a_run_whose_workers_cannot_be_started_stops_saying_why(tmp_path: Path) -> None:
    """No worker can be started (a Ray cluster with no room, a system refusing processes): the run stops with the
    reason (exit 3, nothing lost), instead of a traceback or waiting for ever for a worker to hand pairs to."""
    from batchrunner.halt import StopReason
    from batchrunner.processes import ProcessExecutor, WorkerSetup, WorkerStartFailed
    from batchrunner.runner import RunSettings, run_job
    from batchrunner.spec import load_spec

    class Refusing(ProcessExecutor):
        async def launch(self, setup: WorkerSetup) -> Any:
            raise WorkerStartFailed("the cluster has no room")

    settings = RunSettings(sandbox=SandboxConfig(), executor=Refusing(2, sandbox_url=None, server="s"))
    outcome = await asyncio.wait_for(run_job(load_spec(job(tmp_path, 20)), settings), timeout=30)
    stop = outcome.report.stop
    assert stop is not None and stop.reason is StopReason.INPUT
    assert "no worker could be started (the cluster has no room)" in stop.message
    assert outcome.report.summary.ok == 0
