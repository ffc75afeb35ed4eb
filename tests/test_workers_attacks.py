"""`workers: N` attacked: promises a one-process run keeps, kept with worker processes too."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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
