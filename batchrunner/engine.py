"""The engine: streams rows, fans (row, model) pairs out over a pool of async workers,
retries and falls back per row, and hands every result to the checkpoint store as it
arrives. Pairs the store already answered (same fingerprint) are skipped.

A failed row is data (a RowResult with status "failed"). Only a FatalApiError (key,
credits, budget, daily cap) or `stop()` ends a run early: dispatch stops, requests in
flight finish and are recorded (they are paid for), and rows not reached stay pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from batchrunner.breaker import Breaker, ServerWatch
from batchrunner.client import Client, Completion
from batchrunner.costs import ZERO_USD, Budget, PriceTable, Usage, format_usd, plugin_allowance_usd
from batchrunner.dataset import Dataset
from batchrunner.errors import ApiError, FatalApiError, RateLimited, RequestRejected, TransientError, first_line
from batchrunner.limits import FreeModelCapReached, Limits, is_free
from batchrunner.progress import Progress
from batchrunner.records import Bill, RowResult, Summary
from batchrunner.request import RequestBuilder, RowRequest, body_prompt, most_prompt_tokens
from batchrunner.retries import RetryPolicy
from batchrunner.spec import JobSpec
from batchrunner.store import Store
from batchrunner.structured import InvalidAnswer, Mode, parse_answer

log = logging.getLogger("batchrunner")
_T = TypeVar("_T")
UNREACHABLE = "unreachable"  # the client's code for a request that never reached the server


@dataclass
class RunReport:
    summary: Summary
    total: int  # (row, model) pairs the run set out to do
    wall_s: float
    halted: str | None = None  # why the run stopped early, if it did
    halt_error: ApiError | None = None
    results: list[RowResult] = field(default_factory=list)  # only with keep_results
    deferred: str | None = None  # why some rows were left for a later run (a free-model daily cap)
    resumed: int = 0  # pairs already answered by an earlier run, for the spec as it is now

    @property
    def pending(self) -> int:
        return self.total - self.resumed - self.summary.done


class _Halt(Exception):
    """Internal: the run is stopping; leave this row pending."""


@dataclass
class _RowState:
    """What happened to one row so far, across its models and attempts."""

    earlier: Bill  # what earlier runs were billed for this row (it failed, or they stopped in it)
    bill: Bill = field(default_factory=Bill)  # what this run was billed for it
    last_error: ApiError | None = None
    last_answer: Completion | None = None  # an answer that was refused or invalid, kept for the output

    @property
    def total(self) -> Bill:
        return self.earlier.plus(self.bill)


class Engine:
    def __init__(
        self,
        spec: JobSpec,
        client: Client,
        *,
        retry: RetryPolicy | None = None,
        limits: Limits | None = None,
        breaker: Breaker | None = None,
        server: ServerWatch | None = None,
        progress: Progress | None = None,
        store: Store | None = None,
        pricing: PriceTable | None = None,
        budget: Budget | None = None,
        requests: RequestBuilder | None = None,
        keep_results: bool = False,
        grace_s: float = 30.0,
    ) -> None:
        self.spec = spec
        self.client = client
        settings = spec.retry
        self.retry = retry or RetryPolicy(settings.max_attempts, settings.base_delay_s, settings.max_delay_s)
        self.limits = limits or Limits(float("inf"), free_cap=spec.free_requests_per_day)
        self.breaker = breaker or Breaker()
        self.server = server or ServerWatch(give_up_s=spec.unreachable_timeout_s)
        self.deferred: str | None = None
        self.grace_s = grace_s  # how long requests in flight may finish once the run stops
        self._stopped = asyncio.Event()
        self.progress = progress
        self.store = store
        self.pricing = pricing or PriceTable([])
        self.budget = budget
        self.keep_results = keep_results
        self.requests = requests or RequestBuilder(spec)
        self.mode = Mode.of(spec.response_format)
        self._halt_reason: str | None = None
        self._halt_error: ApiError | None = None
        self._queue: asyncio.Queue[RowRequest | None] | None = None
        self._earlier: dict[tuple[str, str, str], Bill] = {}  # bills of rows earlier runs did not finish
        self._settled = asyncio.Event()  # set (and replaced) whenever a reservation settles

    # -- control --------------------------------------------------------------------------

    def stop(self, reason: str, error: ApiError | None = None) -> None:
        """Stop dispatching: requests in flight finish, rows not started stay pending."""
        if self._halt_reason is not None:
            return
        self._halt_reason, self._halt_error = reason, error
        self._stopped.set()
        self._settled.set()  # wake rows waiting for budget to settle
        log.warning("stopping: %s", reason)
        queue = self._queue
        if queue is not None:  # wake idle workers: drop queued work, then one sentinel per worker
            while not queue.empty():
                queue.get_nowait()
            for _ in range(self.spec.concurrency):
                queue.put_nowait(None)

    @property
    def stopping(self) -> bool:
        return self._halt_reason is not None

    # -- the run --------------------------------------------------------------------------

    async def run(self, dataset: Dataset, *, limit: int | None = None) -> RunReport:
        started = time.monotonic()
        rows = dataset.rows if limit is None else min(limit, dataset.rows)
        total = rows * len(self.spec.models)
        summary = Summary()
        results: list[RowResult] = []
        workers_n = self.spec.concurrency
        queue: asyncio.Queue[RowRequest | None] = asyncio.Queue(maxsize=2 * workers_n)
        self._queue = queue

        resumed = 0

        async def produce() -> None:
            try:
                await feed()
            except Exception as exc:  # the input is unreadable past some row: stop, keep what was answered
                self.stop(
                    f"reading {dataset.path.name} failed after {read} rows: {first_line(exc)}; fix the input and rerun"
                )

        read = 0

        async def feed() -> None:
            nonlocal resumed, read
            for batch in dataset.batches(limit=limit, batch_size=8192):
                read += len(batch)
                # What the checkpoint already holds an answer for, with the same fingerprint, is skipped.
                ids = [row.id for row in batch]
                answered = self.store.answered(ids) if self.store is not None else set()
                if self.store is not None:
                    self._earlier.update(self.store.unfinished_bills(ids))
                items = [item for item in self.requests.for_rows(batch) if item.key not in answered]
                skipped = len(batch) * len(self.spec.models) - len(items)
                resumed += skipped
                if self.progress is not None and skipped:
                    self.progress.resumed(skipped)
                for item in items:
                    if self.stopping:
                        return
                    await queue.put(item)
            for _ in range(workers_n):
                await queue.put(None)

        async def work() -> None:
            while not self.stopping:
                item = await queue.get()
                if item is None:
                    return
                result = await self._process(item)
                if result is None:
                    continue
                summary.add(result)
                if self.keep_results:
                    results.append(result)
                if self.progress is not None:
                    self.progress.finished(result)
                if self.store is not None:
                    self.store.add(result)

        producer = asyncio.create_task(produce())
        workers = [asyncio.create_task(work()) for _ in range(workers_n)]
        try:
            await self._join(workers)
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
            for worker in workers:
                worker.cancel()
            self._queue = None
        wall_s = time.monotonic() - started
        return RunReport(summary, total, wall_s, self._halt_reason, self._halt_error, results, self.deferred, resumed)

    async def _join(self, workers: list[asyncio.Task[None]]) -> None:
        """Wait for the workers; once the run is stopping, give requests in flight `grace_s` to land."""
        pending: set[asyncio.Task[Any]] = set(workers)
        stopped = asyncio.create_task(self._stopped.wait())
        try:
            while pending and not self.stopping:
                done, pending = await asyncio.wait(pending | {stopped}, return_when=asyncio.FIRST_COMPLETED)
                done.discard(stopped)
                pending.discard(stopped)
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

    async def _send(self, body: dict[str, Any], model: str) -> Completion:
        timeout_s = self.spec.timeout_s * (2 if is_free(model) else 1)
        if self.spec.endpoint == "completions":
            return await self.client.text_completion(body, timeout_s=timeout_s)
        return await self.client.chat(body, timeout_s=timeout_s)

    def _defer(self, model: str, cap: FreeModelCapReached) -> None:
        """Leave this row for a later run: the free-model cap is not the row's fault."""
        self.breaker.release(model)
        self.deferred = str(cap)

    async def _process(self, item: RowRequest) -> RowResult | None:
        """Answer one (row, model); None leaves the row pending without a record (nothing was paid).

        A row the run stopped in the middle of, after paying for attempts, is recorded as
        `pending` with its bill: the next run asks again, starting from that bill."""
        row = _RowState(earlier=self._earlier.pop(item.key, Bill()))
        try:
            return await self._answer(item, row)
        except _Halt:
            if not row.bill.attempts:
                return None
            return self._result(item, row, status="pending", error=_one_line(row.last_error or "the run stopped"))

    async def _answer(self, item: RowRequest, row: _RowState) -> RowResult:
        """Retries on the model, then its fallbacks, in order.

        For structured jobs an answer must also parse and validate; an invalid one is
        repaired (the model is told what was wrong, given more room if it was cut off), then
        handed to the fallbacks. Raises _Halt to leave the row pending (the run is stopping,
        or free models are capped for the day); every other outcome is a RowResult.
        """
        chain = self.spec.model_chain(item.requested_model)
        for position, model in enumerate(chain):
            body = self.requests.body(item.prompt, model)
            for repair in range(self.spec.repair.same_model + 1):
                completion = await self._attempt(model, body, row, has_fallback=position + 1 < len(chain))
                if completion is None:
                    break  # this model gave up: its fallbacks are next
                if completion.refusal and not completion.text and not completion.tool_calls:
                    row.last_error = RequestRejected(f"refusal: {completion.refusal}", code="refusal")
                    row.last_answer = completion
                    break
                if not self.mode.structured:
                    return self._ok(
                        item, completion, row, parsed=None, fallback_used=self._by_fallback(position, completion)
                    )
                try:
                    parsed = parse_answer(completion.text, self.mode, finish_reason=completion.finish_reason)
                except InvalidAnswer as exc:
                    row.last_error = RequestRejected(f"invalid structured output: {exc}", code="invalid_output")
                    row.last_answer = completion
                    log.debug("row %s: %s answered invalid JSON (%s); repair %d", item.row.id, model, exc, repair + 1)
                    cut_off = completion.finish_reason == "length"
                    body = self.requests.repaired(body, completion.text, str(exc), cut_off=cut_off)
                    continue
                return self._ok(
                    item, completion, row, parsed=parsed, fallback_used=self._by_fallback(position, completion)
                )
            log.debug("row %s: %s gave up: %s", item.row.id, model, row.last_error)
        return self._failed(item, row)

    async def _attempt(
        self, model: str, body: dict[str, Any], row: _RowState, *, has_fallback: bool
    ) -> Completion | None:
        """Send `body` to `model` until it answers or its attempts run out (None)."""
        tries = 0
        while tries < self.retry.max_attempts:
            if self.stopping:
                raise _Halt
            decision = self.breaker.decide(model)
            if decision == "skip":
                if has_fallback:
                    row.last_error = TransientError(
                        f"{model} skipped: it keeps failing (circuit open)", code="circuit_open"
                    )
                    return None
                failed_probes = self.breaker.failed_probes(model)
                await self._unless_stopped(self.breaker.wait(model))
                tries += self.breaker.failed_probes(model) - failed_probes
                cause = self.breaker.last_failure(model)
                row.last_error = TransientError(
                    f"{model} is unavailable: every probe of it failed" + (f" (last: {cause})" if cause else ""),
                    code="circuit_open",
                )
                continue
            if not await self._unless_stopped(self.server.admit()):
                self.breaker.release(model)
                self.stop(
                    f"the server has been unreachable for {self.server.give_up_s:g} s ({self.server.cause}); "
                    "rows not answered stay pending: rerun once it is back"
                )
                raise _Halt
            reserved = await self._reserve(body, model)
            try:
                # A free model's slot can be minutes away; any other's is a fraction of a second.
                await (
                    self._unless_stopped(self.limits.acquire(model)) if is_free(model) else self.limits.acquire(model)
                )
            except FreeModelCapReached as cap:
                self._settle(reserved, ZERO_USD)
                self._defer(model, cap)
                raise _Halt from cap
            try:
                completion = await self._send(body, model)
            except ApiError as exc:
                if exc.code == UNREACHABLE:  # never reached the server: not billed, not the row's or model's fault
                    self._settle(reserved, ZERO_USD)
                    self.breaker.release(model)
                    self.server.failed(str(exc))
                    row.last_error = exc
                    continue
                self.server.answered()
                tries += 1
                row.bill.attempts += 1
                self._settle(reserved, self._charge(row.bill, exc.usage, model))
                row.last_error = exc
                if isinstance(exc, FatalApiError):
                    if exc.code == "free_daily_cap":
                        self._defer(model, self.limits.cap_reached(model))
                    else:
                        self.breaker.release(model)
                        self.stop(str(exc), exc)
                    raise _Halt from exc
                if isinstance(exc, TransientError):
                    if isinstance(exc, RateLimited):
                        self.breaker.release(model)
                        self.limits.rate_limited(model, upstream=bool(exc.metadata.get("provider_name")))
                    else:
                        self.breaker.record(model, ok=False, failure=str(exc))
                    if tries < self.retry.max_attempts and not self.breaker.is_open(model):
                        await self._backoff(tries, exc)
                    continue
                if exc.status == 404:  # RequestRejected: no endpoints is the model's problem, not the row's
                    self.breaker.record(model, ok=False, failure=str(exc))
                else:
                    self.breaker.release(model)
                return None
            self.server.answered()
            tries += 1
            row.bill.attempts += 1
            self._settle(
                reserved,
                self._charge(row.bill, completion.usage, completion.model or model, model, completion.generation_id),
            )
            self.breaker.record(model, ok=True)
            return completion
        return None

    def _by_fallback(self, position: int, completion: Completion) -> bool:
        """Answered by a fallback: ours (a later model in the chain) or OpenRouter's (`models` array)."""
        return position > 0 or (self.spec.server_fallbacks and completion.model in self.spec.fallbacks)

    def _charge(
        self,
        bill: Bill,
        usage: Usage | None,
        model: str,
        requested: str | None = None,
        generation_id: str | None = None,
    ) -> Decimal:
        """Add one attempt's cost and tokens to the row's bill: reported, else computed from prices, else unknown.

        A reported cost is not used when it is not believable: negative or not a number
        (the client set it aside), or far above what the model's prices allow for the
        tokens (ten times the worst case, plus what plugins such as web search may add)."""
        if usage is None:  # no answer, no charge
            return ZERO_USD
        pricing = self.pricing.get(model) or self.pricing.get(requested or model)
        reported, rejected = usage.cost_usd, usage.cost_rejected
        if reported is not None and pricing is not None:
            ceiling = 10 * pricing.worst_case_usd(usage.prompt_tokens, usage.completion_tokens) + self._allowance(
                requested or model
            )
            if reported > ceiling:
                reported, rejected = None, f"usage.cost {reported} is far above what {model}'s prices allow"
        if rejected is not None:
            log.warning(
                "%s (generation %s): the cost is %s instead",
                rejected,
                generation_id or "unknown",
                "computed from prices" if pricing else "unknown",
            )
        if reported is not None:
            cost, source = reported, "reported"
        elif pricing is not None:
            cost, source = pricing.cost_usd(usage), "computed"
        else:
            cost, source = ZERO_USD, "unknown"
        bill.add(cost, source, usage.prompt_tokens, usage.completion_tokens)
        return cost

    def _allowance(self, model: str) -> Decimal:
        """What a request may cost beyond its tokens (web search results)."""
        return plugin_allowance_usd(self.spec.params.get("plugins"), model)

    async def _reserve(self, body: dict[str, Any], model: str) -> Decimal:
        """Reserve this request's worst case (its own prompt and max_tokens, repairs included) against the budget.

        When it does not fit, wait for requests in flight to settle and free what they did
        not use; stop the run only when nothing is in flight and it still does not fit."""
        if self.budget is None:
            return ZERO_USD
        # With server-side fallbacks OpenRouter may answer with any model of the chain: reserve the dearest.
        candidates = self.spec.model_chain(model) if self.spec.server_fallbacks else [model]
        prompt_tokens = most_prompt_tokens(body_prompt(body))
        worst = max(
            self.pricing[m].worst_case_usd(prompt_tokens, self.requests.max_completion_tokens(self.pricing[m], body))
            + self._allowance(m)
            for m in candidates
        )
        budget = self.budget
        while True:
            settled = self._settled
            if self.stopping:
                raise _Halt
            if budget.reserve(worst):
                return worst
            if budget.reserved_usd <= 0:
                self.stop(
                    f"budget of {format_usd(budget.limit_usd)} reached: {format_usd(budget.spent_usd)} spent, "
                    f"and the next request could cost up to {format_usd(worst)}"
                )
                raise _Halt
            await settled.wait()

    async def _unless_stopped(self, waiting: Coroutine[Any, Any, _T]) -> _T:
        """Wait for `waiting` (a backoff, a breaker, a slot), but leave the row pending as soon as the run
        stops: only requests on the wire get the grace period, rows merely waiting are released at once."""
        if self.stopping:
            waiting.close()
            raise _Halt
        task = asyncio.ensure_future(waiting)
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise _Halt
        return task.result()

    def _settle(self, reserved: Decimal, actual: Decimal) -> None:
        if self.budget is not None:
            self.budget.settle(reserved, actual)
            self._settled.set()
            self._settled = asyncio.Event()

    async def _backoff(self, attempt: int, error: TransientError) -> None:
        delay = self.retry.delay_s(attempt, error.retry_after_s)
        if self.progress is not None:
            self.progress.retry(+1)
        try:
            await self._unless_stopped(asyncio.sleep(delay))
        finally:
            if self.progress is not None:
                self.progress.retry(-1)

    @staticmethod
    def _result(item: RowRequest, row: _RowState, **fields: Any) -> RowResult:
        total = row.total
        return RowResult(
            row_index=item.row.index,
            row_id=item.row.id,
            model_position=item.model_position,
            requested_model=item.requested_model,
            fingerprint=item.fingerprint,
            cost_usd=total.cost_usd,
            cost_source=total.source,
            billed_prompt_tokens=total.prompt_tokens,
            billed_completion_tokens=total.completion_tokens,
            attempts=total.attempts,
            this_run=row.bill,
            **fields,
        )

    def _ok(
        self, item: RowRequest, completion: Completion, row: _RowState, *, parsed: Any, fallback_used: bool
    ) -> RowResult:
        return self._result(
            item,
            row,
            status="ok",
            response=completion.text,
            parsed=None if parsed is None else json.dumps(parsed, ensure_ascii=False),
            fallback_used=fallback_used,
            **self._answer_fields(completion),
        )

    def _failed(self, item: RowRequest, row: _RowState) -> RowResult:
        """A row no model answered usably; an invalid or refused answer keeps its text and tokens."""
        answer = row.last_answer
        return self._result(
            item,
            row,
            status="failed",
            error=_one_line(row.last_error or "no model answered"),
            response=None if answer is None else (answer.text or answer.refusal),
            **({} if answer is None else self._answer_fields(answer)),
        )

    @staticmethod
    def _answer_fields(completion: Completion) -> dict[str, Any]:
        usage = completion.usage
        return {
            "model": completion.model or None,
            "finish_reason": completion.finish_reason,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "latency_s": round(completion.latency_s, 4),
            "generation_id": completion.generation_id,
            "provider": completion.provider,
            "tool_calls": json.dumps(completion.tool_calls, ensure_ascii=False) if completion.tool_calls else None,
        }


def _one_line(error: object) -> str:
    """An error for the output's `error` column: one line, at most 500 characters."""
    return " ".join(str(error).split())[:500]
