"""Resume at scale: how long a rerun of a fully answered job takes to decide there is
nothing left (and to rewrite the output), and its peak memory, for 100k and 1M rows.

The checkpoint is filled directly (as if every row had been answered); the measured rerun
runs in a fresh process so its peak RSS is its own.

    python bench/resume.py [--rows 100000,1000000]
"""

from __future__ import annotations

import argparse
import json
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
from throughput import start_sandbox  # bench/ is on sys.path when a bench script runs

from batchrunner.preflight import prepare
from batchrunner.records import RowResult
from batchrunner.request import RequestBuilder
from batchrunner.spec import load_spec
from batchrunner.store import Store

MEASURE = textwrap.dedent(
    """
    import asyncio, json, resource, sys, time
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
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))
    """
)


def prepare_job(folder: Path, rows: int, base_url: str) -> Path:
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
                "rate_limit": {"requests_per_second": 100},
                "api": {"base_url": base_url},
            }
        )
    )
    spec = load_spec(spec_path)
    requests = RequestBuilder(spec, server=spec.server(sandbox=False))
    store = Store.open(spec.checkpoint_path())
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
        f"bench/resume.py: rerun of a fully answered job (nothing to send), in a fresh process; medians of {args.repeats}"
    )
    print(
        f"{'rows':>9} {'setup s':>8} {'decide s':>9} {'total s':>8} {'sent':>5} {'output rows':>12} {'peak RSS MB':>12}"
    )
    sandbox, base_url = start_sandbox(credits=100.0, latency_s=0.0)  # answers /key and /models; nothing else is asked
    try:
        for rows in (int(r) for r in args.rows.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.monotonic()
                spec_path = prepare_job(Path(tmp), rows, base_url + "/api/v1")
                setup_s = time.monotonic() - started
                runs = []
                for _ in range(args.repeats):
                    measured = subprocess.run(
                        [sys.executable, "-c", MEASURE, str(spec_path)], capture_output=True, text=True, check=True
                    )
                    runs.append(json.loads(measured.stdout.strip().splitlines()[-1]))
            assert all(r["resumed"] == rows and r["sent"] == 0 for r in runs), runs
            result = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            report(rows, setup_s, result)
    finally:
        sandbox.terminate()
        sandbox.wait()


def report(rows: int, setup_s: float, result: dict[str, float]) -> None:
    print(
        f"{rows:>9} {setup_s:>8.1f} {result['decide_s']:>9.1f} {result['total_s']:>8.1f} {result['sent']:>5.0f} "
        f"{result['output_rows']:>12.0f} {result['peak_rss_mb']:>12.0f}"
    )


if __name__ == "__main__":
    main()
