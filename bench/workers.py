"""`workers: N` against a server that keeps up: rows/s for 1, 2 (and more, where there are the cores) worker
processes beside the bare aiohttp loop, against the same zero-latency server in its own process (speed.py's).

    python bench/workers.py [--rows 20000] [--repeats 3] [--workers 1,2] [--ray 2 --ray-address ADDR]

Prints, per count of workers, the median rows/s, CPU-ms per row (the run's processes together) and the ratio
to one worker and to the bare loop. With --ray N, also `executor: ray` with N actors of the Ray cluster at
--ray-address (or RAY_ADDRESS; `ray start --head` first): its CPU is the driver's alone (the actors are the
cluster's processes), and `run_rows/s` leaves out joining the cluster and starting the actors. On a machine whose cores are fewer than the workers plus the server (this
one has 2), the workers share cores with the server and each other: the ratio says what the parent's
coordination costs rather than what more cores would give.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from speed import bare, ours, start_server  # bench/ is on sys.path when a bench script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--unpaced",
        action="store_true",
        help="no rate_limit in the job (a self-hosted server publishes none): workers ask their parent for no slots",
    )
    parser.add_argument("--ray", type=int, default=0, help="also executor: ray with this many actors")
    parser.add_argument("--ray-address", default=None, help="the Ray cluster to join (default: RAY_ADDRESS)")
    args = parser.parse_args()
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address
    counts = [int(count) for count in args.workers.split(",")]
    server, url = start_server()
    runs: dict[str, list[dict[str, float]]] = {"bare loop": [], **{f"workers {n}": [] for n in counts}}
    if args.ray:
        runs[f"ray {args.ray}"] = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            lines = ["id,text", *(f"r{i},the app crashes when I export report {i}" for i in range(args.rows))]
            (folder / "input.csv").write_text("\n".join(lines) + "\n")
            for _ in range(args.repeats):  # interleaved: the machine's load falls on every contender alike
                runs["bare loop"].append(bare(url, args.rows, 64))
                for count in counts:
                    rate = None if args.unpaced else 10_000
                    runs[f"workers {count}"].append(ours(url, args.rows, folder, workers=count, rate_rps=rate))
                if args.ray:
                    rate = None if args.unpaced else 10_000
                    runs[f"ray {args.ray}"].append(
                        ours(url, args.rows, folder, workers=args.ray, rate_rps=rate, executor="ray")
                    )
    finally:
        server.terminate()
        server.wait()
    paced = "no rate limit" if args.unpaced else "a rate limit that never binds (slots asked of the parent)"
    print(f"bench/workers.py: {args.rows:,} rows, medians of {args.repeats}, {os.cpu_count()} cores, {paced}")
    print("what          rows/s  run_rows/s  cpu_ms/row  vs_1_worker  vs_bare_loop")
    rates = {name: statistics.median(args.rows / run["wall_s"] for run in found) for name, found in runs.items()}
    one = rates.get("workers 1")
    for name, found in runs.items():
        cpu = statistics.median(1000 * run["cpu_s"] / args.rows for run in found)
        running = statistics.median(args.rows / run["run_s"] for run in found) if "run_s" in found[0] else None
        versus_one = f"{rates[name] / one:.2f}" if one and name != "bare loop" else "-"
        print(
            f"{name.replace(' ', '_'):<13} {rates[name]:>7.0f} {f'{running:.0f}' if running else '-':>11} "
            f"{cpu:>10.3f} {versus_one:>12} {rates[name] / rates['bare loop']:>13.2f}"
        )


if __name__ == "__main__":
    main()
