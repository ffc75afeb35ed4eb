"""Resume at scale: how long a rerun of a fully answered job takes to decide there is nothing left
(and to write the output), and its peak memory, for 100k and 1M rows; and a rerun after 1% more rows
were appended.

The checkpoint is filled directly, as a run killed before it could record that it finished leaves it (its
answers, and the job's state it recorded as it began). Each measured rerun runs in a fresh process, so its peak
RSS is its own:
- `killed`: the first rerun after that kill: it reads every row, takes the killed run's answers by position
  (the job is in the state that run recorded) without rendering a row, and writes the output;
- `cold`: the same with answers from runs of no recorded state (a checkpoint from before states were recorded,
  or answers from batch mode): every row is read, rendered and hashed to find nothing left;
- `unchanged`: later reruns, after one that left nothing to do, know it without reading a row and keep
  the output (medians of --repeats);
- `appended`: 1% more rows appended to the input: only they are sent (the sandbox has no rate limit),
  and `overhead s` is the whole rerun minus the time the sends took.

`status s` is `batchrunner status` in a fresh process just before that rerun: with no record of a
complete run (killed, cold) it reads and renders every row; with one, only the rows appended since.

    python bench/resume.py [--rows 100000,1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import polars as pl
import yaml
from shell import user_env  # bench/ is on sys.path when a bench script runs
from throughput import start_sandbox

from batchrunner.preflight import prepare
from batchrunner.records import RowResult
from batchrunner.request import RequestBuilder
from batchrunner.rerun import unread_state
from batchrunner.spec import load_spec
from batchrunner.store import Store

MEASURE = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from batchrunner.runner import run_job
    from batchrunner.spec import load_spec
    started = time.monotonic()
    outcome = asyncio.run(run_job(load_spec(sys.argv[1])))
    total = time.monotonic() - started
    report = outcome.report
    print(json.dumps({
        "decide_s": report.wall_s,
        "total_s": total,
        "resumed": report.resumed,
        "sent": report.summary.done,
        "output_rows": outcome.output_rows,
        # VmHWM, this process's own peak: ru_maxrss keeps the forking parent's RSS over exec, and this bench's
        # parent holds the 1M rows it made (every 1M figure before 2026-12-06's evening was the parent's ~400 MB)
        "peak_rss_mb": int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))) / 1024,
    }))
    """
)


def prepare_job(folder: Path, rows: int, base_url: str, *, answered: bool = True) -> Path:
    source = folder / "input.parquet"
    pl.DataFrame(
        {
            "id": [f"row-{i}" for i in range(rows)],
            "text": [f"Customer message number {i}: the app crashes on export." for i in range(rows)],
        }
    ).write_parquet(source)
    spec_path = folder / "job.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "resume-bench",
                "input": str(source),
                "id_column": "id",
                "output": str(folder / "out.parquet"),
                "models": ["openai/gpt-4o-mini"],
                "prompt": "Classify this message: {text}",
                "params": {"max_tokens": 20},
                "rate_limit": {"requests_per_second": 5000},
                "concurrency": 64,
                "api": {"base_url": base_url},
            }
        )
    )
    if not answered:
        return spec_path
    spec = load_spec(spec_path)
    requests = RequestBuilder(spec, server=spec.server(sandbox=False))
    store = Store.open(spec.checkpoint_path())
    store.begin_run(unread_state(spec, requests.server))  # as the killed run recorded it as it began
    for batch in prepare(spec).batches(batch_size=50_000):
        for row in batch:
            fingerprint = requests.fingerprint(requests.prompt(row), "openai/gpt-4o-mini")
            store.add(
                RowResult(
                    row.index,
                    row.id,
                    0,
                    "openai/gpt-4o-mini",
                    "ok",
                    model="openai/gpt-4o-mini",
                    response="bug",
                    prompt_tokens=20,
                    completion_tokens=1,
                    cost_usd=Decimal("0.0000036"),
                    latency_s=0.5,
                    attempts=1,
                    fingerprint=fingerprint,
                )
            )
        store.flush()
    store.close()
    return spec_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000,1000000")
    parser.add_argument("--repeats", type=int, default=3, help="measured reruns per size; medians are printed")
    args = parser.parse_args()
    print(
        f"bench/resume.py: reruns of a fully answered job, each in a fresh process; `unchanged` medians of {args.repeats}"
    )
    print(
        f"{'rows':>9} {'rerun':>9} {'setup s':>8} {'decide s':>9} {'total s':>8} {'sent':>5} {'output rows':>12} "
        f"{'peak RSS MB':>12} {'overhead s':>11} {'status s':>9}"
    )
    sandbox, base_url = start_sandbox(credits=None, latency_s=0.0)
    try:
        for rows in (int(r) for r in args.rows.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.monotonic()
                spec_path = prepare_job(Path(tmp), rows, base_url + "/api/v1")
                setup_s = time.monotonic() - started
                for kind in ("killed", "cold"):
                    if kind == "cold":
                        forget_states(spec_path)
                    before = status_s(spec_path)
                    first = measure(spec_path)
                    first["status_s"] = before
                    assert first["resumed"] == rows and first["sent"] == 0, first
                    report(rows, kind, setup_s, first)
                runs = [{"status_s": status_s(spec_path), **measure(spec_path)} for _ in range(args.repeats)]
                assert all(r["resumed"] == rows and r["sent"] == 0 for r in runs), runs
                report(rows, "unchanged", setup_s, {key: statistics.median(r[key] for r in runs) for key in runs[0]})
                added = append_rows(Path(tmp), rows, rows // 100)
                before = status_s(spec_path)
                grown = measure(spec_path)
                grown["status_s"] = before
                assert grown["sent"] == added and grown["resumed"] == rows, grown
                with tempfile.TemporaryDirectory() as alone:  # the same sends in a job of only those rows
                    grown["send_s"] = measure(prepare_job(Path(alone), added, base_url + "/api/v1", answered=False))[
                        "total_s"
                    ]
                report(rows, "appended", setup_s, grown)
    finally:
        sandbox.terminate()
        sandbox.wait()


def forget_states(spec_path: Path) -> None:
    """The checkpoint as runs of no recorded state leave it: no record of a complete run, no run's state."""
    with contextlib.closing(sqlite3.connect(load_spec(spec_path).checkpoint_path())) as db:
        db.execute("DELETE FROM meta WHERE key = 'complete'")
        db.execute("UPDATE runs SET state = NULL")
        db.commit()


def status_s(spec_path: Path) -> float:
    """`batchrunner status` from start to exit, in a fresh process."""
    env = user_env()
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "batchrunner", "status", str(spec_path)], capture_output=True, check=True, env=env
    )
    return time.perf_counter() - started


def measure(spec_path: Path) -> dict[str, float]:
    measured = subprocess.run(
        [sys.executable, "-c", MEASURE, str(spec_path)], capture_output=True, text=True, check=True, env=user_env()
    )
    return json.loads(measured.stdout.strip().splitlines()[-1])


def append_rows(folder: Path, rows: int, added: int) -> int:
    source = folder / "input.parquet"
    more = pl.DataFrame(
        {
            "id": [f"row-{i}" for i in range(rows, rows + added)],
            "text": [f"Customer message number {i}: the app crashes on export." for i in range(rows, rows + added)],
        }
    )
    pl.concat([pl.read_parquet(source), more]).write_parquet(source)
    return added


def report(rows: int, kind: str, setup_s: float, result: dict[str, float]) -> None:
    overhead = result["total_s"] - result.get("send_s", 0.0)
    print(
        f"{rows:>9} {kind:>9} {setup_s:>8.1f} {result['decide_s']:>9.1f} {result['total_s']:>8.1f} {result['sent']:>5.0f} "
        f"{result['output_rows']:>12.0f} {result['peak_rss_mb']:>12.0f} {overhead:>11.2f} {result['status_s']:>9.2f}"
    )


if __name__ == "__main__":
    main()
