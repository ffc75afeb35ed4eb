"""`executor: ray` (cluster.py): pairs answered by Ray actors of a cluster, the driver storing, pacing and budgeting.

The cluster tests start one local Ray cluster (`ray start --head`, a few seconds) for the module and run
`batchrunner run` in its own process against a sandbox in this one, whose ledger (`stats.answered`: how many times
each request was answered, so paid for) tells what was paid twice. They are `slow` (CI's second step) and skipped
where Ray is not installed (it is an optional extra)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import run_until
from test_workers import job

from batchrunner.errors import SpecError
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import spec_from_mapping

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install 'batchrunner[ray]')")


@contextlib.contextmanager
def ray_cluster(logs: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Ray cluster of this machine (`ray start --head`, 4 CPUs, on loopback): its address and its head process
    (the leader of its process group); stopped after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    log = (logs / "head.log").open("w")
    # its own temporary folder (short: it holds Unix sockets), so that it records itself there and not as this
    # machine's latest cluster, which a run given no address would join after it is gone
    temp = tempfile.mkdtemp(prefix="br-ray-")
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            *("start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--num-cpus", "4"),
            *("--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp, "--block"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while "ray stop" not in Path(log.name).read_text() and time.monotonic() < deadline:  # its "started" lines
        assert head.poll() is None, Path(log.name).read_text()
        time.sleep(0.2)
    try:
        yield address, head
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        with contextlib.suppress(ProcessLookupError):  # what of the group outlived its leader
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The module's Ray cluster (ray_cluster), its address."""
    with ray_cluster(tmp_path_factory.mktemp("ray")) as (address, _):
        yield address


def env_on(sandbox: Sandbox, address: str) -> dict[str, str]:
    """A run's environment: the sandbox as its server, the module's cluster as its Ray. The key and base URL reach
    the actors only through the driver (a cluster's actors do not have the driver's environment)."""
    return {
        **os.environ,
        "OPENROUTER_BASE_URL": sandbox.base_url,
        "OPENROUTER_API_KEY": "sk-or-v1-test",
        "RAY_ADDRESS": address,
        "RAY_AUTH_MODE": "token",
    }


def ray_job(tmp_path: Path, rows: int, **changes: Any) -> Path:
    return job(tmp_path, rows, executor="ray", **changes)


def run(spec: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchrunner", "run", str(spec)], env=env, capture_output=True, text=True, timeout=180
    )


def actors() -> list[int]:
    """The processes of this machine serving as batchrunner's Ray workers (Ray titles them by the actor's call)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::RayWorker.serve"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def gone(found: Callable[[], list[int]], timeout_s: float = 30) -> None:
    """Wait until `found()` finds no process."""
    deadline = time.monotonic() + timeout_s
    while found() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not found(), f"processes still there after {timeout_s:.0f} s: {found()}"


def paid_twice(sandbox: Sandbox) -> int:
    return sum(count - 1 for count in sandbox.stats.answered.values())


COMPARED = ["id", "text", "model", "status", "response", "prompt_tokens", "completion_tokens", "cost_usd", "attempts"]


@pytest.mark.slow
@needs_ray
def test_a_ray_job_answers_every_row_once_as_a_local_run_does(
    tmp_path: Path, cluster: str, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """On a Ray cluster every row is answered once (the server's ledger), both actors take part, and the output is
    the one a run on this machine alone writes for the same rows."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.005))
    done = run(ray_job(tmp_path, 300), env_on(sandbox, cluster))
    assert done.returncode == 0, done.stderr
    assert sandbox.stats.requests == 300 and max(sandbox.stats.answered.values()) == 1
    answered = next(line for line in done.stderr.splitlines() if "Ray workers answered" in line)
    counts = [int(n) for n in answered.split("answered ")[1].split(" pairs")[0].split(", ")]
    assert len(counts) == 2 and sum(counts) == 300 and min(counts) > 0
    local = tmp_path / "local"
    local.mkdir()
    alone = run(job(local, 300, workers=1), env_on(sandbox, cluster))
    assert alone.returncode == 0, alone.stderr
    ours, theirs = (pl.read_parquet(path / "out.parquet").select(COMPARED) for path in (tmp_path, local))
    assert ours.equals(theirs)


@pytest.mark.slow
@needs_ray
def test_the_budget_holds_across_ray_workers(
    tmp_path: Path, cluster: str, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """Two actors under one budget spend no more than it (the driver is their one governor), and every answer paid
    for is in the output."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.01))
    budget = Decimal("0.0005")
    done = run(ray_job(tmp_path, 300, budget_usd=str(budget)), env_on(sandbox, cluster))
    assert done.returncode == 3, done.stderr
    assert 0 < sandbox.stats.charged_usd <= budget
    stored = pl.read_parquet(tmp_path / "out.parquet")["cost_usd"].cast(pl.Decimal(scale=12)).sum()
    assert stored == sandbox.stats.charged_usd


@pytest.mark.slow
@needs_ray
def test_a_ray_worker_killed_mid_run_costs_only_what_was_on_its_wire(
    tmp_path: Path, cluster: str, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """kill -9 of one actor mid-run: a new actor takes its pairs, every row is answered, and what was paid twice
    is at most what it had on the wire (its 4) and had not handed back (the last FLUSH_S: its 4 again)."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.1))
    gone(actors)  # an earlier test's actors still ending are not this run's: killing one would prove nothing
    process = run_until(ray_job(tmp_path, 400), env_on(sandbox, cluster), lambda: sandbox.stats.requests >= 60)
    victims: list[int] = []
    for _ in range(200):
        if len(victims := actors()) == 2:
            break
        time.sleep(0.05)
    assert len(victims) == 2, victims
    os.kill(victims[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr
    # why it ended is Ray's to say, and in its own time (a loaded machine can take longer than DEATH_NEWS_S)
    assert "ended unexpectedly (its" in stderr, stderr
    output = pl.read_parquet(tmp_path / "out.parquet")
    assert output.height == 400 and set(output["status"]) == {"ok"}
    assert paid_twice(sandbox) <= 4 + 4, f"{paid_twice(sandbox)} answers paid twice"


@pytest.mark.slow
@needs_ray
def test_the_driver_killed_takes_its_actors_along_and_a_rerun_finishes(
    tmp_path: Path, cluster: str, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """kill -9 of the driver: its actors end (no orphan goes on spending on the cluster), and a rerun answers the
    rest, the output that of an uninterrupted run, paying twice for at most what was on the wire and not yet
    committed."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.1))
    spec = ray_job(tmp_path, 300)
    process = run_until(spec, env_on(sandbox, cluster), lambda: sandbox.stats.requests >= 80)
    for _ in range(200):
        if len(actors()) == 2:
            break
        time.sleep(0.05)
    process.kill()
    process.communicate()
    gone(actors, timeout_s=20)  # no actor outlives its driver
    rerun = run(spec, env_on(sandbox, cluster))
    assert rerun.returncode == 0, rerun.stderr
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 300
    assert paid_twice(sandbox) <= 8 + 16, f"{paid_twice(sandbox)} answers paid twice"
    local = tmp_path / "local"
    local.mkdir()
    assert run(job(local, 300, workers=1), env_on(sandbox, cluster)).returncode == 0
    ours, theirs = (pl.read_parquet(path / "out.parquet").select(COMPARED) for path in (tmp_path, local))
    assert ours.equals(theirs)  # the killed and rerun job's output is an uninterrupted local run's


@pytest.mark.slow
@needs_ray
def test_without_an_address_a_cluster_of_this_machine_is_started_for_the_run(tmp_path: Path) -> None:
    """`--executor ray` with no cluster to join starts one here for the run (on the built-in sandbox), and the run
    ends as a local one: exit 0, every row answered, no traceback."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    spec = job(tmp_path, 100)  # executor local in the spec: the command line's --executor overrides it
    done = subprocess.run(
        [sys.executable, "-m", "batchrunner", "run", str(spec), "--sandbox", "--executor", "ray"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Ray workers answered" in done.stderr
    assert pl.read_parquet(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 100


@pytest.mark.slow
@needs_ray
def test_a_cluster_too_small_for_the_workers_is_refused_before_anything_is_sent(
    tmp_path: Path, cluster: str, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """workers: 6 on a cluster of 4 CPUs: exit 2 naming `workers` and the cluster's size, nothing sent (the actors
    that found no room would have waited for ever)."""
    sandbox = sandbox_in_thread(SandboxConfig())
    done = run(ray_job(tmp_path, 10, workers=6), env_on(sandbox, cluster))
    assert done.returncode == 2, done.stderr
    assert "6 Ray workers need a CPU each, and the Ray cluster has 4" in done.stderr
    assert sandbox.stats.requests == 0


@pytest.mark.slow
@needs_ray
def test_an_address_where_no_cluster_answers_is_refused_at_once(tmp_path: Path) -> None:
    """ray_address naming a port where nothing listens: exit 2 within seconds naming ray_address (Ray itself
    retries such an address for minutes), nothing sent."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = ray_job(tmp_path, 10, ray_address=f"127.0.0.1:{port}")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "batchrunner", "run", str(spec), "--sandbox"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "ray_address: no Ray cluster could be joined at 127.0.0.1" in done.stderr
    assert time.monotonic() - started < 20
    assert "Traceback" not in done.stderr


def test_a_ray_job_in_batch_mode_is_refused() -> None:
    """executor: ray answers live; with mode batch the spec is refused naming the fix (nothing sent)."""
    base = {"name": "j", "input": "in.csv", "output": "out.csv", "models": ["openai/gpt-4o-mini"], "prompt": "{x}"}
    with pytest.raises(SpecError, match="remove `executor: ray` or use mode live"):
        spec_from_mapping({**base, "executor": "ray", "mode": "batch"})
    with pytest.raises(SpecError, match="add `executor: ray` or remove it"):
        spec_from_mapping({**base, "ray_address": "auto"})


def test_without_ray_installed_a_ray_job_is_refused_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """executor: ray where Ray is not installed: exit 2 before anything is opened, naming the spec's line and the
    extra to install (not an ImportError's traceback)."""
    pl.DataFrame({"id": ["a"], "text": ["t"]}).write_parquet(tmp_path / "in.parquet")
    (tmp_path / "job.yaml").write_text(
        "name: j\ninput: in.parquet\nid_column: id\noutput: out.parquet\nmodels: [openai/gpt-4o-mini]\n"
        "prompt: '{text}'\nexecutor: ray\n"
    )
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ImportError('no ray here')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-m", "batchrunner", "run", str(tmp_path / "job.yaml"), "--sandbox"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "job.yaml:7: executor" in done.stderr and "pip install 'batchrunner[ray]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.checkpoint.sqlite").exists()


async def test_a_stranger_at_the_drivers_port_is_dropped_unread() -> None:
    """The driver's port takes a connection only with a token it handed an actor: a stranger's bytes (here a
    pickle that would create a file) are never unpickled, and the connection is closed."""
    from batchrunner.cluster import TOKEN_BYTES

    executor = ray_executor()
    token = b"t" * TOKEN_BYTES
    expected: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    executor._waiting[token] = expected
    async with drivers_port(executor) as port:
        marker = Path(f"/tmp/batchrunner-pickle-ran-{os.getpid()}")

        class Evil:
            def __reduce__(self) -> tuple[Any, ...]:
                return (open, (str(marker), "w"))

        payload = pickle.dumps(Evil())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x" * TOKEN_BYTES + len(payload).to_bytes(4, "big") + payload)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # closed by the driver
        assert not expected.done() and not marker.exists()
        writer.close()
        await writer.wait_closed()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(token)
        channel = await asyncio.wait_for(expected, timeout=5)  # the actor's own connection is taken
        await channel.close()
        writer.close()
        await writer.wait_closed()


@pytest.mark.slow
@needs_ray
def test_sigterm_to_the_driver_stops_the_run_as_ctrl_c_does(
    tmp_path: Path, cluster: str, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """SIGTERM to the driver lets the requests on the wire land and exits 3, every answer paid for stored (ray.init
    put its own SIGTERM handler in place of the run's: exit 15, a native stack dump, the wire's answers lost)."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.3))
    process = run_until(ray_job(tmp_path, 400), env_on(sandbox, cluster), lambda: sandbox.stats.requests >= 60)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 3, stderr
    assert "SIGTERM received" not in stderr and "Traceback" not in stderr
    assert "stopping: SIGTERM" in stderr
    time.sleep(1)  # what was on the wire lands at the server, and is charged
    stored = pl.read_parquet(tmp_path / "out.parquet")["cost_usd"].cast(pl.Decimal(scale=12)).sum()
    assert stored == sandbox.stats.charged_usd


@pytest.mark.slow
@needs_ray
def test_a_ray_cluster_lost_mid_run_stops_the_run_saying_so(
    tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """The whole cluster killed mid-run (its actors with it): the driver stops within seconds, exit 3 naming the
    cluster, the output written with what was answered (it waited for new actors that never came until Ray
    ended the process after 60 s: exit 1, Ray's message, no output)."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.3))
    with ray_cluster(tmp_path) as (address, head):
        spec = ray_job(tmp_path, 400)
        process = run_until(spec, env_on(sandbox, address), lambda: sandbox.stats.requests >= 60)
        os.killpg(head.pid, signal.SIGKILL)
        started = time.monotonic()
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 3, stderr
    assert time.monotonic() - started < 40, stderr
    assert "the Ray cluster at" in stderr and "no longer answers" in stderr
    assert "Traceback" not in stderr and "Failed to connect to GCS" not in stderr and "never retrieved" not in stderr
    output = pl.read_parquet(tmp_path / "out.parquet")
    assert (output["status"] == "ok").sum() >= 60 - 16  # what was answered, less what the actors had not handed back


HOG = """
import sys, time, ray
ray.init(address=sys.argv[1], include_dashboard=False)
@ray.remote(num_cpus=1)
class Hog:
    def ping(self):
        return 1
hogs = [Hog.remote() for _ in range(int(sys.argv[2]))]
ray.get([hog.ping.remote() for hog in hogs])
print("holding", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@needs_ray
def test_ctrl_c_while_the_cluster_has_no_room_for_the_actors_stops_at_once(
    tmp_path: Path, cluster: str, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """Every CPU of the cluster taken by another job: Ctrl-C stops the run within seconds (exit 3, nothing sent),
    not once the actors waiting for a CPU have been given up on, 120 s later."""
    sandbox = sandbox_in_thread(SandboxConfig())
    env = env_on(sandbox, cluster)
    hog = subprocess.Popen([sys.executable, "-c", HOG, cluster, "4"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout is not None and hog.stdout.readline().strip() == "holding"
        process = subprocess.Popen(
            [sys.executable, "-m", "batchrunner", "run", str(ray_job(tmp_path, 20))],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(8)  # the driver has joined the cluster, and its actors wait for a CPU
        process.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        _, stderr = process.communicate(timeout=150)
    finally:
        hog.kill()
        hog.communicate()
    assert process.returncode == 3, stderr
    assert time.monotonic() - stopped < 20, stderr
    assert "stopping: SIGINT" in stderr and "Traceback" not in stderr
    assert sandbox.stats.requests == 0


@pytest.mark.slow
@needs_ray
def test_an_actor_waiting_for_room_does_not_hold_up_the_one_that_started(
    tmp_path: Path, cluster: str, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """Three of the cluster's four CPUs taken by another job, two workers asked for: the one actor that starts
    answers every row at once, and the run ends without waiting for the other (it used to wait for both before
    handing out a pair: 120 s idle, then the run went on with one)."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.01))
    env = env_on(sandbox, cluster)
    hog = subprocess.Popen([sys.executable, "-c", HOG, cluster, "3"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout is not None and hog.stdout.readline().strip() == "holding"
        started = time.monotonic()
        done = run(ray_job(tmp_path, 100), env)
    finally:
        hog.kill()
        hog.communicate()
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 45, done.stderr
    assert "the 1 Ray workers answered 100 pairs" in done.stderr and "Traceback" not in done.stderr
    assert sandbox.stats.requests == 100 and max(sandbox.stats.answered.values()) == 1
    assert "the Ray cluster has 1 free CPUs of 4: 1 of the 2 Ray workers wait for room" in done.stderr  # said at once


async def test_a_connection_when_no_actor_is_starting_is_closed_at_once() -> None:
    """With no actor starting, a connection to the driver's port is closed at once, unread: a stranger's idle
    connections were each kept HELLO_S, and a thousand of them ran the driver out of file descriptors
    (`socket.accept() out of system resource` tracebacks, and no new connection to the API or a new actor)."""

    async with drivers_port(ray_executor()) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), timeout=2) == b""  # closed by the driver, not after HELLO_S
        writer.close()
        await writer.wait_closed()


def ray_executor() -> Any:
    """A RayExecutor of a minimal job, for what its driver's port does (no cluster is joined)."""
    from batchrunner.cluster import RayExecutor

    spec = spec_from_mapping(
        {"name": "j", "input": "in.csv", "output": "out.csv", "models": ["m/x"], "prompt": "{x}", "executor": "ray"}
    )
    return RayExecutor(spec, address=None, sandbox_url=None, server="s")


@contextlib.asynccontextmanager
async def drivers_port(executor: Any) -> AsyncIterator[int]:
    """The driver's port on loopback, served by `executor`'s greeting of connecting actors; closed after."""
    server = await asyncio.start_server(executor._hello, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.slow
@needs_ray
def test_ray_says_nothing_on_stdout_where_the_summary_is_json(
    tmp_path: Path, cluster: str, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """`run --json` with an actor killed mid-run: stdout is the summary's JSON alone (Ray printed its "(raylet) A
    worker died" message there, and a script parsing the summary failed)."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.1))
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "run", str(ray_job(tmp_path, 200)), "--json"],
        env=env_on(sandbox, cluster),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while (len(victims := actors()) < 2 or sandbox.stats.requests < 40) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(victims[0], signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr
    assert "ended unexpectedly" in stderr
    assert json.loads(stdout)["rows_ok"] == 200, stdout


@pytest.mark.slow
@needs_ray
def test_a_script_that_joined_a_cluster_runs_its_job_there(
    tmp_path: Path, cluster: str, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """From Python, in a script that called ray.init() itself, `run(job, executor="ray")` answers on that cluster
    (joined once: Ray refuses a second init) and returns exit code 0 with every row."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.005))
    spec = job(tmp_path, 50)
    script = tmp_path / "script.py"
    script.write_text(
        "import ray, batchrunner\n"
        f"ray.init(address={cluster!r})\n"
        f"result = batchrunner.run({str(spec)!r}, executor='ray')\n"
        "print('exit', result.exit_code, result.summary.ok)\n"
    )
    env = {key: value for key, value in env_on(sandbox, cluster).items() if key != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "exit 0 50" in done.stdout
    assert sandbox.stats.requests == 50
