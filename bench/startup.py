"""Start-up: wall time from the shell to exit for `batchrunner --help`, `batchrunner status` and a 10-row
job on the sandbox, each in a fresh process; medians of --repeats runs.

    python bench/startup.py [--repeats 7]

Prints one line per command: name, median seconds, fastest seconds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shell import user_env  # bench/ is on sys.path when a bench script runs

SPEC = """name: startup
input: rows.csv
id_column: id
output: out.csv
models: [openai/gpt-4o-mini]
prompt: "Say {text}"
params: {max_tokens: 10}
"""


def timed(args: list[str], folder: Path) -> float:
    env = user_env()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "batchrunner", *args], cwd=folder, capture_output=True, check=True, env=env)
    return time.perf_counter() - started


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
        print("command  median_s  fastest_s")
        for name, command in commands.items():
            times = [timed(command, folder) for _ in range(args.repeats)]
            print(f"{name} {statistics.median(times):.3f} {min(times):.3f}")


if __name__ == "__main__":
    main()
