"""Hostile reproductions against the Python API (api.py) and `concurrency: auto`: each failed on the code it was
written against."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_here
from test_api import job_dict

import batchrunner
from batchrunner.adaptive import Aimd
from batchrunner.runner import RunSettings, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec


@pytest.mark.parametrize("limit", [0, -1, 2.5, "3", True])
def test_a_limit_the_cli_refuses_raises_spec_error(tickets_csv: Path, tmp_path: Path, limit: Any) -> None:
    """run() and estimate() refuse a limit that is not a whole number of rows >= 1 (the CLI's IntRange(min=1)) with
    SpecError naming it, before anything is opened: not a traceback, not an INPUT stop, not a run of nothing."""
    job = job_dict(tickets_csv, tmp_path)
    with pytest.raises(batchrunner.SpecError, match="limit"):
        batchrunner.run(job, sandbox=True, limit=limit)
    with pytest.raises(batchrunner.SpecError, match="limit"):
        batchrunner.estimate(job, sandbox=True, limit=limit)
    assert not (tmp_path / "out").exists()


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"a": value}
    return value


def _holds_itself() -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object"}
    schema["properties"] = {"again": schema}
    return schema


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "x", "schema": _nested(1_000)}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": _holds_itself()}},
    ],
    ids=["1000-levels", "holds-itself"],
)
def test_a_job_dict_nested_past_a_files_depth_raises_spec_error(
    tickets_csv: Path, tmp_path: Path, response_format: dict[str, Any]
) -> None:
    """A dict job nested 1,000 levels (or holding itself) is refused as a file that deep is, with SpecError naming
    the job: copying it passed Python's stack (a RecursionError traceback)."""
    job = {**job_dict(tickets_csv, tmp_path), "response_format": response_format}
    with pytest.raises(batchrunner.SpecError, match="nested deeper than 64 levels"):
        batchrunner.run(job, sandbox=True)
    assert not (tmp_path / "out").exists()


def test_a_job_dict_sharing_one_value_many_times_is_refused_at_once(tickets_csv: Path, tmp_path: Path) -> None:
    """A value shared by both branches of each of 40 levels (2^40 values once expanded, 40 lists) is refused as a
    file's YAML aliases are, measured once a list: walking it (the NaN check, the copy, json) never ended."""
    shared: Any = "x"
    for _ in range(40):
        shared = [shared, shared]
    job = {**job_dict(tickets_csv, tmp_path), "params": {"metadata": {"deep": shared}}}
    with pytest.raises(batchrunner.SpecError, match="expands to more than 100,000 values"):
        batchrunner.run(job, sandbox=True)


@pytest.mark.parametrize("max_cost", [0, "0", "-0", "1e300", 1e300, "2000000"])
def test_a_max_cost_the_spec_would_refuse_raises_spec_error(tickets_csv: Path, tmp_path: Path, max_cost: Any) -> None:
    """max_cost is held to budget_usd's bounds (more than 0, at most 1,000,000 USD): zero is the CLI's refused
    --max-cost 0, and 1e300 crashed formatting the budget (decimal.InvalidOperation, a traceback)."""
    with pytest.raises(batchrunner.SpecError, match="max_cost"):
        batchrunner.run(job_dict(tickets_csv, tmp_path), sandbox=True, max_cost=max_cost)
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_a_huge_max_cost_with_exit_2(write_spec: Any) -> None:
    """`run --max-cost 1e300` exits 2 with one sentence, not a decimal.InvalidOperation traceback."""
    done = cli_here(
        "run", str(write_spec()), "--sandbox", "--max-cost", "1e300", env={**os.environ, "OPENROUTER_API_KEY": ""}
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "max_cost" in done.stderr


@pytest.mark.slow  # seconds of runs in their own processes: the long set (CI's second step)
def test_ctrl_c_stops_a_main_thread_run_while_another_runs_on_a_thread(
    tickets_csv: Path, tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """A run on a worker thread (which cannot install signal handlers) must not take the main thread's run's:
    Ctrl-C then stops the main thread's run cleanly (INTERRUPTED, exit 3) instead of raising KeyboardInterrupt."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=1.0))
    jobs = {  # the background run answers its 12 rows at once (1 s); the foreground one is Ctrl-C'd 1.5 s in
        name: job_dict(tickets_csv, tmp_path / name, name=name, concurrency=width, api={"base_url": sandbox.base_url})
        for name, width in (("background", 12), ("foreground", 2))
    }
    script = textwrap.dedent(
        f"""
        import os, signal, threading, time
        import batchrunner
        jobs = {jobs!r}
        started = threading.Event()
        background = threading.Thread(target=batchrunner.run, args=(jobs["background"],), kwargs={{"on_start": lambda _: started.set()}})
        background.start()
        started.wait(30)
        kick = lambda _: threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            result = batchrunner.run(jobs["foreground"], on_start=kick)
            print("returned", result.stop.reason.name if result.stop else None, result.exit_code, flush=True)
        except BaseException as exc:
            print("raised", type(exc).__name__, flush=True)
        background.join()
        """
    )
    env = {**os.environ, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert "returned INTERRUPTED 3" in done.stdout, (done.stdout, done.stderr[-2000:])


def test_the_frame_of_a_csv_output_whose_column_turns_from_numbers_to_text(tmp_path: Path) -> None:
    """RunResult.frame reads a CSV output whose column holds numbers for its first 100 rows and then text (polars
    infers the type from 100 rows by default, then raised ComputeError: a traceback for a run that went well)."""
    rows = tmp_path / "rows.csv"
    rows.write_text("id,text\n" + "".join(f"{i},{i}\n" for i in range(150)) + "150,abc\n")
    job = job_dict(rows, tmp_path, id_column="id", prompt="{text}", output=str(tmp_path / "out" / "result.csv"))
    result = batchrunner.run(job, sandbox=True)
    assert result.exit_code == 0
    assert result.frame is not None and result.frame.height == 151 and result.frame["text"][-1] == "abc"


async def test_auto_falls_to_one_in_flight_when_the_server_sheds_every_request(
    write_spec: Callable[..., Path],
) -> None:
    """concurrency: auto against a server that sheds every request (429): overloads from requests sent after a cut are
    a new signal, so the limit falls to its floor of 1; counting only answers toward the next cut held it at half
    its start for as long as no answer came."""
    async with Sandbox(SandboxConfig(faults={"rate_limit": 1.0}, retry_after_s=0)) as sandbox:
        spec = load_spec(
            write_spec(
                concurrency="auto",
                max_concurrency=8,
                retry={"max_attempts": 3, "base_delay_s": 0, "max_delay_s": 0},
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec, RunSettings())
    assert outcome.report.summary.failed == 12 and sandbox.stats.requests == 36
    assert outcome.report.concurrency == (1, 4)


def test_a_slow_server_at_capacity_halves_the_limit_again() -> None:
    """Aimd: after a cut, overloads keep coming with no answer between (the server is slow and full): a window of
    them halves the limit again, down to the floor."""
    aimd = Aimd(64, start=8)
    for _ in range(1 + 4 + 1 + 2 + 1):  # a cut to 4, a window of 4 overloads, a cut to 2, a window of 2, a cut to 1
        aimd.overloaded()
    assert aimd.allowed == 1


@pytest.mark.parametrize(
    ("override", "named"),
    [({"concurrency": 0}, "concurrency"), ({"output": "out/result.txt"}, "output"), ({"mode": "bogus"}, "mode")],
)
def test_options_on_a_jobspec_are_checked_as_on_a_dict(
    tickets_csv: Path, tmp_path: Path, override: dict[str, Any], named: str
) -> None:
    """The command line's options given with a JobSpec are checked as with a dict or a file: concurrency=0 ran no
    worker and returned exit 0 with every row pending, output="x.txt" raised AttributeError, mode="bogus" ran."""
    spec = batchrunner.job_spec(job_dict(tickets_csv, tmp_path))
    with pytest.raises(batchrunner.SpecError, match=f"job: {named}"):
        batchrunner.run(spec, sandbox=True, **override)
    assert not (tmp_path / "out").exists()


def test_options_on_a_jobspec_keep_its_checkpoint(tickets_csv: Path, tmp_path: Path) -> None:
    """A valid override on a JobSpec (output elsewhere, concurrency) still runs, the checkpoint where the job keeps it."""
    spec = batchrunner.job_spec(job_dict(tickets_csv, tmp_path))
    result = batchrunner.run(spec, sandbox=True, concurrency=2, output=tmp_path / "elsewhere.csv", limit=3)
    assert result.exit_code == 0 and result.output_path == tmp_path / "elsewhere.csv"
    assert result.spec.checkpoint_path() == spec.checkpoint_path() and result.spec.concurrency == 2
