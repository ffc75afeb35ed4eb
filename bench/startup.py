"""Start-up: wall time from the shell to exit for `batchrunner --help`, `batchrunner status` and a 10-row
job on the sandbox, each in a fresh process; medians of --repeats runs. Then the same 10-row job against a
sandbox in its own process whose every request is 0.1 s away (`--round-trip`), as OpenRouter is over the
internet: how many round trips a run waits for before its first answer shows here.

    python bench/startup.py [--repeats 7]

Prints one line per command: name, median and fastest wall seconds, and median CPU seconds (user + system:
steadier than wall time on a shared machine; above wall time when polars' threads work in parallel).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shell import user_env  # bench/ is on sys.path when a bench script runs
from throughput import start_sandbox

ROUND_TRIP_S = 0.1

SPEC = """name: startup
input: rows.csv
id_column: id
output: out.csv
models: [openai/gpt-4o-mini]
prompt: "Say {text}"
params: {max_tokens: 10}
"""


def timed(args: list[str], folder: Path, *, key: bool = False) -> tuple[float, float]:
    """Wall seconds from start to exit, and the CPU seconds the process used (steadier on a shared machine)."""
    env = user_env(OPENROUTER_API_KEY="sk-or-v1-bench") if key else user_env()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", *args],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"batchrunner {' '.join(args)} exited {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "rows.csv").write_text("id,text\n" + "".join(f"{i},hello {i}\n" for i in range(10)))
        (folder / "job.yaml").write_text(SPEC)
        commands = {
            "help": ["--help"],
            "run_10_rows_sandbox": ["run", "job.yaml", "--sandbox", "--fresh", "--yes"],
            "status": ["status", "job.yaml", "--sandbox"],
        }
        print("command  median_s  fastest_s  median_cpu_s")
        for name, command in commands.items():
            report(name, [timed(command, folder) for _ in range(args.repeats)])
        far, base_url = start_sandbox(None, 0.0, round_trip_s=ROUND_TRIP_S)
        try:
            (folder / "far.yaml").write_text(
                SPEC.replace("out.csv", "far.csv") + f"api: {{base_url: {base_url}/api/v1}}\n"
            )
            report(
                "run_10_rows_0.1s_away",
                [timed(["run", "far.yaml", "--fresh", "--yes"], folder, key=True) for _ in range(args.repeats)],
            )
        finally:
            far.terminate()
            far.wait()


def report(name: str, runs: list[tuple[float, float]]) -> None:
    walls = [wall for wall, _ in runs]
    cpu = statistics.median(cpu for _, cpu in runs)
    print(f"{name} {statistics.median(walls):.3f} {min(walls):.3f} {cpu:.3f}")


if __name__ == "__main__":
    main()
