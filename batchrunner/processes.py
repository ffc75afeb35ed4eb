"""Every core of one machine: `workers: N` answers a run's pairs in N processes (the process executor).

One asyncio process saturates one core: rendering, the flow, HTTP and JSON for each pair. With `workers: N`
the run's own process (the parent) stays what it was, and N worker processes do the answering:

- the parent reads the input, renders each pair and knows which are left (pending.py), owns the checkpoint
  (the one writer), the summary, the progress line, dedupe and the run's halt, and holds the run's rate limit
  and budget. It hands the pairs to the workers over a socket each, the least busy first, a bounded number
  ahead of what each has answered;
- each worker drives every pair it is handed through its flow with its own client, breaker and server watch
  (a live.LiveAnswerer in a live.LiveExecutor: the same driver as one process), and asks the parent for each
  request's budget reservation and rate-limit slot. The parent grants them with its own answerer (reserve,
  settle, the rate limit's acquire): the rule is written once, in live.py and limits.py, and this module only
  carries the questions and answers. A run with no budget and no finite rate asks nothing per request.
- every result goes back to the parent, every FLUSH_S, which stores it as a one-process run would.

What a kill costs. A worker killed (kill -9, the OOM killer): the parent hears its socket close; the pairs it
held go to the other workers (and a new worker takes its place); what it had on the wire may have been billed
and is asked again, and so are the answers it had not handed back yet (at most FLUSH_S of them); the
reservations it held are counted as spent, so the budget holds whatever it had paid. The parent killed: each
worker hears its socket close and quits at once; the checkpoint holds what the parent committed, as after a
kill of a one-process run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from batchrunner.adaptive import Aimd
from batchrunner.connect import SANDBOX_KEY, Connection, client_for
from batchrunner.costs import ZERO_USD, Budget, PriceTable
from batchrunner.errors import ApiError, BatchrunnerError, FreeModelCapReached, first_line
from batchrunner.executor import Answerer, Execution, count_resumed
from batchrunner.halt import Halt, Stop, StopReason
from batchrunner.limits import is_free, next_utc_midnight
from batchrunner.live import InFlight, LiveAnswerer, LiveExecutor
from batchrunner.pending import Batch, Todo
from batchrunner.pool import Pool, pool_of
from batchrunner.records import EndpointStats, ResultSink, RowResult
from batchrunner.request import RequestBuilder
from batchrunner.retries import RetryPolicy
from batchrunner.spec import JobSpec

log = logging.getLogger("batchrunner")

FLUSH_S = 0.02  # a worker hands its results back this often: what a kill -9 of a worker can lose, at most
FLUSH_RESULTS = 256  # ...or as soon as it has this many
AHEAD = 2  # pairs handed to a worker beyond what it can have on the wire: its queue never runs dry
SEND_AT_ONCE = 64  # pairs in one message to a worker
SLOTS_AT_ONCE = 32  # rate-limit slots asked for at once, at most (each used as it arrives: no burst held back)
GIVE_UP_S = 0.5  # a second Ctrl-C: how long a worker waits for its cancelled requests' records (the parent, 0.8 s)
FINISH_S = 10.0  # after the grace for requests on the wire: how long a worker may take to say it finished
MAX_DEATHS_PER_WORKER = 2  # more deaths than this (times N) end the run: something is killing the workers


# -- what parent and workers say to each other ----------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """Pairs for a worker, each with the parent's number for it."""

    todos: list[tuple[int, Todo]]


@dataclass(frozen=True)
class NoMoreWork:
    """The input is read: a worker finishes what it holds and ends."""


@dataclass(frozen=True)
class Halted:
    """The run stops (parent to workers), or a worker stopped it (worker to parent)."""

    reason: StopReason
    message: str
    error: ApiError | None = None


@dataclass(frozen=True)
class GiveUp:
    """A second Ctrl-C (parent to workers): give up on the requests on the wire, each recorded at its worst case
    (it may have been billed), and hand the records back at once (the worker answers GaveUp once sent)."""


@dataclass(frozen=True)
class GaveUp:
    """A worker's answer to GiveUp: the records of the requests it gave up on are sent (before this)."""


@dataclass(frozen=True)
class Reserve:
    ask: int
    worst_usd: Decimal


@dataclass(frozen=True)
class Slot:
    ask: int
    model: str
    count: int  # slots wanted: the worker's requests waiting for one


@dataclass(frozen=True)
class Granted:
    """The answer to a Reserve, or one slot of a Slot (one Granted for each, as it comes due): `ok` False means
    the run stopped instead (or free models are out)."""

    ask: int
    ok: bool


@dataclass(frozen=True)
class Settle:
    reserved_usd: Decimal
    actual_usd: Decimal


@dataclass(frozen=True)
class SlowDown:
    model: str
    upstream: bool


@dataclass(frozen=True)
class Waiting:
    """A worker's pairs waiting to retry: +1 as one starts waiting, -1 as it stops (the progress line's count)."""

    delta: int


@dataclass(frozen=True)
class CapReached:
    model: str


@dataclass(frozen=True)
class Results:
    """Pairs a worker finished: each pair's number and its result (None: left pending, nothing recorded)."""

    done: list[tuple[int, RowResult | None]]


@dataclass(frozen=True)
class Failed:
    """A bug raised in a worker (worker to parent), with its trace: the run ends on it as one process's does,
    and no worker is started into the same bug again."""

    trace: str


@dataclass(frozen=True)
class Finished:
    """A worker's last message: what it asked of each endpoint of a pool (the summary's lines), and with
    `concurrency: auto` where its in-flight limit ended and the most it reached."""

    endpoints: dict[str, EndpointStats]
    concurrency: tuple[int, int] | None = None


class Channel:
    """Messages over a stream socket: a 4-byte length, then the pickled message. Both ends are this program."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def over(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    def send(self, message: object) -> None:
        if self.writer.is_closing():
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(len(data).to_bytes(4, "big") + data)

    async def receive(self) -> object | None:
        """The next message; None once the other end is gone."""
        try:
            size = int.from_bytes(await self.reader.readexactly(4), "big")
            return pickle.loads(await self.reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


class WorkerStartFailed(BatchrunnerError):
    """A launcher could not start a worker (cluster.py: the cluster had no room for it, or it never connected)."""


class WorkerFailed(RuntimeError):
    """A bug raised in a worker process, raised again in the parent as one process's bug would be: its message is
    the worker's trace."""

    def __init__(self, trace: str) -> None:
        super().__init__(f"in a worker process:\n{trace.rstrip()}")


# -- the worker's side ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker process is started with: the job (its share of the concurrency) and how to reach its server."""

    spec: JobSpec
    number: int
    server: str  # the fingerprint's server (spec.server()): the worker's requests are keyed as the parent's
    sandbox_url: str | None  # a sandbox the parent started; None: the spec's server (or pool), keys from the env
    retry: RetryPolicy
    prices: PriceTable | None
    budget_usd: Decimal | None  # the run's budget, whose reservations are the parent's
    paced: bool  # the rate limit is finite: each request's slot is the parent's
    byok_fee: bool
    grace_s: float
    log_level: int
    # concurrency: auto, the in-flight limit this worker starts at (its share of one process's start; each worker
    # learns its own limit from what it sees, as one process does); None: its concurrency is fixed
    in_flight_start: int | None = None
    # environment variables the worker sets before it connects (the API keys, OPENROUTER_BASE_URL): a worker on
    # another machine (cluster.py) does not have the parent's environment; a worker process here inherits it
    env: dict[str, str] = field(default_factory=dict, repr=False)


def share(spec: JobSpec, workers: int, number: int) -> JobSpec:
    """Worker `number`'s share of the spec's concurrency (and of each pool endpoint's): together, the spec's."""

    def part(total: int) -> int:
        return max(1, total // workers + (1 if number < total % workers else 0))

    update: dict[str, Any] = {"workers": 1, "max_concurrency": part(spec.max_concurrency)}
    if isinstance(spec.concurrency, int):
        update["concurrency"] = part(spec.concurrency)
    if spec.api.endpoints:
        caps = [cap for _, cap in spec.endpoint_caps()]
        endpoints = [
            e.model_copy(update={"concurrency": part(cap)}) for e, cap in zip(spec.api.endpoints, caps, strict=True)
        ]
        update["api"] = spec.api.model_copy(update={"endpoints": endpoints})
    return spec.model_copy(update=update)


def worker_main(sock: socket.socket, setup: WorkerSetup) -> None:
    """A worker process: answer what the parent hands over until it says there is no more (or is gone).

    Ctrl-C and SIGTERM are the parent's to act on (it tells the workers); a worker never acts on them itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=setup.log_level, format=f"worker {setup.number}: %(message)s")
    logging.getLogger("batchrunner").addFilter(_ParentSays())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_socket(sock, setup))


async def _serve_socket(sock: socket.socket, setup: WorkerSetup) -> None:
    await _serve(await Channel.over(sock), setup)


class _ParentSays(logging.Filter):
    """What the parent prints for the whole run (that it stops, and why) is not printed again by each worker."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("stopping:")


class Parent:
    """The worker's end of the parent's rate limit and budget: duck-typed as limits.Limits for the answerer,
    and the budget's reservations as its governor. Questions go out numbered; answers wake their askers."""

    def __init__(self, channel: Channel, setup: WorkerSetup) -> None:
        self.channel, self.setup = channel, setup
        self._asked: dict[int, asyncio.Future[bool]] = {}
        self._next = 0
        self.free_cap = setup.spec.free_requests_per_day
        self.free_cap_reached: FreeModelCapReached | None = None
        self._slots: dict[str, _Slots] = {}
        self._slot_asks: dict[int, str] = {}  # the Slot questions out: their number -> their model

    async def _ask(self, message: Reserve) -> bool:
        """A reservation asked of the parent, waited for (slots are counted as they come instead: `answered`)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._asked[message.ask] = future
        self.channel.send(message)
        try:
            return await future
        finally:
            self._asked.pop(message.ask, None)

    def _number(self) -> int:
        self._next += 1
        return self._next

    def answered(self, granted: Granted) -> None:
        model = self._slot_asks.get(granted.ask)
        if model is not None:  # one slot of a Slot question (the parent grants them one at a time), or its refusal
            slots = self._slots[model]
            slots.owed = slots.owed - 1 if granted.ok else 0
            slots.left += 1 if granted.ok else 0
            slots.refused = slots.refused or not granted.ok
            if not slots.owed:
                del self._slot_asks[granted.ask]
            slots.wake()
            return
        future = self._asked.get(granted.ask)
        if future is not None and not future.done():
            future.set_result(granted.ok)

    def gone(self) -> None:
        for future in self._asked.values():
            if not future.done():
                future.set_result(False)
        for slots in self._slots.values():
            slots.refused = True
            slots.wake()

    # the budget (live.LiveAnswerer's governor)
    async def reserve(self, worst_usd: Decimal) -> bool:
        if self.setup.budget_usd is None:
            return True
        return await self._ask(Reserve(self._number(), worst_usd))

    def settle(self, reserved_usd: Decimal, actual_usd: Decimal) -> None:
        if self.setup.budget_usd is not None:
            self.channel.send(Settle(reserved_usd, actual_usd))

    # the rate limit (limits.Limits' methods the answerer calls)
    async def acquire(self, model: str) -> None:
        """A slot of the parent's rate limit for `model`. Slots are asked for as many requests as wait for one
        (SLOTS_AT_ONCE at most), one question at a time per model, and the parent grants them one by one as its
        pace allows: each is used as it arrives, so a worker never holds slots to spend in a burst later (a
        group granted at once went out at once, over the account's rate)."""
        if not self.setup.paced and not is_free(model):
            return
        if self.free_cap_reached is not None and is_free(model):
            raise self.free_cap_reached
        slots = self._slots.setdefault(model, _Slots())
        slots.waiting += 1
        try:
            while not slots.left:
                if slots.refused:
                    raise self.cap_reached(model)
                if not slots.owed:
                    slots.owed = min(slots.waiting, SLOTS_AT_ONCE) if not is_free(model) else 1
                    ask = self._number()
                    self._slot_asks[ask] = model
                    self.channel.send(Slot(ask, model, slots.owed))
                await slots.arrived.wait()
        finally:
            slots.waiting -= 1
        slots.left -= 1

    def rate_limited(self, model: str, *, upstream: bool) -> None:
        self.channel.send(SlowDown(model, upstream))

    def cap_reached(self, model: str) -> FreeModelCapReached:
        if self.free_cap_reached is None:
            self.free_cap_reached = FreeModelCapReached(model, self.free_cap, next_utc_midnight())
            self.channel.send(CapReached(model))
        return self.free_cap_reached


@dataclass
class _Slots:
    """A worker's slots of the rate limit for one model: those given and not yet used, and those asked for and
    not yet given (one question out at a time)."""

    left: int = 0
    waiting: int = 0
    owed: int = 0
    refused: bool = False  # the parent said no (free models are out for the day)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        """Let the requests waiting for a slot look again."""
        self.arrived.set()
        self.arrived = asyncio.Event()


class Outbox:
    """The results a worker hands back: gathered, then sent every FLUSH_S (or FLUSH_RESULTS at once)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.done: list[tuple[int, RowResult | None]] = []

    def add(self, number: int, result: RowResult | None) -> None:
        self.done.append((number, result))
        if len(self.done) >= FLUSH_RESULTS:
            self.flush()

    def flush(self) -> None:
        if self.done:
            self.channel.send(Results(self.done))
            self.done = []

    async def every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.flush()


class _Numbered:
    """The worker's answerer as its LiveExecutor sees it: each pair's result goes to the outbox under the
    parent's number for it (none goes to the executor's sinks)."""

    def __init__(self, answerer: LiveAnswerer, outbox: Outbox) -> None:
        self.answerer, self.outbox = answerer, outbox
        self.sending = answerer.sending
        self.numbers: dict[int, int] = {}  # id(todo) -> the parent's number

    async def answer(self, todo: Todo) -> RowResult | None:
        result = await self.answerer.answer(todo)
        self.outbox.add(self.numbers.pop(id(todo)), result)
        return None


class _NoSinks:
    """The worker's results go to the outbox (_Numbered); the executor's sinks hear nothing."""

    def add(self, result: RowResult) -> None:  # pragma: no cover - _Numbered returns None
        raise AssertionError("a worker's results go to its outbox")

    def resumed(self, count: int) -> None:
        pass


async def _serve(channel: Channel, setup: WorkerSetup) -> None:
    """Answer what the parent at the other end of `channel` hands over, until it says there is no more."""
    os.environ.update(setup.env)
    halt = Halt()
    parent = Parent(channel, setup)
    outbox = Outbox(channel)
    halt.on_stop(lambda: _tell_parent(channel, halt))
    in_flight = None
    if setup.in_flight_start is not None:  # concurrency: auto (without it, a worker sends max_concurrency regardless)
        in_flight = InFlight(Aimd(setup.spec.max_concurrency, start=setup.in_flight_start))
        halt.on_stop(in_flight.wake)
    async with _connected(setup) as (client, pool):
        answerer = LiveAnswerer(
            setup.spec,
            client,
            halt,
            requests=RequestBuilder(setup.spec, server=setup.server),
            retry=setup.retry,
            limits=parent,  # type: ignore[arg-type]  # duck-typed: acquire, rate_limited, cap_reached
            pricing=setup.prices,
            budget=Budget(setup.budget_usd) if setup.budget_usd is not None else None,  # its limit: worst cases
            byok_fee=setup.byok_fee,
            governor=parent,
            on_wait=lambda delta: channel.send(Waiting(delta)),  # the parent's progress line counts them
            pool=pool,
            in_flight=in_flight,
        )
        numbered = _Numbered(answerer, outbox)
        inbox: asyncio.Queue[Batch | None] = asyncio.Queue()
        listening = asyncio.create_task(_listen(channel, parent, halt, inbox, numbered))
        flushing = asyncio.create_task(outbox.every(FLUSH_S))
        try:
            executor = LiveExecutor(setup.spec.most_in_flight, grace_s=setup.grace_s)
            await executor.execute(_batches(inbox), numbered, _NoSinks(), halt)
        except Exception:  # a bug: told to the parent, which raises it (a worker's exit would look like a kill)
            channel.send(Failed(traceback.format_exc()))
        finally:
            flushing.cancel()
            listening.cancel()
            await asyncio.gather(flushing, listening, return_exceptions=True)
        if halt.deferred is not None:
            _send_stop(channel, halt.deferred)
        outbox.flush()
        concurrency = (in_flight.aimd.allowed, in_flight.aimd.reached) if in_flight is not None else None
        channel.send(Finished(pool.stats if pool is not None else {}, concurrency))
    # The parent closes its end once it has read Finished; till then what it sends is read and dropped (a socket
    # closed with unread data in it resets the connection, and the parent would lose our last messages).
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_drain(channel), timeout=FINISH_S)
    await channel.close()


async def _drain(channel: Channel) -> None:
    while await channel.receive() is not None:
        pass


def _tell_parent(channel: Channel, halt: Halt) -> None:
    if halt.stopped is not None:
        _send_stop(channel, halt.stopped)


def _send_stop(channel: Channel, stop: Stop) -> None:
    error = stop.error
    if error is not None:
        try:  # an error that does not survive the trip goes as its sentence alone
            pickle.loads(pickle.dumps(error))
        except Exception:
            error = None
    channel.send(Halted(stop.reason, stop.message, error))


async def _batches(inbox: asyncio.Queue[Batch | None]) -> AsyncIterator[Batch]:
    while (batch := await inbox.get()) is not None:
        yield batch


async def _listen(
    channel: Channel, parent: Parent, halt: Halt, inbox: asyncio.Queue[Batch | None], numbered: _Numbered
) -> None:
    """What the parent says, as it arrives: pairs, answers to questions, the run's stop, the end of the work."""
    giving_up: set[asyncio.Task[None]] = set()
    while True:
        message = await channel.receive()
        if message is None:  # the parent is gone (killed): nothing of ours can be stored; quit at once
            parent.gone()
            os._exit(1)
        if isinstance(message, Granted):
            parent.answered(message)
        elif isinstance(message, Work):
            for number, todo in message.todos:
                numbered.numbers[id(todo)] = number
            inbox.put_nowait(Batch([todo for _, todo in message.todos]))
        elif isinstance(message, Halted):
            halt.stop(message.reason, message.message, message.error)
            inbox.put_nowait(None)
        elif isinstance(message, NoMoreWork):
            inbox.put_nowait(None)
        elif isinstance(message, GiveUp):
            giving_up.add(asyncio.create_task(_give_up(channel, numbered)))


async def _give_up(channel: Channel, numbered: _Numbered) -> None:
    """A second Ctrl-C: the requests on the wire are cancelled (the answerer records each at its worst case, as
    runner._last_words does in one process), and their records go to the parent before GaveUp says so."""
    wire = list(numbered.sending)
    for task in wire:
        task.cancel()
    if wire:
        await asyncio.wait(wire, timeout=GIVE_UP_S)
    numbered.outbox.flush()
    channel.send(GaveUp())


@contextlib.asynccontextmanager
async def _connected(setup: WorkerSetup) -> AsyncIterator[tuple[Any, Pool | None]]:
    """The worker's own client (and pool): to the parent's sandbox, or as the spec says, keys from the env."""
    if setup.sandbox_url is not None:
        spec = setup.spec
        async with client_for(spec, setup.sandbox_url, SANDBOX_KEY, spec.most_in_flight) as client:
            client.sandbox = True
            yield client, None
        return
    async with Connection(setup.spec) as connection:
        clients = connection.endpoint_clients
        yield connection.client, pool_of(setup.spec, clients) if clients else None


# -- the parent's side ----------------------------------------------------------------------------------------


class Hand(Protocol):
    """A worker as its parent holds it, however it was started: a process of this machine (here) or a Ray actor
    (cluster.py). The parent talks to it over its Channel; this is for its end."""

    def alive(self) -> bool: ...

    def kill(self) -> None: ...

    def wait(self, timeout_s: float) -> None:
        """Wait (blocking: off the loop) for the worker to end, `timeout_s` at most."""
        ...

    def ended(self) -> str:
        """How it ended, for the log: "killed by signal 9", "exit code 1"."""
        ...


class Launcher(Protocol):
    """How an executor of this protocol starts its workers: ProcessExecutor (processes here), cluster.RayExecutor."""

    workers: int
    server: str
    grace_s: float
    kind: str  # what its workers are called in the log: "worker processes", "Ray workers"

    sandbox_url: str | None  # a sandbox the parent started, which the workers reach

    def setup_env(self) -> dict[str, str]:
        """The environment a worker needs and may not have (WorkerSetup.env)."""
        ...

    async def launch(self, setup: WorkerSetup) -> tuple[Hand, Channel]:
        """A worker started with `setup`, and the parent's channel to it."""
        ...


class _Process:
    """A worker process of this machine (multiprocessing, spawned)."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process = process

    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout_s: float) -> None:
        self.process.join(timeout_s)

    def ended(self) -> str:
        code = self.process.exitcode
        return f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"


@dataclass
class _Worker:
    number: int  # in the order started (a worker that takes a dead one's place gets a new number)
    part: int  # which share of the concurrency it has (share()): a dead worker's place takes its part
    hand: Hand
    channel: Channel
    room: int  # pairs it may hold at once
    held: dict[int, Todo] = field(default_factory=dict)
    reserved_usd: Decimal = ZERO_USD  # its reservations not yet settled
    answered: int = 0
    ending: bool = False  # told there is no more work: it finishes what it holds
    finished: bool = False  # said it finished, or died
    gave_up: bool = False  # answered GiveUp: the records of its wire are sent
    listening: asyncio.Task[None] | None = None


def _started(process: multiprocessing.process.BaseProcess) -> None:
    """Start a worker without the main script: spawn would import it again in the worker (a script calling
    batchrunner.run() without `if __name__ == "__main__"` would run its top level again in each), and a worker needs
    nothing of it (what it runs, and what it is handed, is batchrunner's)."""
    with _STARTING:  # one start at a time: another would save (and put back) what this one hid
        _start_hidden(process)


_STARTING = threading.Lock()


def _start_hidden(process: multiprocessing.process.BaseProcess) -> None:
    main = sys.modules.get("__main__")
    hidden: dict[str, Any] = {
        name: main.__dict__[name] for name in ("__spec__", "__file__") if main and name in main.__dict__
    }
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        process.start()
    finally:
        if main is not None:
            main.__dict__.update(hidden)


class ProcessExecutor:
    """`workers: N`: the pairs answered in N worker processes; the parent stores, paces and budgets them."""

    def __init__(self, workers: int, *, sandbox_url: str | None, server: str, grace_s: float = 30.0) -> None:
        self.workers = workers
        self.sandbox_url = sandbox_url
        self.server = server
        self.grace_s = grace_s
        self.context = multiprocessing.get_context("spawn")  # no fork of a process with threads and a loop
        self.kind = "worker processes"

    def setup_env(self) -> dict[str, str]:
        return {}  # a worker process inherits the parent's environment

    async def execute(self, work: Iterable[Batch], answerer: Answerer, sinks: ResultSink, halt: Halt) -> Execution:
        return await crew_execute(self, work, answerer, sinks, halt)

    async def launch(self, setup: WorkerSetup) -> tuple[Hand, Channel]:
        ours, theirs = socket.socketpair()
        process = self.context.Process(
            target=worker_main, args=(theirs, setup), name=f"batchrunner-worker-{setup.number}"
        )
        process.daemon = True  # a parent that exits takes its workers along
        await asyncio.get_running_loop().run_in_executor(None, _started, process)
        theirs.close()
        return _Process(process), await Channel.over(ours)


async def crew_execute(
    launcher: Launcher, work: Iterable[Batch], answerer: Answerer, sinks: ResultSink, halt: Halt
) -> Execution:
    """Answer the run's pairs in `launcher.workers` workers it starts, the parent storing, pacing and budgeting."""
    if not isinstance(answerer, LiveAnswerer):
        raise TypeError("workers answer live: they need the run's LiveAnswerer")
    return await _Crew(launcher, answerer, sinks, halt).execute(work)


class _Crew:
    """One execute(): the workers, what each holds, and the questions they ask."""

    def __init__(self, executor: Launcher, answerer: LiveAnswerer, sinks: ResultSink, halt: Halt) -> None:
        self.executor, self.answerer, self.sinks, self.halt = executor, answerer, sinks, halt
        self.crew: dict[int, _Worker] = {}
        self.changed = asyncio.Event()  # a worker has room again, finished or died
        self.again: list[tuple[int, Todo]] = []  # the pairs a dead worker held, handed out first
        self.next_number = 0
        self.tasks: set[asyncio.Task[None]] = set()  # answering the workers' questions
        self.starting = 0  # workers being started
        self.started = 0  # workers started, all told
        self.deaths = 0
        self.handed_again = 0
        self.bug: str | None = None  # the trace of a bug a worker raised (Failed): execute() raises it
        self.over = asyncio.Event()  # execute() is over: no wire left to give up on (on_the_wire)
        self.concurrency: dict[int, tuple[int, int]] = {}  # concurrency: auto, each worker's end (allowed, reached)

    def setup(self, number: int, part: int) -> WorkerSetup:
        answerer, executor = self.answerer, self.executor
        start = None
        if answerer.in_flight is not None:
            start = max(1, answerer.in_flight.aimd.start // executor.workers)
        return WorkerSetup(
            spec=share(answerer.rules.spec, executor.workers, part),
            number=number,
            server=executor.server,
            sandbox_url=executor.sandbox_url,
            retry=answerer.rules.retry,
            prices=answerer.accounts.pricing,
            budget_usd=answerer.accounts.budget.limit_usd if answerer.accounts.budget is not None else None,
            paced=answerer.limits.pacer.rate_rps != float("inf"),
            byok_fee=answerer.accounts.fee_share > 0,
            grace_s=executor.grace_s,
            log_level=logging.getLogger("batchrunner").getEffectiveLevel(),
            in_flight_start=start,
            env=executor.setup_env(),
        )

    async def start(self, part: int) -> None:
        """A worker process with share `part` of the concurrency, listened to from now on."""
        number = self.started
        self.started += 1
        self.starting += 1
        failed: BaseException | None = None
        try:
            setup = self.setup(number, part)
            launching = asyncio.ensure_future(self.executor.launch(setup))
            stopped = asyncio.ensure_future(self.halt.wait())
            try:  # an actor may wait minutes for room on a cluster: a stop (Ctrl-C) meanwhile needs no worker
                await asyncio.wait({launching, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # (cancelled too: the run's work was done by the others first, see finish)
                stopped.cancel()
                if not launching.done():
                    launching.cancel()
                    await asyncio.gather(launching, return_exceptions=True)
            if launching.cancelled():
                return
            hand, channel = launching.result()
        except (WorkerStartFailed, OSError) as exc:
            failed = exc
        except Exception:  # a bug: the run ends on it as on a worker's (execute raises it), not waiting for ever
            if self.bug is None:
                self.bug = traceback.format_exc()
                self.halt.stop(StopReason.INPUT, f"a worker could not be started: {self.bug.strip().splitlines()[-1]}")
            return
        finally:
            self.starting -= 1
        if failed is not None:
            self.unstarted(failed)
            return
        worker = _Worker(number, part, hand, channel, room=setup.spec.most_in_flight * AHEAD)
        self.crew[number] = worker
        worker.listening = asyncio.create_task(self.listen(worker))
        self.changed.set()

    async def execute(self, work: Iterable[Batch]) -> Execution:
        started = time.monotonic()
        resumed = 0
        self.halt.on_stop(self.tell_stop)
        wire = asyncio.create_task(self.on_the_wire())
        self.answerer.sending.add(wire)
        try:
            for part in range(self.executor.workers):  # pairs go to each as it starts (hand_out waits for one)
                self._serve(self.start(part))
            try:
                for batch in work:
                    resumed += count_resumed(batch, self.sinks)
                    await self.hand_out(batch.todo)
                    if self.halt.stopping:
                        break
            except BatchrunnerError as exc:  # the input (or the checkpoint) failed past some row
                self.halt.stop(StopReason.INPUT, first_line(exc))
            await self.finish()
        finally:
            self.answerer.sending.discard(wire)
            self.over.set()
            await asyncio.gather(wire, return_exceptions=True)
            await self.close()
        if self.bug is not None:
            raise WorkerFailed(self.bug)
        self._count_concurrency()
        if self.crew:  # (none started: nothing to say)
            answered = ", ".join(f"{w.answered}" for w in self.crew.values())
            log.info("the %d %s answered %s pairs", len(self.crew), self.executor.kind, answered)
        if self.handed_again:
            log.warning(
                "%d pairs that workers held when they died went to other workers; what was on a dead worker's wire "
                "may have been paid for and was asked again",
                self.handed_again,
            )
        return Execution(resumed, time.monotonic() - started)

    async def on_the_wire(self) -> None:
        """The workers' requests on the wire, as the parent's answerer sees them: a task in its `sending`, which a
        second Ctrl-C cancels (runner._last_words: it then waits a second, commits and quits). Cancelled, it has
        each worker give up on its wire and send back the records (each request at its worst case: it may have
        been billed), and waits for them: without it, what the workers had on the wire was paid for and lost."""
        try:
            await self.over.wait()
        except asyncio.CancelledError:
            for worker in self.alive():
                worker.channel.send(GiveUp())
            deadline = time.monotonic() + GIVE_UP_S + 0.3
            while any(not w.gave_up for w in self.alive()) and (left := deadline - time.monotonic()) > 0:
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), timeout=left)
            raise

    def alive(self) -> list[_Worker]:
        return [worker for worker in self.crew.values() if not worker.finished]

    async def hand_out(self, todos: list[Todo]) -> None:
        """Each pair (what dead workers held first) to the worker holding least for its room, waiting for room."""
        queue = [*self.again, *((self._number(), todo) for todo in todos)]
        self.again = []
        going: dict[int, list[tuple[int, Todo]]] = {}
        at = 0
        while at < len(queue):
            if self.halt.stopping:
                return
            open_ = [w for w in self.alive() if not w.ending and len(w.held) < w.room]
            if not open_:
                self._send(going)
                going = {}
                self.changed.clear()
                await self.changed.wait()
                queue = [*self.again, *queue[at:]]  # a worker that died meanwhile gave back what it held
                self.again, at = [], 0
                continue
            worker = min(open_, key=lambda w: len(w.held) / w.room)
            number, todo = queue[at]
            worker.held[number] = todo
            going.setdefault(worker.number, []).append((number, todo))
            if len(going[worker.number]) >= SEND_AT_ONCE:
                self._send({worker.number: going.pop(worker.number)})
            at += 1
        self._send(going)

    def _number(self) -> int:
        self.next_number += 1
        return self.next_number

    def _send(self, going: dict[int, list[tuple[int, Todo]]]) -> None:
        for number, todos in going.items():
            worker = self.crew[number]
            if not worker.finished:  # (one that died meanwhile gave them back: they are in `again`)
                worker.channel.send(Work(todos))

    async def finish(self) -> None:
        """The input is read: hand out what dead workers gave back, tell each worker to finish what it holds,
        and wait until each has (or died). Once the run stops, a worker has the grace for requests on its wire and
        FINISH_S more to say it finished, then it is killed."""
        deadline: float | None = None
        while True:
            if self.again and not self.halt.stopping:
                await self.hand_out([])
            for worker in self.alive():
                if not worker.ending:
                    worker.ending = True
                    worker.channel.send(NoMoreWork())
            # (a worker still starting is not waited for unless pairs wait for it: close() cancels its start)
            if not self.alive() and not (self.again and not self.halt.stopping):
                return
            if self.halt.stopping and deadline is None:
                deadline = time.monotonic() + self.executor.grace_s + FINISH_S
            if deadline is not None and time.monotonic() > deadline:
                for worker in self.alive():
                    log.warning("worker %d did not finish in time after the stop: killed", worker.number)
                    worker.hand.kill()
                return
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=0.5)

    async def listen(self, worker: _Worker) -> None:
        """One worker's messages, until it finishes or its socket closes."""
        channel = worker.channel
        while (message := await channel.receive()) is not None:
            if isinstance(message, Results):
                for number, result in message.done:
                    worker.held.pop(number, None)
                    if result is not None:
                        worker.answered += 1
                        self.sinks.add(result)
                self.changed.set()
            elif isinstance(message, Reserve):
                self._serve(self._reserve(worker, message))
            elif isinstance(message, Settle):
                worker.reserved_usd -= message.reserved_usd
                self.answerer.settle(message.reserved_usd, message.actual_usd)
            elif isinstance(message, Slot):
                self._serve(self._slot(worker, message))
            elif isinstance(message, SlowDown):
                self.answerer.limits.rate_limited(message.model, upstream=message.upstream)
            elif isinstance(message, Waiting):
                if self.answerer.on_wait is not None:
                    self.answerer.on_wait(message.delta)
            elif isinstance(message, CapReached):
                self.answerer.limits.cap_reached(message.model)
            elif isinstance(message, Halted):
                self.halt.stop(message.reason, message.message, message.error)
            elif isinstance(message, Failed):
                if self.bug is None:
                    self.bug = message.trace
                    self.halt.stop(
                        StopReason.INPUT, f"a worker process failed: {message.trace.strip().splitlines()[-1]}"
                    )
            elif isinstance(message, GaveUp):
                worker.gave_up = True
                self.changed.set()
            elif isinstance(message, Finished):
                self._count_endpoints(message.endpoints)
                if message.concurrency is not None:
                    self.concurrency[worker.number] = message.concurrency
                worker.finished = True
                worker.held = {}  # what it still held when it stopped stays pending, as in one process
                self.changed.set()
                await channel.close()  # the worker waits for this to exit (see _serve)
                return
        # how it ended, for the message: the process ends as its socket closes (waited for off the loop)
        await asyncio.get_running_loop().run_in_executor(None, worker.hand.wait, 1)
        self.died(worker)

    def _serve(self, answering: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(answering)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reserve(self, worker: _Worker, ask: Reserve) -> None:
        """A reservation against the run's budget (the parent's answerer waits for settlements, or stops)."""
        ok = await self.answerer.reserve(ask.worst_usd)
        if ok and worker.finished:  # it died while waiting: nothing of this reservation was spent
            self.answerer.settle(ask.worst_usd, ZERO_USD)
            return
        if ok:
            worker.reserved_usd += ask.worst_usd
        worker.channel.send(Granted(ask.ask, ok))

    async def _slot(self, worker: _Worker, ask: Slot) -> None:
        """`count` slots of the run's rate limit (its own pacing: limits.Limits.acquire), each granted as it
        comes due: slots granted together would be sent together, a burst over the pace."""
        try:
            for _ in range(ask.count):
                await self.answerer.limits.acquire(ask.model)
                worker.channel.send(Granted(ask.ask, True))
        except FreeModelCapReached:
            worker.channel.send(Granted(ask.ask, False))

    def _count_concurrency(self) -> None:
        """concurrency: auto, the workers' in-flight limits added up in the parent's (the summary's line): each
        worker learned its own, the parent's never sent a request."""
        in_flight = self.answerer.in_flight
        if in_flight is not None and self.concurrency:
            in_flight.aimd.limit = float(sum(allowed for allowed, _ in self.concurrency.values()))
            in_flight.aimd.reached = sum(reached for _, reached in self.concurrency.values())

    def _count_endpoints(self, endpoints: dict[str, EndpointStats]) -> None:
        """A worker's requests to each endpoint of a pool, added to the parent's (the summary's lines)."""
        pool = self.answerer.pool
        if pool is None:
            return
        for url, stats in endpoints.items():
            mine = pool.stats.get(url)
            if mine is not None:
                for name in ("requests", "ok", "errors"):
                    setattr(mine, name, getattr(mine, name) + getattr(stats, name))

    def died(self, worker: _Worker) -> None:
        """A worker's socket closed before it finished: what it held is handed out again, what it reserved is
        counted as spent (it may have been, on the wire), and unless the run is stopping a new worker takes its
        part. Workers dying again and again (MAX_DEATHS_PER_WORKER each) stop the run instead."""
        worker.finished = True
        how = worker.hand.ended()
        log.warning("worker %d ended unexpectedly (%s) holding %d pairs", worker.number, how, len(worker.held))
        if worker.reserved_usd:
            self.answerer.settle(worker.reserved_usd, worker.reserved_usd)
            worker.reserved_usd = ZERO_USD
        self.handed_again += len(worker.held)
        self.again.extend(worker.held.items())
        worker.held = {}
        self.deaths += 1
        if self.deaths > MAX_DEATHS_PER_WORKER * self.executor.workers:
            self.halt.stop(
                StopReason.INPUT,
                f"{self.deaths} worker processes ended unexpectedly (the last: {how}); something is killing them "
                "(memory? see the system log); answered rows are kept: rerun to go on",
            )
        elif not self.halt.stopping:
            self._serve(self.start(worker.part))
        self.changed.set()

    def unstarted(self, exc: BaseException) -> None:
        """A worker could not be started (the cluster has no room, or cannot be reached; the system refused a
        process): the run goes on with the others, or, with none left, stops (what is answered is kept)."""
        log.warning("a worker could not be started: %s", first_line(exc))
        if not self.alive() and not self.starting:
            self.halt.stop(
                StopReason.INPUT,
                f"no worker could be started ({first_line(exc)}); answered rows are kept: rerun to go on",
            )
        self.changed.set()

    def tell_stop(self) -> None:
        """The run stops: every worker is told (each lets its requests on the wire land, then finishes)."""
        stop = self.halt.stopped
        if stop is not None:
            for worker in self.alive():
                _send_stop(worker.channel, stop)
        self.changed.set()

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for worker in self.crew.values():
            if worker.listening is not None:
                worker.listening.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker.listening
            await worker.channel.close()
            if worker.hand.alive():
                await asyncio.get_running_loop().run_in_executor(None, worker.hand.wait, 5)
            if worker.hand.alive():
                worker.hand.kill()
