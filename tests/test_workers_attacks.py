"""`workers: N` attacked: promises a one-process run keeps, kept with worker processes too."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from test_workers import env_for, job

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
