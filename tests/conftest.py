"""Shared fixtures: sample inputs, spec files, and sandboxes on loopback."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import looptime
import polars as pl
import pytest
import yaml

from batchrunner.sandbox import Sandbox, SandboxConfig

REPO = Path(__file__).resolve().parent.parent


def on_virtual_time(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on an event loop whose clock is virtual (looptime): sleeps and rate-limiter
    waits take no real time, and the loop's time() moves exactly by them, so a pacing test judges
    time precisely and deterministically, in milliseconds, on however loaded a machine."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        loop = looptime.new_event_loop(resolution=1e-12)  # finer than aiolimiter's float drift, or time stalls
        try:
            loop.run_until_complete(test(*args, **kwargs))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    return run


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep state that outlives a job (the free-model daily count) inside the test's folder."""
    path = tmp_path / "state"
    monkeypatch.setenv("BATCHRUNNER_STATE_DIR", str(path))
    return path


@pytest.fixture
def tickets_csv(tmp_path: Path) -> Path:
    """A small input: 12 tickets with ids, subjects and text."""
    path = tmp_path / "tickets.csv"
    pl.DataFrame(
        {
            "ticket_id": [f"T-{i}" for i in range(12)],
            "subject": [f"subject {i}" for i in range(12)],
            "text": [f"ticket text number {i}" for i in range(12)],
        }
    ).write_csv(path)
    return path


@pytest.fixture
def write_spec(tmp_path: Path, tickets_csv: Path) -> Callable[..., Path]:
    """Write a job spec (a valid one, with `changes` applied; None deletes a key) and return its path."""

    def write(text: str | None = None, **changes: Any) -> Path:
        path = tmp_path / "job.yaml"
        if text is not None:
            path.write_text(text)
            return path
        spec: dict[str, Any] = {
            "name": "test-job",
            "input": tickets_csv.name,
            "id_column": "ticket_id",
            "output": "out/result.parquet",
            "models": ["openai/gpt-4o-mini"],
            "prompt": "Ticket {ticket_id}: {text}",
            "params": {"temperature": 0, "max_tokens": 50},
            "concurrency": 4,
        }
        for key, value in changes.items():
            if value is None:
                spec.pop(key, None)
            else:
                spec[key] = value
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    return write


class _InThreads:
    """Servers each on its own event loop in a thread, for tests that drive the CLI in its own process; all
    stopped when the test ends."""

    def __init__(self) -> None:
        self.started: list[tuple[asyncio.AbstractEventLoop, threading.Thread]] = []

    def serve(
        self, start: Callable[[], Coroutine[Any, Any, Any]], stop: Callable[[], Coroutine[Any, Any, Any]]
    ) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(stop())
            loop.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        assert ready.wait(10), "the server did not start"
        self.started.append((loop, thread))

    def stop_all(self) -> None:
        for loop, thread in self.started:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)


@pytest.fixture
def sandbox_in_thread() -> Iterator[Callable[[SandboxConfig], Sandbox]]:
    """Start sandboxes on their own event loop in a thread, for tests that drive the CLI."""
    threads = _InThreads()

    def start(config: SandboxConfig) -> Sandbox:
        sandbox = Sandbox(config)
        threads.serve(sandbox.start, sandbox.stop)
        return sandbox

    yield start
    threads.stop_all()


@pytest.fixture
def scripted_in_thread() -> Iterator[Callable[..., Any]]:
    """A Scripted server (tests/helpers/scripted.py) on its own event loop in a thread, for a CLI in its own process."""
    from helpers.scripted import Scripted

    threads = _InThreads()

    def start(*args: Any, **kwargs: Any) -> Scripted:
        server = Scripted(*args, **kwargs)
        threads.serve(server.__aenter__, lambda: server.__aexit__(None, None, None))
        return server

    yield start
    threads.stop_all()


@pytest.fixture
def reservations(monkeypatch: pytest.MonkeyPatch) -> list[Decimal]:
    """Every amount a run asks the budget for (costs.Budget.reserve), in order, while the test runs."""
    from batchrunner.costs import Budget

    seen: list[Decimal] = []
    reserve = Budget.reserve

    def recording(self: Budget, amount_usd: Decimal) -> bool:
        seen.append(amount_usd)
        return reserve(self, amount_usd)

    monkeypatch.setattr(Budget, "reserve", recording)
    return seen


async def run_pairs(
    spec: Any,
    sandbox: Sandbox,
    *,
    api_key: str | None = None,
    retry: Any = None,
    limit: int | None = None,
    store: Any = None,
    breaker: Any = None,
    halt: Any = None,
    executor: Any = None,
    grace_s: float = 30.0,
    pricing: Any = None,
) -> Any:
    """Answer a spec's pairs against `sandbox` through the executor seam (the live pool unless
    `executor` is given), without the runner around it; the RunReport keeps every result. `sandbox` is
    anything serving chat completions at its `base_url` (tests/helpers/scripted.py's Scripted too)."""
    from batchrunner.client import Client
    from batchrunner.halt import Halt
    from batchrunner.live import LiveAnswerer, LiveExecutor
    from batchrunner.pending import pending
    from batchrunner.preflight import prepare
    from batchrunner.records import KeptResults, Sinks, Summary
    from batchrunner.request import RequestBuilder
    from batchrunner.retries import RetryPolicy
    from batchrunner.runner import RunReport

    dataset = prepare(spec)
    halt = halt or Halt()
    summary, results = Summary(), KeptResults()

    async with Client(sandbox.base_url, api_key=api_key, max_connections=spec.most_in_flight) as client:
        policy = LiveAnswerer(
            spec, client, halt, retry=retry or RetryPolicy.immediate(), breaker=breaker, pricing=pricing
        )
        sinks = Sinks(summary, *([store] if store is not None else []), results)
        work = pending(dataset, RequestBuilder(spec), store, limit=limit)
        execution = await (executor or LiveExecutor(spec.most_in_flight, grace_s=grace_s)).execute(
            work, policy, sinks, halt
        )
    rows = dataset.rows if limit is None else min(limit, dataset.rows)
    return RunReport(summary, rows * len(spec.models), execution.wall_s, halt.outcome, execution.resumed, results)


def run_started(job: Path, sandbox: Sandbox, *, requests: int) -> subprocess.Popen[str]:
    """`batchrunner run job` in its own process against `sandbox` (as cron would start it), returned once the
    sandbox has seen `requests` requests (or 30 s have passed): for tests that then signal it."""
    import os

    env = {**os.environ, "OPENROUTER_BASE_URL": sandbox.base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    return run_until(job, env, lambda: sandbox.stats.requests >= requests)


def run_until(job: Path, env: dict[str, str], started: Callable[[], bool]) -> subprocess.Popen[str]:
    """`batchrunner run job` in its own process, returned once `started()` says it has got far enough (or 30 s
    have passed): for tests that then signal it at that point."""
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "run", str(job)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not started() and time.monotonic() < deadline:
        time.sleep(0.01)
    return process


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m batchrunner ARGS` in its own process, as cron would run it; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "batchrunner", *args], env=env, capture_output=True, text=True, check=False
    )


@dataclass
class Ran:
    """What a CLI call run in this process left: its exit code and its two streams."""

    returncode: int
    stdout: str
    stderr: str


def cli_here(*args: str, env: dict[str, str]) -> Ran:
    """`batchrunner ARGS` in this process (click's runner): for tests of what a command says and exits with, where
    a fresh interpreter (most of such a test's time) proves nothing; signals and imports still want run_cli."""
    from click.testing import CliRunner

    from batchrunner.cli import main

    done = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return Ran(done.exit_code, done.stdout, done.stderr)


def modules_loaded(args: Sequence[str], modules: Sequence[str]) -> tuple[str, list[str]]:
    """`batchrunner ARGS` in a fresh interpreter: what it printed, and which of `modules` (or their submodules) it
    imported on the way: for the commands whose start-up must not pay for what they do not use."""
    probe = (
        "import json, sys\n"
        "from batchrunner.cli import main\n"
        f"sys.argv = ['batchrunner', *{list(args)!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps(sorted(m for m in sys.modules if any(m == n or m.startswith(n + '.') for n in {list(modules)!r}))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    *printed, loaded = done.stdout.strip().splitlines()
    return "\n".join(printed), json.loads(loaded)


def signalled_at(at: str, signals: list[signal.Signals], *args: str) -> subprocess.CompletedProcess[str]:
    """`batchrunner ARGS` in its own process, which sends itself `signals` when `at` (module:function) is first
    called: a scheduler's stop arriving at that exact moment, every time."""
    probe = (
        "import importlib, os, sys\n"
        f"module_name, _, name = {at!r}.partition(':')\n"
        "module = importlib.import_module(module_name)\n"
        "original, sent = getattr(module, name), []\n"
        "def arriving(*args, **kwargs):\n"
        "    if not sent:\n"
        "        sent.append(True)\n"
        f"        for signum in {[int(s) for s in signals]!r}:\n"
        "            os.kill(os.getpid(), signum)\n"
        "    return original(*args, **kwargs)\n"
        "setattr(module, name, arriving)\n"
        "from batchrunner.cli import main\n"
        f"sys.argv = ['batchrunner', *{list(args)!r}]\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=60)


@pytest.fixture
def rendered_rows(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the rows rendered into requests while the test runs (to send, or to find answers for the output)."""
    from batchrunner.request import RequestBuilder

    seen: list[str] = []
    render = RequestBuilder.for_rows

    def counting(self: RequestBuilder, rows: Any) -> Any:
        rows = list(rows)
        seen.extend(row.id for row in rows)
        return render(self, rows)

    monkeypatch.setattr(RequestBuilder, "for_rows", counting)
    return seen
