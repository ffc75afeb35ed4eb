"""Throughput when the rate limit is not the bottleneck: batchrunner end to end against a bare aiohttp loop,
both against the same zero-latency OpenAI-compatible server in its own process, in the same run.

- `server alone`: the canned server's capacity, driven by the bare loop at concurrency 256 (it must be
  well above what is measured against it, or the server is the bottleneck);
- `bare loop`: aiohttp sending N chat requests at concurrency 64 and parsing each answer: the floor;
- `batchrunner`: `batchrunner run` of an N-row job (start-up, read, template, send, parse, checkpoint,
  write the output) in a fresh process, wall time from start to exit, CPU time of the process.

    python bench/speed.py [--rows 20000] [--repeats 3] [--long-rows 3000] [--long-only]

Prints rows/s and CPU-ms per row for each (medians; the server's CPU a row beside them, from /proc), batchrunner's
ratio to the bare loop, and the rate its CPU a row allows on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from shell import user_env  # bench/ is on sys.path when a bench script runs

SERVER = textwrap.dedent(
    r"""
    import asyncio, json, sys
    CONTENT = "bug " * max(1, int(sys.argv[2]) // 4) if len(sys.argv) > 2 else "bug"
    ANSWER = json.dumps({
        "id": "gen-bench", "provider": "Bench", "model": "openai/gpt-4o-mini", "object": "chat.completion",
        "created": 1, "choices": [{"index": 0, "finish_reason": "stop", "native_finish_reason": "stop",
        "message": {"role": "assistant", "content": CONTENT, "refusal": None}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": len(CONTENT) // 4, "total_tokens": 21, "cost": 0.0000036},
    }).encode()
    EMPTY = b'{"data": []}'

    def reply(body):
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)

    class Http(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer = transport, b""
        def data_received(self, data):
            self.buffer += data
            while True:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buffer[:end].decode("latin-1")
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length:]
                self.transport.write(reply(ANSWER if head.startswith("POST") else EMPTY))

    async def main():
        server = await asyncio.get_running_loop().create_server(Http, "127.0.0.1", int(sys.argv[1]))
        async with server:
            await server.serve_forever()
    asyncio.run(main())
    """
)
BARE = textwrap.dedent(
    """
    import asyncio, json, resource, sys, time
    import aiohttp
    async def main(url, n, concurrency):
        body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Classify: the app crashes"}]}
        queue = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            async def worker():
                while not queue.empty():
                    queue.get_nowait()
                    async with session.post(url, json=body) as response:
                        json.loads(await response.read())["choices"][0]["message"]["content"]
            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - started
    wall = asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime}))
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(answer_chars: int = 3) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(answer_chars)])
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the bench server did not start")


def cpu_s(pid: int) -> float:
    """The CPU seconds process `pid` has used (Linux's /proc; 0.0 where there is none): the server's share of a run."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def server_share(server: subprocess.Popen[bytes], measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """`measure()`'s figures, with the CPU seconds the server used meanwhile (`server_cpu_s`)."""
    before = cpu_s(server.pid)
    figures = measure()
    return {**figures, "server_cpu_s": cpu_s(server.pid) - before}


def bare(url: str, rows: int, concurrency: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", BARE, url + "/v1/chat/completions", str(rows), str(concurrency)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def ours(
    url: str,
    rows: int,
    folder: Path,
    max_tokens: int = 5,
    workers: int = 1,
    rate_rps: float | None = 10_000,
    executor: str = "local",
) -> dict[str, float]:
    """`batchrunner run` in a fresh process: wall from start to exit, its CPU time (from wait4: with its worker
    processes, which it waits for; Ray's actors are the cluster's processes, not counted)."""
    for stale in folder.glob("out*"):
        stale.unlink()
    job = folder / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "name": "speed",
                "input": "input.csv",
                "id_column": "id",
                "output": "out.parquet",
                "models": ["openai/gpt-4o-mini"],
                "prompt": "Classify: {text}",
                "params": {"max_tokens": max_tokens},
                "concurrency": 64,
                "workers": workers,
                **({"executor": executor} if executor != "local" else {}),
                "api": {"base_url": url + "/v1"},
                # a rate that never binds (rows are never held back); None: no rate_limit key, so none is known
                **({"rate_limit": {"requests_per_second": rate_rps}} if rate_rps is not None else {}),
            }
        )
    )
    env = user_env(OPENROUTER_API_KEY="sk-or-v1-bench")
    started = time.perf_counter()
    with (folder / "stderr.txt").open("w") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "batchrunner", "run", str(job)], env=env, stdout=subprocess.DEVNULL, stderr=errors
        )
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(
            f"batchrunner exited {os.waitstatus_to_exitcode(status)}: {(folder / 'stderr.txt').read_text()[-500:]}"
        )
    summary = json.loads((folder / "out.summary.json").read_text())
    run_s = summary["wall_s"]  # the run alone: from the first row read to the last answer
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "run_s": run_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-rows", type=int, default=3_000, help="rows of 16k-token answers (0: skip)")
    parser.add_argument("--long-only", action="store_true", help="only the 16k-token answers (and their bare loop)")
    args = parser.parse_args()
    if args.long_only:
        long_answers(args.long_rows, args.repeats, None)
        return
    server, url = start_server()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            lines = ["id,text", *(f"r{i},the app crashes when I export report {i}" for i in range(args.rows))]
            (folder / "input.csv").write_text("\n".join(lines) + "\n")
            results: dict[str, list[dict[str, float]]] = {"server alone": [], "bare loop": [], "batchrunner": []}
            for _ in range(args.repeats):
                results["server alone"].append(server_share(server, lambda: bare(url, args.rows, 256)))
                results["bare loop"].append(server_share(server, lambda: bare(url, args.rows, 64)))
                results["batchrunner"].append(server_share(server, lambda: ours(url, args.rows, folder)))
    finally:
        server.terminate()
        server.wait()
    print(f"bench/speed.py: {args.rows:,} rows, medians of {args.repeats}, {os.cpu_count()} cores")
    print("what          rows/s  cpu_ms/row  server_cpu_ms/row")
    rates, cpus = {}, {}
    for name, runs in results.items():
        rate = statistics.median(args.rows / run["wall_s"] for run in runs)
        cpu = statistics.median(1000 * run["cpu_s"] / args.rows for run in runs)
        server_cpu = statistics.median(1000 * run["server_cpu_s"] / args.rows for run in runs)
        rates[name], cpus[name] = rate, cpu
        print(f"{name.replace(' ', '_'):<13} {rate:>7.0f} {cpu:>10.3f} {server_cpu:>18.3f}")
    in_run = statistics.median(args.rows / run["run_s"] for run in results["batchrunner"])
    rates["in run"] = in_run
    print(
        f"ratio batchrunner/bare_loop {rates['batchrunner'] / rates['bare loop']:.2f} "
        f"(in the run alone, without start-up and the output's write: {in_run:.0f} rows/s, "
        f"{in_run / rates['bare loop']:.2f})"
    )
    # The account of the ratio: batchrunner's own work is one event loop on one core, so its CPU a row bounds its
    # rate whatever the server does; 0.7x the bare loop needs that CPU within 1 / (0.7 x the bare loop's rate).
    print(
        f"CPU a row bounds batchrunner at {1000 / cpus['batchrunner']:.0f} rows/s on one core "
        f"({cpus['batchrunner']:.3f} ms; the bare loop's {cpus['bare loop']:.3f}); 0.7x the bare loop "
        f"({0.7 * rates['bare loop']:.0f} rows/s) needs at most {1000 / (0.7 * rates['bare loop']):.3f} ms a row"
    )
    if args.long_rows:
        long_answers(args.long_rows, args.repeats, rates)


def long_answers(rows: int, repeats: int, short: dict[str, float] | None) -> None:
    """16k-token answers (64 KB each) at concurrency 64: how much of the short-answer rate each keeps."""
    server, url = start_server(answer_chars=16_384 * 4)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            lines = ["id,text", *(f"r{i},write a long report {i}" for i in range(rows))]
            (folder / "input.csv").write_text("\n".join(lines) + "\n")
            bare_runs, our_runs = [], []
            for _ in range(repeats):  # side by side, so a change in the machine's load touches both alike
                bare_runs.append(bare(url, rows, 64))
                our_runs.append(ours(url, rows, folder, max_tokens=20_000))
    finally:
        server.terminate()
        server.wait()
    bare_rate = statistics.median(rows / run["wall_s"] for run in bare_runs)
    our_rate = statistics.median(rows / run["wall_s"] for run in our_runs)
    in_run = statistics.median(rows / run["run_s"] for run in our_runs)
    print(
        f"16k-token answers, {rows:,} rows: bare_loop {bare_rate:.0f} rows/s, "
        f"batchrunner {our_rate:.0f} rows/s end to end, {in_run:.0f} in the run"
    )
    at_short = (
        f" (at short answers {short['batchrunner'] / short['bare loop']:.2f}, {short['in run'] / short['bare loop']:.2f})"
        if short
        else ""
    )
    print(
        f"ratio batchrunner/bare_loop at 16k tokens {our_rate / bare_rate:.2f} end to end, {in_run / bare_rate:.2f} "
        f"in the run{at_short}"
    )


if __name__ == "__main__":
    main()
