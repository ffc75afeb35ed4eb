"""Memory of an image job: peak RSS of `batchrunner run` over N image rows, against the sandbox in its own process.

Each row names one of 200 distinct 24 KB image files (so 20,000 rows would be ~640 MB of
base64 if requests were built whole and kept). The measured run is a fresh process, so
its peak RSS is its own; the sandbox runs apart.

    python bench/media_memory.py [--rows 2000,20000] [--repeats 1]

Prints one line per size: rows, requests the sandbox answered, wall seconds, peak RSS in MB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml
from shell import user_env  # bench/ is on sys.path when a bench script runs
from throughput import start_sandbox

FILES = 200
FILE_BYTES = 24 * 1024
MEASURE = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from batchrunner.runner import run_job
    from batchrunner.spec import load_spec
    started = time.monotonic()
    outcome = asyncio.run(run_job(load_spec(sys.argv[1])))
    summary = outcome.report.summary
    print(json.dumps({
        "ok": summary.ok, "failed": summary.failed, "wall_s": time.monotonic() - started,
        "peak_rss_mb": int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))) / 1024,
    }))
    """
)


def make_images(folder: Path) -> list[str]:
    """FILES distinct files that read as JPEG (magic bytes, then noise): the sandbox does not decode them."""
    rng = random.Random(14)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for number in range(FILES):
        name = f"images/photo_{number:03d}.jpg"
        (folder / name).write_bytes(b"\xff\xd8\xff\xe0" + rng.randbytes(FILE_BYTES - 4))
        names.append(name)
    return names


def prepare_job(folder: Path, rows: int, tag: str, base_url: str, names: list[str]) -> Path:
    lines = ["id,title,photo", *(f"row-{i},Product {i},{names[i % len(names)]}" for i in range(rows))]
    (folder / f"input-{tag}.csv").write_text("\n".join(lines) + "\n")
    spec = {
        "name": f"media-{tag}",
        "input": f"input-{tag}.csv",
        "id_column": "id",
        "output": f"out-{tag}.parquet",
        "models": ["openai/gpt-4o-mini"],
        "prompt": "Categorise this product: {title}",
        "images": ["photo"],
        "image_detail": "low",
        "params": {"max_tokens": 20},
        "concurrency": 64,
        "rate_limit": {"requests_per_second": 5000},  # the sandbox runs without a limit: the machine is the limit
        "api": {"base_url": base_url + "/api/v1"},
    }
    path = folder / f"job-{tag}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def measure(job: Path) -> dict[str, float]:
    """Run the job in a fresh process; its own peak RSS (VmHWM: wait4's ru_maxrss keeps this parent's over exec)."""
    env = user_env(OPENROUTER_API_KEY="sk-or-v1-bench")
    process = subprocess.Popen([sys.executable, "-c", MEASURE, str(job)], stdout=subprocess.PIPE, env=env)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, _ = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"the run exited {process.returncode}")
    result = json.loads(output.decode().strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2000,20000")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    sizes = [int(size) for size in args.rows.split(",")]
    sandbox, base_url = start_sandbox(credits=None, latency_s=0)  # no rate limit: as fast as two processes go
    try:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            names = make_images(folder)
            print("rows  answered  wall_s  peak_rss_mb")
            for rows in sizes:
                runs = []
                for repeat in range(args.repeats):  # each repeat from scratch: its own input, output, checkpoint
                    runs.append(measure(prepare_job(folder, rows, f"{rows}-{repeat}", base_url, names)))
                wall = statistics.median(run["wall_s"] for run in runs)
                rss = statistics.median(run["peak_rss_mb"] for run in runs)
                answered = min(int(run["ok"]) for run in runs)
                print(f"{rows} {answered} {wall:.2f} {rss:.1f}")
    finally:
        sandbox.terminate()
        sandbox.wait()


if __name__ == "__main__":
    main()
