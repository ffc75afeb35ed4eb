"""How close to the rate limit a run goes: achieved throughput as a fraction of the rate.

For each rate R, a sandbox in its own process derives R requests/s from credits (OpenRouter's
rule: one request/s per credit, at most 500), and batchrunner runs R x SECONDS rows against it.
Prints, per rate, the median over repeats of the achieved sending rate / R (rows over the wall time
less one answer's latency: the last answer cannot land sooner), the wall time, the 429s the sandbox
had to send (the target: none), the most requests it saw in one second (the target: at most R), and
the most batchrunner sent in any one-second window (send times recorded in this process: the pacer's
own bound, apart from what the network and the server's queue do to arrival times).

    python bench/throughput.py [--rates 20,100,300] [--seconds 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from batchrunner import client
from batchrunner.runner import RunSettings, run_job
from batchrunner.spec import load_spec

SENT: list[float] = []  # when each completion request left the pacer, in this process


def _recording(request: Any) -> Any:
    async def recorded(self: client.Client, method: str, path: str, **kwargs: Any) -> Any:
        if path.endswith("/completions"):
            SENT.append(time.monotonic())
        return await request(self, method, path, **kwargs)

    return recorded


def most_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    return max((bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)), default=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sandbox(
    credits: float | None, latency_s: float, *, round_trip_s: float = 0.0
) -> tuple[subprocess.Popen[bytes], str]:
    """`batchrunner sandbox` in its own process: OpenRouter's credit rule with `credits`, else no rate limit;
    every request `round_trip_s` away."""
    port = free_port()
    limits = ["--rate-limit", "credits", "--credits", str(credits)] if credits is not None else []
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "batchrunner", "sandbox", "--port", str(port), *limits),
            *("--latency", str(latency_s), "--round-trip", str(round_trip_s)),
        ],
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(base + "/api/v1/models", timeout=1).read()
            return process, base
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("sandbox did not start")


def one_run(rate: int, seconds: float, latency_s: float, folder: Path) -> dict[str, float]:
    rows = int(rate * seconds)
    source = folder / f"rows{rows}.parquet"
    pl.DataFrame({"id": list(range(rows)), "text": [f"row {i}" for i in range(rows)]}).write_parquet(source)
    process, base = start_sandbox(rate + 0.5, latency_s)
    try:
        spec_path = folder / "bench.yaml"
        spec_path.write_text(
            yaml.safe_dump(
                {
                    "name": "bench",
                    "input": str(source),
                    "id_column": "id",
                    "output": str(folder / "out.parquet"),
                    "models": ["meta-llama/llama-3.1-8b-instruct"],
                    "prompt": "Summarise: {text}",
                    "params": {"max_tokens": 20},
                    "concurrency": max(16, int(rate * (latency_s + 0.05) * 2)),
                    "api": {"base_url": base + "/api/v1"},
                }
            )
        )
        SENT.clear()
        outcome = asyncio.run(run_job(load_spec(spec_path), RunSettings(fresh=True)))  # each repeat from scratch
        stats = json.loads(urllib.request.urlopen(base + "/sandbox/stats").read())
    finally:
        process.terminate()
        process.wait()
    report = outcome.report
    return {
        "ratio": rows / max(report.wall_s - latency_s, 1e-9) / rate,  # the last answer lands a latency after its send
        "wall_s": report.wall_s,
        "ok": report.summary.ok,
        "http_429": stats["statuses"].get("429", 0),
        "max_in_one_second": stats["max_requests_in_one_second"],
        "max_sent_in_one_second": most_in_one_second(SENT),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="20,100,300")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.05, help="simulated seconds per answer")
    args = parser.parse_args()
    client.Client._request = _recording(client.Client._request)  # type: ignore[method-assign]
    print(
        f"bench/throughput.py: {args.seconds:g} s of rows per run, {args.repeats} runs per rate, {args.latency:g} s simulated latency"
    )
    print(
        f"{'rate/s':>7} {'rows':>6} {'median ratio':>13} {'min ratio':>10} {'median wall s':>14} {'429s':>5} {'max in 1 s':>11}"
        f" {'max sent in 1 s':>16}"
    )
    for rate in (int(r) for r in args.rates.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            runs = [one_run(rate, args.seconds, args.latency, Path(tmp)) for _ in range(args.repeats)]
        assert all(r["ok"] == int(rate * args.seconds) for r in runs), runs
        print(
            f"{rate:>7} {int(rate * args.seconds):>6} {statistics.median(r['ratio'] for r in runs):>13.3f} "
            f"{min(r['ratio'] for r in runs):>10.3f} {statistics.median(r['wall_s'] for r in runs):>14.2f} "
            f"{sum(r['http_429'] for r in runs):>5} {max(r['max_in_one_second'] for r in runs):>11}"
            f" {max(r['max_sent_in_one_second'] for r in runs):>16}"
        )


if __name__ == "__main__":
    main()
