"""`workers: N` (processes.py): pairs answered in worker processes, the parent storing, pacing and budgeting them."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import run_until

from batchrunner.errors import SpecError
from batchrunner.processes import Granted, Parent, WorkerSetup, share
from batchrunner.retries import RetryPolicy
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import spec_from_mapping


def job(tmp_path: Path, rows: int, **changes: Any) -> Path:
    """A job of `rows` rows in two worker processes, against the server in OPENROUTER_BASE_URL."""
    pl.DataFrame({"id": [f"r{n}" for n in range(rows)], "text": [f"text {n}" for n in range(rows)]}).write_parquet(
        tmp_path / "in.parquet"
    )
    spec = {
        "name": "workers",
        "input": "in.parquet",
        "id_column": "id",
        "output": "out.parquet",
        "models": ["openai/gpt-4o-mini"],
        "prompt": "About {text}",
        "params": {"max_tokens": 20},
        "concurrency": 8,
        "workers": 2,
        **changes,
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(spec))
    return path


def env_for(sandbox: Sandbox) -> dict[str, str]:
    return {**os.environ, "OPENROUTER_BASE_URL": sandbox.base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}


def children(pid: int) -> list[int]:
    """The processes `pid` started (its worker processes)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def workers_of(pid: int) -> list[int]:
    """The worker processes among `pid`'s children (multiprocessing's spawn helper is one too)."""
    return [child for child in children(pid) if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text()]


@pytest.mark.slow  # spawns two interpreters: seconds of CPU, in the long set
def test_two_workers_answer_every_row_once_and_both_take_part(
    tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """With workers: 2 every row is answered and stored once (the server saw each request once), both workers
    answered some, and the output is a one-process run's."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.005))
    done = subprocess.run(
        [sys.executable, "-m", "batchrunner", "run", str(job(tmp_path, 300))],
        env=env_for(sandbox),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    output = pl.read_parquet(tmp_path / "out.parquet")
    assert output.height == 300 and set(output["status"]) == {"ok"}
    assert sandbox.stats.requests == 300 and max(sandbox.stats.answered.values()) == 1
    answered = next(line for line in done.stderr.splitlines() if "worker processes answered" in line)
    counts = [int(n) for n in answered.split("answered ")[1].split(" pairs")[0].split(", ")]
    assert len(counts) == 2 and sum(counts) == 300 and min(counts) > 0


@pytest.mark.slow  # spawns two interpreters: seconds of CPU, in the long set
def test_the_budget_holds_across_workers(tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]) -> None:
    """Two workers under one budget spend no more than it: the run stops on the budget (exit 3) with what the
    server charged within it."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.01))
    budget = Decimal("0.0005")
    done = subprocess.run(
        [sys.executable, "-m", "batchrunner", "run", str(job(tmp_path, 300, budget_usd=str(budget)))],
        env=env_for(sandbox),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert "budget" in done.stderr
    assert 0 < sandbox.stats.charged_usd <= budget
    assert 0 < sandbox.stats.requests < 300
    stored = pl.read_parquet(tmp_path / "out.parquet")["cost_usd"].cast(pl.Decimal(scale=12)).sum()
    assert stored == sandbox.stats.charged_usd  # every answer paid for reached the checkpoint


@pytest.mark.slow
def test_a_worker_killed_mid_run_costs_only_what_was_on_its_wire(
    tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """kill -9 of one worker mid-run: its pairs go to a new worker, the run ends with every row answered, and the
    requests asked twice are at most what the dead worker had on the wire (its share of the concurrency, 4) and
    the answers it had not handed back yet (those of the last FLUSH_S: at most its 4 again)."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.1))
    process = run_until(job(tmp_path, 400), env_for(sandbox), lambda: sandbox.stats.requests >= 60)
    victims: list[int] = []
    for _ in range(100):
        victims = workers_of(process.pid)
        if len(victims) == 2:
            break
        time.sleep(0.05)
    os.kill(victims[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "ended unexpectedly (killed by signal 9)" in stderr
    output = pl.read_parquet(tmp_path / "out.parquet")
    assert output.height == 400 and set(output["status"]) == {"ok"}
    twice = sum(count - 1 for count in sandbox.stats.answered.values())
    assert twice <= 4 + 4, f"{twice} answers paid twice"


@pytest.mark.slow
def test_the_parent_killed_takes_its_workers_along_and_a_rerun_finishes(
    tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """kill -9 of the run's own process: its workers quit at once (no orphan goes on spending), and a rerun
    answers the rest, paying twice for at most what was on the wire and not yet committed."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.1))
    spec = job(tmp_path, 300)
    process = run_until(spec, env_for(sandbox), lambda: sandbox.stats.requests >= 80)
    workers: list[int] = []
    for _ in range(100):
        workers = workers_of(process.pid)
        if len(workers) == 2:
            break
        time.sleep(0.05)
    process.kill()
    process.communicate()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and _running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() and _running(pid) for pid in workers), "a worker outlived its run"
    rerun = subprocess.run(
        [sys.executable, "-m", "batchrunner", "run", str(spec)],
        env=env_for(sandbox),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 300
    twice = sum(count - 1 for count in sandbox.stats.answered.values())
    assert twice <= 8 + 16, f"{twice} answers paid twice"  # on the wire (8) and not yet committed (0.2 s of them)


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


SHARES = [  # (concurrency, workers): every worker has at least one, and together they have the spec's
    (8, 2),
    (9, 2),
    (1, 3),
    (16, 3),
    (64, 7),
]


@pytest.mark.parametrize(("concurrency", "workers"), SHARES)
def test_workers_share_the_concurrency(concurrency: int, workers: int) -> None:
    """Each worker's share of `concurrency` (and max_concurrency): at least one, and the shares add up to the
    spec's whenever it has one for each worker."""
    spec = spec_from_mapping(
        {
            "name": "w",
            "input": "in.csv",
            "output": "out.csv",
            "models": ["m/x"],
            "prompt": "{a}",
            "concurrency": concurrency,
        }
    )
    parts = [share(spec, workers, number).most_in_flight for number in range(workers)]
    assert min(parts) >= 1
    assert sum(parts) == max(concurrency, workers)
    assert all(share(spec, workers, number).workers == 1 for number in range(workers))


def test_a_batch_job_cannot_have_workers() -> None:
    """mode: batch with workers refused when the spec is read, naming the fix."""
    with pytest.raises(SpecError, match="mode batch submits from one process"):
        spec_from_mapping(
            {
                "name": "w",
                "input": "in.csv",
                "output": "out.csv",
                "models": ["m/x"],
                "prompt": "{a}",
                "mode": "batch",
                "workers": 2,
            }
        )


class _Wire:
    """The worker's end of a channel in a test: what it sends is kept, and the parent's answers are scripted."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, message: Any) -> None:
        self.sent.append(message)


@pytest.mark.parametrize("seed", range(5))
def test_requests_waiting_for_slots_each_get_one_without_spinning(seed: int) -> None:
    """Requests of a worker arrive at random moments and wait for slots of the parent's rate limit, whose answers
    also come at random moments: every request gets its slot, with fewer questions than requests. (A request
    that came in after an answer arrived and before it was counted once spun for ever without yielding.)"""
    wire = _Wire()
    spec = spec_from_mapping({"name": "w", "input": "in.csv", "output": "out.csv", "models": ["m/x"], "prompt": "{a}"})
    setup = WorkerSetup(spec, 0, "", None, RetryPolicy(), None, None, True, False, 1.0, 0)
    parent = Parent(wire, setup)  # type: ignore[arg-type]
    rng = random.Random(seed)
    got: list[int] = []
    requests = 200

    async def grant() -> None:
        answered = 0
        while len(got) < requests:
            await asyncio.sleep(0)
            while answered < len(wire.sent):
                message, answered = wire.sent[answered], answered + 1
                for _ in range(message.count):  # one Granted per slot, each at its own moment
                    for _ in range(rng.randrange(3)):
                        await asyncio.sleep(0)
                    parent.answered(Granted(message.ask, True))

    async def request(number: int) -> None:
        for _ in range(rng.randrange(20)):
            await asyncio.sleep(0)
        await parent.acquire("m/x")
        got.append(number)

    async def main() -> None:
        await asyncio.gather(grant(), *(request(n) for n in range(requests)))

    finished = threading.Event()

    def run() -> None:
        asyncio.run(main())
        finished.set()

    threading.Thread(target=run, daemon=True).start()
    assert finished.wait(10), "requests waiting for slots never got them"
    assert sorted(got) == list(range(requests))
    assert len(wire.sent) < requests
