"""The benchmarks still run (tiny sizes): a figure in docs/performance.md must come from a script that works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
pytestmark = pytest.mark.slow  # each starts processes and runs for seconds: the long set (`pytest -m slow`)


def run_bench(script: str, *args: str) -> list[str]:
    completed = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout.strip().splitlines()


def test_throughput_bench_reports_every_rate() -> None:
    """bench/throughput.py runs each repeat from scratch and prints one line per rate with no 429s, and what it
    sent in its busiest second (all 20 rows fit in one)."""
    lines = run_bench("throughput.py", "--rates", "40", "--seconds", "0.5", "--repeats", "2", "--latency", "0")
    rate, rows, median_ratio, _min_ratio, _wall, http_429, busiest, sent = lines[-1].split()
    assert (rate, rows, http_429) == ("40", "20", "0")
    assert 0.3 < float(median_ratio) <= 1.05 and int(busiest) <= 40 and int(sent) == 20


def test_resume_bench_sends_nothing_then_only_the_appended_rows() -> None:
    """bench/resume.py reruns a fully answered job (cold, then unchanged): nothing sent, every row in the output;
    then 1% more rows appended: only they are sent."""
    lines = run_bench("resume.py", "--rows", "300", "--repeats", "2")
    found = {line.split()[1]: line.split() for line in lines[-3:]}
    assert [found[kind][5:7] for kind in ("cold", "unchanged", "appended")] == [
        ["0", "300"],
        ["0", "300"],
        ["3", "303"],
    ]


def test_memory_stays_flat_over_20000_image_rows() -> None:
    """bench/media_memory.py: 20,000 image rows (24 KB files, ~640 MB of base64 if bodies were kept) peak within
    64 MB of 2,000 rows: files are read as their requests are sent, never held."""
    lines = run_bench("media_memory.py", "--rows", "2000,20000")
    small, large = (line.split() for line in lines[-2:])
    assert (small[0], small[1], large[0], large[1]) == ("2000", "2000", "20000", "20000")
    assert float(large[3]) - float(small[3]) < 64, (small, large)


def test_speed_bench_compares_with_the_bare_loop() -> None:
    """bench/speed.py prints rows/s and CPU-ms a row for the server alone, the bare loop and batchrunner, and the
    ratios at short and at 16k-token answers."""
    lines = run_bench("speed.py", "--rows", "300", "--repeats", "1", "--long-rows", "30")
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:5]}
    assert set(rows) == {"server_alone", "bare_loop", "batchrunner"}
    assert all(float(rate) > 0 and float(cpu) > 0 and float(server) >= 0 for rate, cpu, server in rows.values())
    assert lines[5].startswith("ratio batchrunner/bare_loop ") and "at 16k tokens" in lines[-1]
    assert lines[6].startswith("CPU a row bounds batchrunner at ")


def test_speed_bench_long_only_prints_the_long_answers_beside_their_bare_loop() -> None:
    """bench/speed.py --long-only measures only the 16k-token answers and the bare loop beside them."""
    lines = run_bench("speed.py", "--long-only", "--repeats", "1", "--long-rows", "30")
    assert lines[0].startswith("16k-token answers, 30 rows: bare_loop ")
    assert lines[-1].startswith("ratio batchrunner/bare_loop at 16k tokens ") and "short" not in lines[-1]


def test_startup_bench_times_each_command() -> None:
    """bench/startup.py runs --help, a 10-row sandbox job and status, each in a fresh process, then the 10-row job
    against a sandbox 0.1 s away."""
    lines = run_bench("startup.py", "--repeats", "1")
    assert [line.split()[0] for line in lines[1:]] == [
        "help",
        "run_10_rows_sandbox",
        "status",
        "run_10_rows_0.1s_away",
    ]


def test_workers_bench_prints_a_line_per_count_of_workers() -> None:
    """bench/workers.py prints rows/s (from start to exit, and in the run), CPU-ms a row and the ratios to one
    worker and to the bare loop for each count of workers, with and without a rate limit."""
    for unpaced in ([], ["--unpaced"]):
        lines = run_bench("workers.py", "--rows", "200", "--repeats", "1", "--workers", "1,2", *unpaced)
        assert lines[1].split() == ["what", "rows/s", "run_rows/s", "cpu_ms/row", "vs_1_worker", "vs_bare_loop"]
        rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
        assert set(rows) == {"bare_loop", "workers_1", "workers_2"}
        assert rows["workers_1"][3] == "1.00" and float(rows["workers_2"][0]) > 0 and float(rows["workers_2"][1]) > 0
        assert rows["bare_loop"][1] == "-"  # the bare loop has no run apart from its start-up
