"""One run per job: a second run is refused naming the first; a dead run's lock is taken over."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchrunner.errors import RunHalted
from batchrunner.lock import job_lock


def test_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    """While a process holds the lock, another is refused with its pid; after release it is free."""
    path = tmp_path / "job.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from batchrunner.lock import job_lock\nimport time\nwith job_lock(__import__('pathlib').Path({str(path)!r})):\n    print('held', flush=True)\n    time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunHalted, match=f"already running \\(pid {holder.pid} "), job_lock(path):
            pass
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    with job_lock(path):  # the kernel released the dead process's lock
        pass


def test_stale_lock_file_is_taken_over(tmp_path: Path) -> None:
    """A lock file left by a killed run (nobody holds it) does not block the next run."""
    path = tmp_path / "job.lock"
    path.write_text('{"pid": 999999, "host": "gone", "since": "yesterday"}')
    with job_lock(path):
        assert str(os.getpid()) in path.read_text()


def test_lock_is_released_after_the_block(tmp_path: Path) -> None:
    """While the block runs a second taker is refused; once it ends (even by an exception) the lock is free."""
    path = tmp_path / "job.lock"
    with job_lock(path), pytest.raises(RunHalted, match="already running"), job_lock(path):
        pass
    with pytest.raises(ValueError), job_lock(path):
        raise ValueError("the run failed")
    with job_lock(path):
        pass
