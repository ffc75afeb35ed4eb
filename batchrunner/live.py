"""The live driver of the row flow: each pair answered over HTTP, now, by one task of a worker pool.

The flow (flow.py) decides what the pair takes; this module does what it asks, with what the
run's pairs share: the circuit breaker and the server watch (breaker.py), the rate limit
(limits.py), the budget's reservations (waiting for requests in flight to settle), and the
client. Waiting (a backoff, the breaker, a slot, the budget) ends as soon as the run stops;
only a request on the wire (a task in `sending`) gets the executor's grace.

`answer()` returns the pair's RowResult (a failed row is data, not an exception), or None to
leave it pending without a record (the run stopped, and nothing was paid for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from decimal import Decimal
from typing import Any, Protocol, TypeVar

from batchrunner.accounts import Accounts, Pricer
from batchrunner.adaptive import Aimd
from batchrunner.breaker import Attempt, Breaker, ServerWatch
from batchrunner.client import Client, Completion
from batchrunner.costs import ZERO_USD, Budget, PriceTable
from batchrunner.errors import ApiError, BatchrunnerError, FreeModelCapReached, MediaProblem, first_line
from batchrunner.executor import Execution, count_resumed
from batchrunner.flow import Ask, Done, Halting, RowFlow, Rules, Verdict, Wait
from batchrunner.halt import Halt, StopReason
from batchrunner.limits import Limits, is_free
from batchrunner.pending import Batch, Todo
from batchrunner.pool import Endpoint, NoEndpoint, Pool
from batchrunner.records import ResultSink, RowResult
from batchrunner.request import RequestBuilder
from batchrunner.retries import RetryPolicy
from batchrunner.spec import JobSpec

log = logging.getLogger("batchrunner")
_T = TypeVar("_T")
UNREACHABLE = "unreachable"  # the client's code for a request that never reached the server
OVERLOADED = (429, 503)  # what a server sheds load with: concurrency: auto halves its limit


class _Stopped(Exception):
    """Internal: the run is stopping (or free models are out for the day); leave this pair as the flow says."""


class Settlements:
    """Wakes the pairs waiting for budget whenever a reservation settles (or the run stops)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def notify(self) -> None:
        self.event.set()
        self.event = asyncio.Event()


class InFlight:
    """The requests on the wire, held to an adaptive limit (`concurrency: auto`, adaptive.Aimd): a request waits
    for a place before it is sent, and tells how it went when it is back."""

    def __init__(self, aimd: Aimd) -> None:
        self.aimd = aimd
        self.sending = 0
        self._changed = asyncio.Event()

    async def enter(self, halt: Halt) -> bool:
        """Wait for a place and take it; False (none taken) when the run stops first. The place is taken after the
        last await, so a task cancelled while it waits holds none."""
        while self.sending >= self.aimd.allowed and not halt.stopping:
            await self._changed.wait()
        if halt.stopping:
            return False
        self.sending += 1
        return True

    def leave(self, *, latency_s: float | None = None, overloaded: bool = False) -> None:
        """A request is back: an answer's latency, or an overload (429, 503), teaches the limit."""
        self.sending -= 1
        if overloaded:
            self.aimd.overloaded()
        elif latency_s is not None:
            self.aimd.answered(latency_s)
        self.wake()

    def wake(self) -> None:
        """Let the requests waiting for a place look again (a place freed, the limit changed, the run stopping)."""
        self._changed.set()
        self._changed = asyncio.Event()


class LiveAnswerer:
    """Answers one pair live: `await answerer.answer(todo)`."""

    def __init__(
        self,
        spec: JobSpec,
        client: Client,
        halt: Halt,
        *,
        requests: RequestBuilder | None = None,
        retry: RetryPolicy | None = None,
        limits: Limits | None = None,
        breaker: Breaker | None = None,
        server: ServerWatch | None = None,
        pricing: PriceTable | None = None,
        budget: Budget | None = None,
        on_wait: Callable[[int], None] | None = None,
        byok_fee: bool = False,
        accounts: Accounts | None = None,
        settlements: Settlements | None = None,
        in_flight: InFlight | None = None,
        pool: Pool | None = None,
        governor: Governor | None = None,
    ) -> None:
        requests = requests or RequestBuilder(spec)
        settings = spec.retry
        retry = retry or RetryPolicy(settings.max_attempts, settings.base_delay_s, settings.max_delay_s)
        self.accounts = accounts or Accounts.of(pricing, budget, byok_fee=byok_fee)
        self.rules = Rules(spec, requests, retry, Pricer(spec, requests, self.accounts))
        self.client = client
        self.halt = halt
        self.limits = limits or Limits(float("inf"), free_cap=spec.free_requests_per_day)
        self.breaker = breaker or Breaker()
        self.server = server or ServerWatch(give_up_s=spec.unreachable_timeout_s)
        self.on_wait = on_wait  # +1 when a pair starts waiting to retry, -1 when it stops (progress)
        self.sending: set[asyncio.Task[Any]] = set()  # the tasks whose request is on the wire (a stop's grace)
        self.in_flight = in_flight  # concurrency: auto
        self.pool = pool  # api.endpoints: where each request goes (pool.py); None, the one server of `client`
        self.settlements = settlements or Settlements()
        # The budget held elsewhere (a worker process's parent): reservations and settlements go there, while
        # `budget` is a copy of its limit, for the flow's worst cases and refusals. None: `accounts.budget`.
        self.governor = governor
        if settlements is None:
            halt.on_stop(self.settlements.notify)  # wake pairs waiting for budget
            if in_flight is not None:
                halt.on_stop(in_flight.wake)  # and those waiting for a place on the wire
            if pool is not None:
                halt.on_stop(pool.notify)  # and those waiting for an endpoint

    def sibling(self, spec: JobSpec, requests: RequestBuilder) -> LiveAnswerer:
        """An answerer for another job's requests (a judge's grades) that shares this run's client, halt,
        rate limits, breaker, server watch, prices and budget: one run, one set of limits."""
        sibling = LiveAnswerer(
            spec,
            self.client,
            self.halt,
            requests=requests,
            retry=self.rules.retry,
            limits=self.limits,
            breaker=self.breaker,
            server=self.server,
            on_wait=self.on_wait,
            accounts=self.accounts,
            settlements=self.settlements,
            in_flight=self.in_flight,
            pool=self.pool,
        )
        sibling.sending = self.sending
        return sibling

    # -- one pair ---------------------------------------------------------------------------

    async def answer(self, todo: Todo, flow: RowFlow | None = None) -> RowResult | None:
        """The pair's result; None leaves it pending without a record (nothing was paid for it). `flow` continues
        one another executor started (a batch's pair run live: its bill and its place in the chain kept)."""
        flow = flow or self.rules.flow(todo)
        served: str | None = None  # with a pool: the endpoint that last answered one of this pair's requests
        try:
            while not isinstance(action := flow.next(), Done):
                if self.halt.stopping:
                    flow.stop()
                elif isinstance(action, Wait):
                    if self.pool is not None or not self.breaker.is_open(action.model):  # an open breaker is waited
                        await self._backoff(action.delay_s)  # for on the next ask (a pool's: on its endpoints)
                    flow.waited()
                elif self.pool is None:
                    await self._ask(flow, action)
                else:
                    served = await self._ask_pool(self.pool, flow, action) or served
        except _Stopped:
            flow.stop()
        except asyncio.CancelledError:  # the run gave up on it (a stop, past the grace): keep what it was billed
            flow.stop()
            if flow.bill.attempts == 0:
                raise
        result = flow.result
        if served is not None and result is not None:
            return dataclasses.replace(result, endpoint=served)
        return result

    async def _ask(self, flow: RowFlow, ask: Ask) -> None:
        """One request the flow asks for, under the breaker's verdict on its model."""
        model = ask.model
        with self.breaker.attempt(model) as health:
            if health.skip:
                if flow.circuit_open():
                    return
                failed_probes = self.breaker.failed_probes(model)
                await self._unless_stopped(self.breaker.wait(model))
                flow.probed(self.breaker.failed_probes(model) - failed_probes, self.breaker.last_failure(model))
                return
            verdict = await self._send(flow, ask)
            if verdict is None:
                return
            _tell_breaker(health, verdict)
        self._heed(verdict, model)

    async def _ask_pool(self, pool: Pool, flow: RowFlow, ask: Ask) -> str | None:
        """One request the flow asks for, sent to the pool's least busy endpoint that may take it (pool.py), under
        that endpoint's breaker; the endpoint's URL when the request reached it. The budget's reservation and the
        rate limit's slot come first, so the endpoint is chosen when the request can go at once."""
        model = ask.model
        reserved = await self._reserve(ask.reserve_usd)
        try:
            await self._slot(model)
            taken = None if self.halt.stopping else await pool.take(model, self.halt)
        except BaseException:
            self._settle(reserved, ZERO_USD)
            raise
        if not isinstance(taken, Endpoint):
            self._settle(reserved, ZERO_USD)
            if taken is None:  # the run is stopping
                raise _Stopped
            if taken is NoEndpoint.GONE:
                causes = "; ".join(e.server.cause for e in pool)
                self.halt.stop(
                    StopReason.SERVER_GONE,
                    f"every endpoint has been unreachable for {self.rules.spec.unreachable_timeout_s:g} s ({causes}); "
                    "rows not answered stay pending: rerun once one is back",
                )
                raise _Stopped
            if flow.circuit_open():  # every endpoint's circuit for the model is open: its fallback, if it has one
                return None
            failed_probes = pool.failed_probes(model)
            await self._unless_stopped(pool.wait_circuits(model))
            flow.probed(pool.failed_probes(model) - failed_probes, pool.last_failure(model))
            return None
        try:
            with taken.breaker.attempt(model) as health:
                verdict = await self._exchange(flow, ask, reserved, taken.client, taken.server, taken)
                if verdict is None:
                    return None
                _tell_breaker(health, verdict)
        finally:
            taken.server.release()  # a probe that never reached the endpoint lets another go (else a no-op)
            pool.give_back(taken)
        if verdict.halting is not None and verdict.halting.reason is StopReason.ACCOUNT:  # which server's key
            halting = dataclasses.replace(
                verdict.halting, message=f"{taken.url} (api.endpoints, its api_key_env): {verdict.halting.message}"
            )
            verdict = dataclasses.replace(verdict, halting=halting)
        self._heed(verdict, model)
        return taken.url

    async def _exchange(
        self,
        flow: RowFlow,
        ask: Ask,
        reserved: Decimal,
        client: Client,
        server: ServerWatch,
        endpoint: Endpoint | None = None,
    ) -> Verdict | None:
        """The request on the wire (its reservation made, its slot taken) and what it means, told to the flow: the
        verdict, or None when it never reached the server (not billed, not an attempt: the pair asks again; with
        a pool, elsewhere) or could not be sent. `server` is the server's watch (an endpoint's own, in a pool)."""
        timeout_s = self.rules.spec.timeout_s * (2 if is_free(ask.model) else 1)
        stats = endpoint.stats if endpoint is not None else None
        task = asyncio.current_task()
        if stats is not None:
            stats.requests += 1
        try:
            if task is not None:
                self.sending.add(task)
            try:
                completion = await self._request(client, ask.body, timeout_s)
            finally:
                self.sending.discard(task)
        except ApiError as exc:
            if stats is not None:
                stats.errors += 1
            if exc.code == UNREACHABLE:  # never reached the server: not billed, not the row's fault
                self._settle(reserved, ZERO_USD)
                server.failed(str(exc) if endpoint is None else f"{endpoint.url}: {exc}")
                flow.unreachable(exc)
                return None
            server.answered()
            verdict = flow.failed(exc)
            self._settle(reserved, verdict.cost_usd)
            return verdict
        except asyncio.CancelledError:  # given up on while on the wire: it may have been billed
            if stats is not None:
                stats.errors += 1
            self._settle(reserved, flow.cancelled().cost_usd)
            raise
        except MediaProblem as exc:  # a file changed or vanished since it was fingerprinted: never sent whole
            self._settle(reserved, ZERO_USD)
            flow.unsendable(exc)
            return None
        except BaseException:
            self._settle(reserved, ZERO_USD)
            raise
        if stats is not None:
            stats.ok += 1
        server.answered()
        verdict = flow.answered(completion)
        self._settle(reserved, verdict.cost_usd)
        return verdict

    async def _send(self, flow: RowFlow, ask: Ask) -> Verdict | None:
        """The request, start to end: the server watch, the budget's reservation, the rate limit, the request,
        and what it means (the flow's verdict; None when it never reached the server or could not be sent)."""
        up = self.server.down_since is None  # the common case: no wait, so no tasks to watch it
        if not up and not await self._unless_stopped(self.server.admit()):
            self.halt.stop(
                StopReason.SERVER_GONE,
                f"the server has been unreachable for {self.server.give_up_s:g} s ({self.server.cause}); "
                "rows not answered stay pending: rerun once it is back",
            )
            raise _Stopped
        if up or self.server.down_since is None:
            return await self._reserve_and_send(flow, ask)
        try:  # this request is the server's probe: if it never reaches the server, another must be let go
            return await self._reserve_and_send(flow, ask)
        finally:
            self.server.release()  # (a no-op once the server answered or refused it)

    async def _reserve_and_send(self, flow: RowFlow, ask: Ask) -> Verdict | None:
        """The budget's reservation, a place on the wire (concurrency: auto), the rate limit's slot, the request."""
        reserved = await self._reserve(ask.reserve_usd)
        entered = False
        try:
            if self.in_flight is not None:  # concurrency: auto, a place among the requests on the wire, then its slot
                if not await self.in_flight.enter(self.halt):
                    raise _Stopped
                entered = True
            await self._slot(ask.model)
            if self.halt.stopping:  # the slot came after the stop: nothing goes out now
                raise _Stopped
        except BaseException:
            if entered and self.in_flight is not None:
                self.in_flight.leave()
            self._settle(reserved, ZERO_USD)
            raise
        return await self._exchange(flow, ask, reserved, self.client, self.server)

    async def _request(self, client: Client, body: dict[str, Any], timeout_s: float) -> Completion:
        """The request on the wire; with `concurrency: auto`, its place given back with what it teaches."""
        send = client.chat if self.rules.spec.endpoint != "completions" else client.text_completion
        in_flight = self.in_flight
        if in_flight is None:
            return await send(body, timeout_s=timeout_s)
        try:
            completion = await send(body, timeout_s=timeout_s)
        except ApiError as exc:
            in_flight.leave(overloaded=exc.status in OVERLOADED)
            raise
        except BaseException:
            in_flight.leave()
            raise
        in_flight.leave(latency_s=completion.latency_s)
        return completion

    async def _slot(self, model: str) -> None:
        """The rate limit's next slot. A free model's can be minutes away (the stop ends that wait); any other's
        is a fraction of a second. Free models out for the day stop the run."""
        try:
            await (self._unless_stopped(self.limits.acquire(model)) if is_free(model) else self.limits.acquire(model))
        except FreeModelCapReached as cap:
            self.halt.stop(StopReason.FREE_CAP, str(cap))
            raise _Stopped from cap

    def _heed(self, verdict: Verdict, model: str) -> None:
        """What an attempt means for the whole run: a 429 slows the pace (the run's, or an upstream's model's), a
        fatal error stops the run."""
        if verdict.slow_down is not None:
            self.limits.rate_limited(model, upstream=verdict.slow_down)
        if verdict.halting is not None:
            self._halt(verdict.halting, model)

    def _halt(self, halting: Halting, model: str) -> None:
        if halting.reason is StopReason.FREE_CAP:  # the server's daily cap: free models rest until midnight UTC
            self.halt.stop(StopReason.FREE_CAP, str(self.limits.cap_reached(model)))
        else:
            self.halt.stop(halting.reason, halting.message, halting.error)

    # -- the budget -------------------------------------------------------------------------

    async def reserve(self, worst_usd: Decimal) -> bool:
        """Reserve `worst_usd` against the budget, waiting for requests in flight to settle and free what they
        did not use; False when the run stops instead (the budget is spent with nothing in flight: the run is
        stopped, saying so)."""
        try:
            await self._reserve(worst_usd)
        except _Stopped:
            return False
        return True

    async def _reserve(self, worst_usd: Decimal) -> Decimal:
        if self.governor is not None:
            if not await self.governor.reserve(worst_usd):
                raise _Stopped
            return worst_usd
        budget = self.accounts.budget
        if budget is None:
            return ZERO_USD
        while True:
            settled = self.settlements.event
            if self.halt.stopping:
                raise _Stopped
            if budget.reserve(worst_usd):
                return worst_usd
            if (exhausted := self.accounts.exhausted(worst_usd)) is not None:
                self.halt.stop(StopReason.BUDGET, exhausted)
                raise _Stopped
            await settled.wait()

    def settle(self, reserved_usd: Decimal, actual_usd: Decimal) -> None:
        """Turn a reservation into what was spent, and wake the pairs waiting for budget."""
        self._settle(reserved_usd, actual_usd)

    def _settle(self, reserved_usd: Decimal, actual_usd: Decimal) -> None:
        if self.governor is not None:  # the budget is the governor's; what prices teach is learned here too
            self.accounts.learn(reserved_usd, actual_usd)
            self.governor.settle(reserved_usd, actual_usd)
            return
        if self.accounts.budget is None:
            return
        passed = self.accounts.settle(reserved_usd, actual_usd)
        if passed is not None and not self.halt.stopping:
            self.halt.stop(StopReason.BUDGET, passed)
        self.settlements.notify()

    # -- waiting ----------------------------------------------------------------------------

    async def _backoff(self, delay_s: float) -> None:
        if self.on_wait is not None:
            self.on_wait(+1)
        try:
            await self._unless_stopped(asyncio.sleep(delay_s))
        finally:
            if self.on_wait is not None:
                self.on_wait(-1)

    async def _unless_stopped(self, waiting: Coroutine[Any, Any, _T]) -> _T:
        """Wait for `waiting` (a backoff, a breaker, a slot), but leave the pair as soon as the run stops: only
        requests on the wire get the grace period, pairs merely waiting are released at once."""
        if self.halt.stopping:
            waiting.close()
            raise _Stopped
        task = asyncio.ensure_future(waiting)
        stopped = asyncio.ensure_future(self.halt.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise _Stopped
        return task.result()


def _tell_breaker(health: Attempt, verdict: Verdict) -> None:
    """The breaker hears what the attempt said of the model's health: answered, failed, or nothing."""
    if verdict.healthy is True:
        health.healthy()
    elif verdict.healthy is False:
        health.failed(verdict.why)


class Governor(Protocol):
    """The budget's reservations when another process holds the budget (processes.Parent, in a worker): the
    holder's own LiveAnswerer decides (reserve waits for settlements, or says the run stopped)."""

    async def reserve(self, worst_usd: Decimal) -> bool: ...

    def settle(self, reserved_usd: Decimal, actual_usd: Decimal) -> None: ...


class PairAnswerer(Protocol):
    """What the worker pool needs of an answerer (executor.Answerer has more)."""

    sending: set[asyncio.Task[Any]]

    def answer(self, todo: Todo) -> Awaitable[RowResult | None]: ...


class LiveExecutor:
    """A pool of `concurrency` workers taking pairs from a bounded queue, fed as the input is read.

    Once the run stops, queued pairs are dropped, workers waiting for work leave, and requests
    on the wire get `grace_s` to land (they are paid for); pairs merely waiting (on a backoff,
    a breaker, the server, the rate limit, the budget) are released at once."""

    def __init__(self, concurrency: int, *, grace_s: float = 30.0) -> None:
        self.concurrency = concurrency
        self.grace_s = grace_s

    async def execute(
        self, work: Iterable[Batch] | AsyncIterable[Batch], answerer: PairAnswerer, sinks: ResultSink, halt: Halt
    ) -> Execution:
        started = time.monotonic()
        queue: asyncio.Queue[Todo | None] = asyncio.Queue(maxsize=2 * self.concurrency)
        resumed = 0

        def wake_workers() -> None:  # drop queued work, then one sentinel per worker
            while not queue.empty():
                queue.get_nowait()
            for _ in range(self.concurrency):
                queue.put_nowait(None)

        async def batches() -> AsyncIterator[Batch]:  # what the input gives, or what a parent hands over
            if isinstance(work, AsyncIterable):
                async for batch in work:
                    yield batch
            else:
                for batch in work:
                    yield batch

        async def feed() -> None:
            nonlocal resumed
            try:
                async for batch in batches():
                    resumed += count_resumed(batch, sinks)
                    for todo in batch.todo:
                        if halt.stopping:
                            return
                        await queue.put(todo)
            except BatchrunnerError as exc:  # the input (or the checkpoint) failed past some row: already a sentence
                halt.stop(StopReason.INPUT, first_line(exc))
                return
            except Exception as exc:  # a bug: the run still stops (workers must not wait forever), saying so
                log.debug("preparing the next rows failed", exc_info=exc)
                halt.stop(
                    StopReason.INPUT,
                    f"preparing the next rows failed ({type(exc).__name__}: {first_line(exc)}); this is a bug in "
                    "batchrunner (rerun with -v for its trace, and please report it); answered rows are kept",
                )
                return
            for _ in range(self.concurrency):
                await queue.put(None)

        async def worker() -> None:
            current = asyncio.current_task()
            while not halt.stopping:
                todo = await queue.get()
                if todo is None:
                    return
                result = await answerer.answer(todo)
                if result is not None:
                    sinks.add(result)
                if current is not None and current.cancelling():  # the answerer kept a bill; the cancel stands
                    raise asyncio.CancelledError

        halt.on_stop(wake_workers)
        producer = asyncio.create_task(feed())
        workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        try:
            await self._join(workers, halt, answerer.sending)
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
            for task in workers:
                task.cancel()
            # A worker cancelled mid-request records what that request may have cost (answerer.answer): let it,
            # before the run closes the checkpoint.
            await asyncio.gather(*workers, return_exceptions=True)
        return Execution(resumed, time.monotonic() - started)

    async def _join(self, workers: list[asyncio.Task[None]], halt: Halt, sending: set[asyncio.Task[Any]]) -> None:
        """Wait for the workers; once the run is stopping, give requests on the wire `grace_s` to land, and
        release at once the workers that are only waiting (for a slot, a backoff, the budget): nothing of
        theirs was sent."""
        pending: set[asyncio.Task[Any]] = set(workers)
        stopped = asyncio.create_task(halt.wait())
        try:
            while pending and not halt.stopping:
                done, pending = await asyncio.wait(pending | {stopped}, return_when=asyncio.FIRST_COMPLETED)
                done.discard(stopped)
                pending.discard(stopped)
            waiting = pending - sending
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            pending -= waiting
            if pending:
                _, pending = await asyncio.wait(pending, timeout=self.grace_s)
            if pending:
                log.warning(
                    "gave up on %d requests still in flight after %g s; their rows stay pending",
                    len(pending),
                    self.grace_s,
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            stopped.cancel()
        for task in workers:  # a bug in a worker must not pass silently
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # narrowed by the test just above
