"""Ray, for a cluster: `executor: ray` answers a run's pairs in Ray actors, on as many machines as the cluster has.

The workers speak processes.py's protocol, unchanged; only how they are started and reached differs. The run's
own process (the driver, the parent of processes.py) stays what it is with `workers: N`: it reads the input,
renders the pairs, knows which are left, dedupes, holds the one rate limit and the one budget (the governor:
every worker's reservation and rate-limit slot is granted by it, with the rules of live.py and limits.py), and is
the checkpoint's one writer (the ledger: every answer paid for is stored there as it arrives, and a pair the
checkpoint holds is never handed to a worker again, by this run or a rerun). Each worker is a Ray actor that
connects back to the driver over TCP and drives the pairs it is handed through their flows with its own client:
the same LiveExecutor and LiveAnswerer as one process.

Why a connection of our own and not actor calls: the protocol asks the driver a question per request (a
reservation, a slot), and Ray's actor calls top out at a few thousand a second; a socket carries tens of
thousands, and the processes.py code that answers them is tested already. The connection is the driver's: it
listens on the node's address (loopback when the cluster is this machine's) and takes a connection only after it
sends the 32 random bytes the driver gave that actor (before anything it sends is unpickled). The worker's API
keys (and OPENROUTER_BASE_URL) go to it over that connection, never in an actor's arguments: Ray keeps those.

What a kill costs is what it costs with `workers: N`: an actor that dies (killed, its node lost) has its pairs
handed to a new actor, what it had on the wire may have been billed and is asked again; the driver killed takes
its actors along (Ray ends a job's actors with its driver; each also quits as its connection closes), and a rerun
goes on from the checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from batchrunner.errors import Problem, SpecError
from batchrunner.executor import Answerer, Execution
from batchrunner.halt import Halt
from batchrunner.pending import Batch
from batchrunner.processes import Channel, Hand, WorkerSetup, WorkerStartFailed, _ParentSays, _serve, crew_execute
from batchrunner.records import ResultSink
from batchrunner.spec import JobSpec

log = logging.getLogger("batchrunner")

TOKEN_BYTES = 32
HELLO_S = 10.0  # a connection that has not said its token by then is closed
CONNECT_S = 3.0  # a cluster's address that takes no connection by then is not a cluster to join
START_S = 120.0  # an actor that has not connected by then: the cluster has no room for it (or cannot start it)
DEATH_NEWS_S = 15.0  # how long Ray may take to say an actor died, once its connection closed (it says so within
# a second on a quiet machine; over 5 s on this 2-core one under load, and the log then blamed a lost node)


def ray_module(spec: JobSpec) -> Any:
    """Ray, imported when a run asks for it (an optional extra), or a SpecError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise SpecError(
            Problem(
                spec.locate("executor"),
                "executor: ray needs Ray, which is not installed here: pip install 'batchrunner[ray]' "
                "(or remove `executor: ray` to answer on this machine)",
            )
        ) from exc
    return ray


def worker_env(spec: JobSpec) -> dict[str, str]:
    """The environment a worker on another machine needs to reach the spec's server(s): the key of each (the
    variables the spec names) and OPENROUTER_BASE_URL, as this process has them."""
    names = {spec.api.api_key_env, "OPENROUTER_BASE_URL"}
    names |= {endpoint.api_key_env for endpoint in spec.api.endpoints or () if endpoint.api_key_env}
    return {name: os.environ[name] for name in sorted(names) if name in os.environ}


class RayExecutor:
    """`executor: ray`: the pairs answered in `workers` Ray actors; the driver stores, paces and budgets them."""

    def __init__(
        self,
        spec: JobSpec,
        *,
        address: str | None,
        sandbox_url: str | None,
        server: str,
        grace_s: float = 30.0,
    ) -> None:
        self.spec = spec
        self.workers = spec.workers
        self.address = address
        self.sandbox_url = sandbox_url
        self.server = server
        self.grace_s = grace_s
        self.kind = "Ray workers"
        self._waiting: dict[bytes, asyncio.Future[Channel]] = {}
        self._server: asyncio.Server | None = None
        self._host = "127.0.0.1"
        self._actor: Any = None
        self._gcs = ""  # the cluster's head (host:port), once joined

    def setup_env(self) -> dict[str, str]:
        return worker_env(self.spec)

    async def execute(self, work: Iterable[Batch], answerer: Answerer, sinks: ResultSink, halt: Halt) -> Execution:
        ray = ray_module(self.spec)
        await self._join(ray)
        self._server = await asyncio.start_server(self._hello, self._host, 0)
        try:
            return await crew_execute(self, work, answerer, sinks, halt)
        finally:
            self._server.close()
            for future in self._waiting.values():
                future.cancel()

    async def _join(self, ray: Any) -> None:
        """Join the cluster at `address` (or RAY_ADDRESS, or the one `ray start` made here), or start one on this
        machine for the run; a cluster that does not answer is said at once (Ray itself would wait minutes)."""
        if not ray.is_initialized():
            address = self._reachable(ray)
            try:
                with _signals_kept():
                    _off_stdout(ray)
                    ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise self._unjoinable(self._given() or "", exc) from exc
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < self.workers:  # each actor takes a CPU: the others would wait for room that never comes
            raise SpecError(
                Problem(
                    self.spec.locate("workers"),
                    f"{self.workers} Ray workers need a CPU each, and the Ray cluster has {cpus}: lower workers "
                    "(or add nodes to the cluster)",
                )
            )
        free = int(ray.available_resources().get("CPU", 0))
        if free < self.workers:  # another job holds them: said now, not after START_S of silence
            log.warning(
                "the Ray cluster has %d free CPUs of %d: %d of the %d Ray workers wait for room (up to %.0f s each); "
                "the others answer meanwhile",
                free,
                cpus,
                self.workers - free,
                self.workers,
                START_S,
            )
        if _is_local(ray):
            self._host = "127.0.0.1"
        else:  # workers on other machines reach the driver at its node's address
            self._host = ray.util.get_node_ip_address()
        self._actor = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(RayWorker)
        self._gcs = ray.get_runtime_context().gcs_address

    def _cluster_answers(self) -> bool:
        """Whether the cluster's head (its GCS) still takes a connection: a cluster stopped mid-run takes the actors
        along, and new ones would wait for it until Ray ends the driver (60 s on, exit 1, nothing written)."""
        try:
            _connect(self._gcs)
        except (OSError, ValueError):
            return False
        return True

    async def launch(self, setup: WorkerSetup) -> tuple[Hand, Channel]:
        """An actor started with `setup`: it connects to the driver with its token, then is sent `setup`."""
        assert self._server is not None and self._actor is not None
        token = secrets.token_bytes(TOKEN_BYTES)
        connected: asyncio.Future[Channel] = asyncio.get_running_loop().create_future()
        self._waiting[token] = connected
        port = self._server.sockets[0].getsockname()[1]
        actor = self._actor.options(name=None, scheduling_strategy="SPREAD").remote()
        ref = actor.serve.remote(self._host, port, token, setup.number, setup.log_level)
        hand = ActorHand(actor, ref)
        deadline = time.monotonic() + START_S
        gone = False
        try:
            while True:  # the cluster asked now and then: an actor it lost with its head never connects
                done, _ = await asyncio.wait(
                    {connected, hand.over}, timeout=CONNECT_S, return_when=asyncio.FIRST_COMPLETED
                )
                if done or time.monotonic() > deadline:
                    break
                if gone := not await asyncio.get_running_loop().run_in_executor(None, self._cluster_answers):
                    break
        except asyncio.CancelledError:  # the run stopped while it waited: the actor would take a CPU for nothing
            hand.kill()
            raise
        finally:
            self._waiting.pop(token, None)
        if connected not in done:
            connected.cancel()
            if gone:  # (ray.kill would wait on the lost cluster)
                raise WorkerStartFailed(
                    f"the Ray cluster at {self._gcs} no longer answers (stopped, or its head node lost): start it "
                    "again and rerun"
                )
            hand.kill()
            if hand.over in done:
                raise WorkerStartFailed(f"a Ray worker ended as it started ({hand.ended()})")
            raise WorkerStartFailed(
                f"no Ray worker connected to the driver at {self._host}:{port} within {START_S:.0f} s: the cluster "
                "has no free CPU for it, or its nodes cannot reach this machine at that address"
            )
        channel = connected.result()
        channel.send(setup)
        hand.watch(channel)
        return hand, channel

    async def _hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection to the driver: kept only if its first bytes are a token handed to an actor now starting.
        With none starting it is closed at once: a stranger's idle connections, each kept HELLO_S, ran the driver
        out of file descriptors."""
        if self._waiting:
            with contextlib.suppress(Exception):
                token = await asyncio.wait_for(reader.readexactly(TOKEN_BYTES), timeout=HELLO_S)
                for expected, future in list(self._waiting.items()):
                    if hmac.compare_digest(token, expected) and not future.done():
                        _keep_alive(writer)
                        future.set_result(Channel(reader, writer))
                        return
        writer.close()

    def _reachable(self, ray: Any) -> str | None:
        """The address to hand ray.init: the one given (or RAY_ADDRESS) if its cluster answers, else a SpecError
        now; with none given, the cluster `ray start` recorded on this machine if it still answers, else "local"
        (a new cluster here: a record left by a cluster that was killed would have Ray wait on it for minutes)."""
        given = self._given()
        if given is not None and given.startswith("ray://"):  # Ray Client: its server answers at host:port
            target: str | None = given.removeprefix("ray://")
        else:
            try:
                target = ray._private.services.canonicalize_bootstrap_address(given)
            except Exception as exc:  # "auto" with no cluster here, a malformed address
                raise self._unjoinable(given or "auto", exc) from exc
        if target is None:
            return "local" if given is None else given
        try:
            _connect(target)
        except (OSError, ValueError) as exc:
            if given is None:
                log.warning(
                    "the Ray cluster this machine last started (%s) does not answer: starting one here for the run",
                    target,
                )
                return "local"
            raise self._unjoinable(given, exc) from exc
        return given

    def _given(self) -> str | None:
        """The cluster the run was told to join: `ray_address`, else RAY_ADDRESS; None: Ray's own rule finds one."""
        return self.address or os.environ.get("RAY_ADDRESS") or None

    def _unjoinable(self, where: str, exc: BaseException) -> SpecError:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return SpecError(
            Problem(
                self.spec.locate("ray_address") if self.address else "RAY_ADDRESS",
                f"no Ray cluster could be joined at {where or 'this machine'} ({first}); start one "
                "(`ray start --head`) or fix the address",
            )
        )


def _connect(address: str) -> None:
    """Connect to `address` (host:port) and hang up: OSError (or ValueError for no port) when nothing takes the
    connection within CONNECT_S."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_S):
        pass


def _keep_alive(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive on a driver-actor connection: a peer whose machine vanished is found out by the kernel."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


@contextlib.contextmanager
def _signals_kept() -> Iterator[None]:
    """The run's own SIGINT and SIGTERM handlers (interrupts.py), put back after ray.init: it sets a SIGTERM handler
    that exits at once (and its core worker one that dumps a native stack), so a SIGTERM to the driver lost the
    answers on the wire, paid for, and exited 15 instead of stopping as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield  # (Ray sets none outside the main thread)
        return
    kept = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in kept.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _off_stdout(ray: Any) -> None:
    """What Ray prints in the driver (its "(raylet) A worker died" messages, an actor's prints) goes to stderr, as
    the run's own log does: stdout is the summary's (`run --json` prints one JSON object there, which a script
    parses). Ray's driver prints them with one function, looked up as it prints (its error messages' thread) or as
    it starts (its actors' log thread): replaced before ray.init."""
    worker = ray._private.worker
    printing = worker.print_to_stdstream
    if getattr(printing, "to_stderr", False):
        return

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        printing({**data, "is_err": True}, ignore_prefix)

    to_stderr.to_stderr = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_stderr


def _is_local(ray: Any) -> bool:
    """Whether every node of the cluster is this machine (then the driver listens on loopback alone)."""
    here = ray.util.get_node_ip_address()
    return all(node.get("NodeManagerAddress") == here for node in ray.nodes() if node.get("Alive"))


class ActorHand:
    """A worker that is a Ray actor, as the driver holds it: its `serve` call's result says when it ended."""

    def __init__(self, actor: Any, ref: Any) -> None:
        self.actor, self.ref = actor, ref
        self.over: asyncio.Future[Any] = asyncio.wrap_future(ref.future())
        # its end read even when nobody asks how it ended (an actor given up on as it started): else asyncio logs
        # "Future exception was never retrieved" with Ray's error, an ERROR line after the run's last words
        self.over.add_done_callback(lambda over: over.cancelled() or over.exception())

    def watch(self, channel: Channel) -> None:
        """An actor that ended (killed, its node lost) closes its connection: a lost node may never say so on the
        socket itself, and the driver would wait on it for ever."""
        self.over.add_done_callback(lambda _: channel.writer.transport.abort())

    def alive(self) -> bool:
        return not self.over.done()

    def kill(self) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)

    def wait(self, timeout_s: float) -> None:
        """Wait for the actor's end: at least DEATH_NEWS_S, the time Ray may take to learn of a death (its
        connection to the driver closes first) and say why."""
        import ray

        ray.wait([self.ref], timeout=max(timeout_s, DEATH_NEWS_S))

    def ended(self) -> str:
        if not self.over.done():
            return f"its connection closed; Ray had not said why within {DEATH_NEWS_S:.0f} s: its node lost?"
        error = self.over.exception()
        if error is None:
            return "it returned"
        text = str(error).strip().splitlines()
        return f"its Ray actor died: {type(error).__name__}" + (f", {text[0][:200]}" if text else "")


class RayWorker:
    """The actor: one worker of processes.py's protocol, connected to the driver over TCP."""

    def serve(self, host: str, port: int, token: bytes, number: int, log_level: int) -> None:
        with contextlib.suppress(ValueError):  # Ctrl-C and SIGTERM are the driver's to act on (as in processes.py)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        logging.basicConfig(level=log_level, format=f"worker {number}: %(message)s", force=True)
        logging.getLogger("batchrunner").addFilter(_ParentSays())
        asyncio.run(_connect_and_serve(host, port, token))


async def _connect_and_serve(host: str, port: int, token: bytes) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    _keep_alive(writer)
    writer.write(token)
    channel = Channel(reader, writer)
    setup = await channel.receive()
    if not isinstance(setup, WorkerSetup):  # the driver is gone before it said anything
        return
    await _serve(channel, setup)
