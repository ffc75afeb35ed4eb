"""The row policy: how one (row, model) pair is answered, whoever schedules it.

Retries with backoff on the same model, the circuit breaker, the server watch, fallbacks,
repairs of invalid structured answers, the budget's reservations and every attempt's bill
live here, and nowhere else. An executor (executor.py for the live worker pool; the Batch
API's will be another) decides when `answer()` runs; the policy decides what one answer
takes, and returns it as a RowResult: a failed row is data, not an exception.

`answer()` returns None to leave a pair pending without a record (the run is stopping, and
nothing was paid for it), or a `pending` RowResult when attempts were already paid for:
the checkpoint keeps that bill, and the next run starts from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from batchrunner.breaker import Breaker, ServerWatch
from batchrunner.client import Client, Completion
from batchrunner.costs import (
    BYOK_FEE_SHARE,
    FILE_PARSER_USD_PER_PAGE,
    ZERO_USD,
    Budget,
    Charge,
    PriceTable,
    Usage,
    charge,
    format_usd,
    plugin_allowance_usd,
    saving_usd,
    tier_of,
)
from batchrunner.errors import (
    ApiError,
    FatalApiError,
    FreeModelCapReached,
    MediaProblem,
    RateLimited,
    RequestRejected,
    TransientError,
)
from batchrunner.halt import Halt, StopReason
from batchrunner.limits import Limits, is_free
from batchrunner.pending import Todo
from batchrunner.records import Bill, RowResult
from batchrunner.request import (
    MOST_BYTES_PER_TOKEN,
    NO_MEDIA,
    PROMPT_FIELDS,
    MediaTally,
    RequestBuilder,
    RowRequest,
    body_prompt,
    choices,
    least_prompt_tokens,
    media_tally,
    most_field_tokens,
    most_text_tokens,
)
from batchrunner.retries import RetryPolicy
from batchrunner.spec import JobSpec
from batchrunner.structured import InvalidAnswer, Mode, parse_answer

log = logging.getLogger("batchrunner")
_T = TypeVar("_T")
UNREACHABLE = "unreachable"  # the client's code for a request that never reached the server


class _Stopped(Exception):
    """Internal: the run is stopping (or free models are out for the day); leave this pair pending."""


@dataclass
class RowState:
    """What happened to one pair so far, across its models and attempts."""

    earlier: Bill  # what earlier runs were billed for it (it failed, or they stopped in it)
    bill: Bill = field(default_factory=Bill)  # what this run was billed for it
    last_error: ApiError | None = None
    last_answer: Completion | None = None  # an answer that was refused or invalid, kept for the output
    repairs: int = 0  # invalid structured answers asked again on the current model (batches)
    position: int = 0  # the model of the chain being asked (batches: fallbacks are later batches)
    tries: int = 0  # requests on the current model (batches)
    repaired: dict[str, Any] | None = None  # the next request on this model, told what was wrong (batches)

    @property
    def total(self) -> Bill:
        return self.earlier.plus(self.bill)


class RowPolicy:
    """Answers one (row, model) pair: `await policy.answer(todo)`."""

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
    ) -> None:
        self.spec = spec
        self.client = client
        self.halt = halt
        self.requests = requests or RequestBuilder(spec)
        settings = spec.retry
        self.retry = retry or RetryPolicy(settings.max_attempts, settings.base_delay_s, settings.max_delay_s)
        self.limits = limits or Limits(float("inf"), free_cap=spec.free_requests_per_day)
        self.breaker = breaker or Breaker()
        self.server = server or ServerWatch(give_up_s=spec.unreachable_timeout_s)
        self.pricing = pricing or PriceTable([])
        self.budget = budget
        self.on_wait = on_wait  # +1 when a pair starts waiting to retry, -1 when it stops (progress)
        self.mode = Mode.of(spec.response_format)
        self._settled = asyncio.Event()  # set (and replaced) whenever a reservation settles
        self.saved_usd = ZERO_USD  # batches: what their answers would have cost more at live prices
        self.sending: set[asyncio.Task[Any]] = set()  # the tasks whose request is on the wire (a stop's grace)
        self.underpriced = Decimal(1)  # how many times its worst case a request cost, at most: reservations scale
        # The share of a request's worst case OpenRouter's BYOK fee may add: reserved from the first request where
        # the server may bill BYOK (OpenRouter), else from the first BYOK answer on.
        self.fee_share = BYOK_FEE_SHARE if byok_fee else ZERO_USD
        self._fee_said = byok_fee  # the fee in reservations is told once, when it is learned from an answer
        self._tiers_said: set[str] = set()  # models already warned of answers served at a tier not asked for
        halt.on_stop(self._settled.set)  # wake pairs waiting for budget

    def sibling(self, spec: JobSpec, requests: RequestBuilder) -> RowPolicy:
        """A policy for another job's requests (a judge's grades) that shares this run's client, halt,
        rate limits, breaker, server watch, prices and budget: one run, one set of limits."""
        return RowPolicy(
            spec,
            self.client,
            self.halt,
            requests=requests,
            retry=self.retry,
            limits=self.limits,
            breaker=self.breaker,
            server=self.server,
            pricing=self.pricing,
            budget=self.budget,
            on_wait=self.on_wait,
            byok_fee=bool(self.fee_share),
        )

    # -- one pair ---------------------------------------------------------------------------

    def refused(self, todo: Todo) -> RowResult | None:
        """The failed result of a pair whose row cannot be sent (its media), asking nothing; None if it can."""
        if todo.request.problem is None:
            return None
        return self._result(todo.request, self.begin(todo), status="failed", error=_one_line(todo.request.problem))

    async def answer(self, todo: Todo) -> RowResult | None:
        """The pair's result; None leaves it pending without a record (nothing was paid for it)."""
        if (refused := self.refused(todo)) is not None:
            return refused
        row = self.begin(todo)
        try:
            return await self._answer(todo.request, row)
        except MediaProblem as exc:  # a file changed or vanished since it was fingerprinted: never sent whole
            return self._result(todo.request, row, status="failed", error=_one_line(exc))
        except _Stopped:
            if not row.bill.attempts:
                return None
            return self._result(
                todo.request, row, status="pending", error=_one_line(row.last_error or "the run stopped")
            )
        except asyncio.CancelledError:  # the run gave up on it (a stop, past the grace): keep what it was billed
            if not row.bill.attempts:
                raise
            return self._result(
                todo.request, row, status="pending", error=_one_line(row.last_error or "the run stopped")
            )

    async def _answer(self, item: RowRequest, row: RowState) -> RowResult:
        """Retries on the model, then its fallbacks, in order. For structured jobs an answer must also
        parse and validate; an invalid one is repaired (the model is told what was wrong, given more
        room if it was cut off), then handed to the fallbacks."""
        chain = self.spec.model_chain(item.requested_model)
        for position, model in enumerate(chain):
            body = self.requests.body(item.prompt, model, item.sample)
            for repair in range(self.spec.repair.same_model + 1):
                completion = await self._on_model(model, body, row, has_fallback=position + 1 < len(chain))
                if completion is None:
                    break  # this model gave up: its fallbacks are next
                if completion.refusal and not completion.text and not completion.tool_calls:
                    row.last_error = RequestRejected(f"refusal: {completion.refusal}", code="refusal")
                    row.last_answer = completion
                    break
                fallback_used = position > 0 or (
                    self.spec.server_fallbacks and completion.model in self.spec.fallbacks
                )  # ours (a later model in the chain), or OpenRouter's (the `models` array)
                if not self.mode.structured:
                    return self._ok(item, completion, row, parsed=None, fallback_used=fallback_used)
                try:
                    parsed = parse_answer(completion.text, self.mode, finish_reason=completion.finish_reason)
                except InvalidAnswer as exc:
                    row.last_error = RequestRejected(f"invalid structured output: {exc}", code="invalid_output")
                    row.last_answer = completion
                    log.debug("row %s: %s answered invalid JSON (%s); repair %d", item.row.id, model, exc, repair + 1)
                    cut_off = completion.finish_reason == "length"
                    body = self.requests.repaired(body, completion.text, str(exc), cut_off=cut_off)
                    continue
                return self._ok(item, completion, row, parsed=parsed, fallback_used=fallback_used)
            log.debug("row %s: %s gave up: %s", item.row.id, model, row.last_error)
        return self._result(
            item,
            row,
            status="failed",
            error=_one_line(row.last_error or "no model answered"),
            **({} if row.last_answer is None else _answer_fields(row.last_answer, failed=True)),
        )

    async def _on_model(
        self, model: str, body: dict[str, Any], row: RowState, *, has_fallback: bool
    ) -> Completion | None:
        """Send `body` to `model` until it answers or its attempts run out (None)."""
        tries = 0
        while tries < self.retry.max_attempts:
            if self.halt.stopping:
                raise _Stopped
            retry_after: TransientError | None = None
            with self.breaker.attempt(model) as health:
                if health.skip:
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
                try:
                    completion = await self._send(model, body, row)
                except ApiError as exc:
                    if exc.code == UNREACHABLE:  # never reached the server: not billed, not the row's fault
                        continue
                    tries += 1
                    if isinstance(exc, RateLimited):  # says nothing of the model's health
                        upstream = bool(exc.metadata.get("provider_name")) or exc.code == "flex_capacity"
                        self.limits.rate_limited(model, upstream=upstream)
                        retry_after = exc
                    elif isinstance(exc, TransientError):
                        health.failed(str(exc))
                        retry_after = exc
                    else:  # RequestRejected: another model may take it; a 404 is the model's problem
                        if exc.status == 404:
                            health.failed(str(exc))
                        return None
                else:
                    health.healthy()
                    return completion
            if tries < self.retry.max_attempts and not self.breaker.is_open(model):
                await self._backoff(tries, retry_after)
        return None

    async def _send(self, model: str, body: dict[str, Any], row: RowState) -> Completion:
        """One request, start to end: the server watch, the budget's reservation, the rate limit,
        the request, and its bill. Raises the ApiError the client classified (a fatal one, having
        stopped the run)."""
        up = self.server.down_since is None  # the common case: no wait, so no tasks to watch it
        if not up and not await self._unless_stopped(self.server.admit()):
            self.halt.stop(
                StopReason.SERVER_GONE,
                f"the server has been unreachable for {self.server.give_up_s:g} s ({self.server.cause}); "
                "rows not answered stay pending: rerun once it is back",
            )
            raise _Stopped
        self._check_context(body, model, row)
        reserved = await self._reserve(body, model, row)
        try:
            # A free model's slot can be minutes away; any other's is a fraction of a second.
            await (self._unless_stopped(self.limits.acquire(model)) if is_free(model) else self.limits.acquire(model))
        except FreeModelCapReached as cap:
            self._settle(reserved, ZERO_USD)
            self.halt.stop(StopReason.FREE_CAP, str(cap))
            raise _Stopped from cap
        except BaseException:
            self._settle(reserved, ZERO_USD)
            raise
        timeout_s = self.spec.timeout_s * (2 if is_free(model) else 1)
        if self.halt.stopping:  # the slot came after the stop: nothing goes out now
            self._settle(reserved, ZERO_USD)
            raise _Stopped
        task = asyncio.current_task()
        try:
            if task is not None:
                self.sending.add(task)
            try:
                if self.spec.endpoint == "completions":
                    completion = await self.client.text_completion(body, timeout_s=timeout_s)
                else:
                    completion = await self.client.chat(body, timeout_s=timeout_s)
            finally:
                self.sending.discard(task)
        except ApiError as exc:
            if exc.code == UNREACHABLE:
                self._settle(reserved, ZERO_USD)
                self.server.failed(str(exc))
                row.last_error = exc
                raise
            self.server.answered()
            row.bill.attempts += 1
            row.last_error = exc
            if exc.abandoned and exc.usage is None:
                self._settle(reserved, self._estimate(row.bill, body, model, reserved))
            else:
                self._settle(reserved, self._charge(row.bill, exc.usage, model, media=media_tally(body_prompt(body))))
            if isinstance(exc, FatalApiError):
                if exc.code == "free_daily_cap":
                    self.halt.stop(StopReason.FREE_CAP, str(self.limits.cap_reached(model)))
                else:
                    self.halt.stop(StopReason.ACCOUNT, str(exc), exc)
                raise _Stopped from exc
            raise
        except asyncio.CancelledError:  # given up on while on the wire: it may have been billed
            row.bill.attempts += 1
            row.last_error = TransientError(
                "the run stopped with this request in flight (it may have been billed)",
                code="abandoned",
                abandoned=True,
            )
            self._settle(reserved, self._estimate(row.bill, body, model, reserved))
            raise
        except BaseException:
            self._settle(reserved, ZERO_USD)
            raise
        self.server.answered()
        row.bill.attempts += 1
        self._settle(
            reserved,
            self._charge(
                row.bill,
                completion.usage,
                completion.model or model,
                model,
                completion.generation_id,
                media=media_tally(body_prompt(body)),
                tier=completion.service_tier,
            ),
        )
        return completion

    # -- for executors that send many requests at once (the Batch API) ---------------------

    def begin(self, todo: Todo) -> RowState:
        """A pair's state across the batches it takes, starting from what earlier runs were billed."""
        return RowState(earlier=todo.earlier or Bill())

    def model_of(self, todo: Todo, row: RowState) -> str:
        """The model a pair is being asked of: its requested model, then its fallbacks in turn."""
        return self.spec.model_chain(todo.request.requested_model)[row.position]

    def body(self, todo: Todo, row: RowState | None = None) -> dict[str, Any]:
        """The request body of a pair on the model it is being asked of (a repair, once one is due)."""
        if row is not None and row.repaired is not None:
            return dict(row.repaired)
        model = todo.request.requested_model if row is None else self.model_of(todo, row)
        return self.requests.body(todo.request.prompt, model, todo.request.sample)

    def _next_model(self, todo: Todo, row: RowState) -> bool:
        """Move a pair on to its next fallback; False when it has none left."""
        if row.position + 1 >= len(self.spec.model_chain(todo.request.requested_model)):
            return False
        row.position, row.tries, row.repairs, row.repaired = row.position + 1, 0, 0, None
        return True

    async def reserve(self, body: dict[str, Any], model: str) -> Decimal | None:
        """Reserve one request's worst case against the budget, waiting for settlements; None when the run
        stops (the budget is spent with nothing in flight: the run is stopped, saying so)."""
        try:
            return await self._reserve(body, model)
        except _Stopped:
            return None

    def try_reserve(self, body: dict[str, Any], model: str) -> Decimal | None:
        """Reserve one request's worst case if it fits now; None if it does not (nothing is waited for:
        a batch's reservations settle only when it is collected)."""
        if self.budget is None:
            return ZERO_USD
        worst = self._worst_case(body, model)
        return worst if self.budget.reserve(worst) else None

    def settle(self, reserved: Decimal, actual: Decimal) -> None:
        self._settle(reserved, actual)

    def take(self, todo: Todo, row: RowState, answer: Completion | ApiError) -> tuple[RowResult | None, Decimal]:
        """One answer collected from a batch: the pair's result, or None to ask it again in a later batch
        (a transient error within its attempts, an invalid structured answer within its repairs, or its
        next fallback); and what the answer cost. The same classification, bill and rules as live."""
        item, model = todo.request, self.model_of(todo, row)
        row.bill.attempts += 1
        row.tries += 1
        if isinstance(answer, ApiError):
            cost = self._charge(row.bill, answer.usage, model, media=media_tally(item.prompt))
            row.last_error = answer
            if isinstance(answer, FatalApiError):
                self.halt.stop(StopReason.ACCOUNT, str(answer), answer)
                return None, cost
            if isinstance(answer, TransientError) and row.tries < self.retry.max_attempts:
                return None, cost
            return self._done_with_model(todo, row), cost
        paid = self._charged(answer.usage, answer.model or model, model, answer.generation_id, media_tally(item.prompt))
        cost = self._bill(row.bill, answer.usage, paid)
        pricing = self.pricing.get(answer.model or model) or self.pricing.get(model)
        if pricing is not None:  # what the same answer costs live: the batch discount, for the summary
            self.saved_usd += saving_usd(pricing.cost_usd(answer.usage), paid)
        if answer.refusal and not answer.text and not answer.tool_calls:
            row.last_error = RequestRejected(f"refusal: {answer.refusal}", code="refusal")
            row.last_answer = answer
            return self._done_with_model(todo, row), cost
        if not self.mode.structured:
            return self._ok(item, answer, row, parsed=None, fallback_used=row.position > 0), cost
        try:
            parsed = parse_answer(answer.text, self.mode, finish_reason=answer.finish_reason)
        except InvalidAnswer as exc:
            row.last_error = RequestRejected(f"invalid structured output: {exc}", code="invalid_output")
            row.last_answer = answer
            if row.repairs < self.spec.repair.same_model:
                row.repairs += 1
                cut_off = answer.finish_reason == "length"
                row.repaired = self.requests.repaired(self.body(todo, row), answer.text, str(exc), cut_off=cut_off)
                return None, cost
            return self._done_with_model(todo, row), cost
        return self._ok(item, answer, row, parsed=parsed, fallback_used=row.position > 0), cost

    def _done_with_model(self, todo: Todo, row: RowState) -> RowResult | None:
        """This model gave up on the pair: its next fallback (None: ask again), else the pair failed."""
        if self._next_model(todo, row):
            return None
        answer = row.last_answer
        return self._result(
            todo.request,
            row,
            status="failed",
            error=_one_line(row.last_error or "no model answered"),
            **({} if answer is None else _answer_fields(answer, failed=True)),
        )

    # -- money ------------------------------------------------------------------------------

    def _charge(
        self,
        bill: Bill,
        usage: Usage | None,
        model: str,
        requested: str | None = None,
        generation_id: str | None = None,
        *,
        media: MediaTally | None = None,
        tier: str | None = None,
    ) -> Decimal:
        """Add one attempt's cost and tokens to the row's bill (see `_charged`); what it cost, whole."""
        if usage is None:  # no answer, no charge
            return ZERO_USD
        return self._bill(bill, usage, self._charged(usage, model, requested, generation_id, media, tier))

    def _charged(
        self,
        usage: Usage,
        model: str,
        requested: str | None = None,
        generation_id: str | None = None,
        media: MediaTally | None = None,
        tier: str | None = None,
    ) -> Charge:
        """One answer's cost: reported, else computed from prices, else unknown (costs.charge). With BYOK it is
        OpenRouter's fee and the provider's upstream cost together; an answer served at a tier (flex) is priced
        at that tier's endpoint price when it must be computed.

        A reported cost is not used when it is not believable: negative or not a number
        (the client set it aside), or far above what the model's prices allow for the
        tokens (ten times the worst case, plus what plugins such as web search may add; the
        whole of a BYOK answer's cost is judged, not the fee alone)."""
        pricing = self.pricing.get(model) or self.pricing.get(requested or model)
        media = media or NO_MEDIA
        ceiling = None
        if pricing is not None:
            ceiling = 10 * pricing.worst_case_usd(
                usage.prompt_tokens, usage.completion_tokens, images=media.images
            ) + self._allowance(requested or model, media)
        served = self.pricing.tier(model, tier or "") or self.pricing.tier(requested or model, tier or "")
        paid = charge(usage, served or pricing, ceiling_usd=ceiling, images=media.images)
        if paid.rejected is not None:
            log.warning(
                "%s: %s (generation %s): the cost is %s instead",
                model,
                paid.rejected,
                generation_id or "unknown",
                "computed from prices" if pricing else "unknown",
            )
        if usage.is_byok and self.fee_share < BYOK_FEE_SHARE:
            self.fee_share = BYOK_FEE_SHARE
        if usage.is_byok and self.budget is not None and not self._fee_said:
            self._fee_said = True
            log.warning(
                "%s answered through your own provider key (BYOK): each request now reserves its worst case plus "
                "OpenRouter's fee (%s%%) against the budget",
                model,
                f"{BYOK_FEE_SHARE * 100:g}",
            )
        self._say_tier(requested or model, tier)
        return paid

    @staticmethod
    def _bill(bill: Bill, usage: Usage, paid: Charge) -> Decimal:
        bill.add(paid.cost_usd, paid.source, usage.prompt_tokens, usage.completion_tokens, paid.upstream_usd)
        return paid.cost_usd

    def _say_tier(self, model: str, tier: str | None) -> None:
        """Warn once a model when an answer was served at another tier than the job asked (params.service_tier):
        flex asked, and the standard tier served it at its price, is never silent."""
        asked = self.spec.params.get("service_tier")
        if asked is None or tier is None or tier_of(tier) == tier_of(asked) or model in self._tiers_said:
            return
        self._tiers_said.add(model)
        log.warning(
            "params.service_tier %s: %s answered at the %s tier, billed at its price (service_tier column)",
            asked,
            model,
            tier,
        )

    def _estimate(self, bill: Bill, body: dict[str, Any], model: str, reserved: Decimal) -> Decimal:
        """Charge an attempt whose reply was abandoned (a timeout, a cap, a stop) at its worst case, marked
        as estimated: the server may have billed it, and counting too much is safer than counting nothing."""
        worst = reserved if self.budget is not None else self._worst_case_if_priced(body, model)
        if worst is None:
            bill.add(ZERO_USD, "unknown", 0, 0)
            return ZERO_USD
        bill.add(worst, "estimated", 0, 0)
        return worst

    def _worst_case_if_priced(self, body: dict[str, Any], model: str) -> Decimal | None:
        try:
            return self._worst_case(body, model)
        except KeyError:  # a model without prices
            return None

    def _check_context(self, body: dict[str, Any], model: str, row: RowState) -> None:
        """Refuse, unsent, a prompt that even its fewest possible tokens would not fit in the model's context
        (unless OpenRouter's middle-out transform is asked to make it fit)."""
        pricing = self.pricing.get(model)
        if pricing is None or not pricing.context_length or _middle_out(body):
            return
        if most_text_tokens(body_prompt(body)) <= pricing.context_length and not any(f in body for f in PROMPT_FIELDS):
            return  # even its most tokens fit: the common case, no closer count needed
        least = least_prompt_tokens(body_prompt(body)) + (most_field_tokens(body) // MOST_BYTES_PER_TOKEN)
        if least > pricing.context_length:
            row.last_error = RequestRejected(
                f"the prompt is at least {least:,} tokens, more than {model}'s context of {pricing.context_length:,} "
                "(nothing was sent): shorten it, or ask for params.transforms: [middle-out]",
                code="context_length",
            )
            raise row.last_error

    def _allowance(self, model: str, media: MediaTally | None = None) -> Decimal:
        """What a request may cost beyond its tokens: web search results, and parsing its PDFs' pages."""
        pages = media.most_pages() if media is not None else 0
        return plugin_allowance_usd(self.spec.params.get("plugins"), model) + pages * FILE_PARSER_USD_PER_PAGE

    async def _reserve(self, body: dict[str, Any], model: str, row: RowState | None = None) -> Decimal:
        """Reserve this request's worst case (its own prompt and max_tokens, repairs included) against the budget.

        When it does not fit, wait for requests in flight to settle and free what they did
        not use; stop the run only when nothing is in flight and it still does not fit. A request
        whose worst case is more than the whole budget can never go: its row fails, unsent."""
        if self.budget is None:
            return ZERO_USD
        worst = self._worst_case(body, model)
        budget = self.budget
        if worst > budget.limit_usd and row is not None:
            row.last_error = RequestRejected(
                f"this request could cost up to {format_usd(worst)}, more than the whole budget of "
                f"{format_usd(budget.limit_usd)} (nothing was sent): shorten the prompt or lower max_tokens",
                code="over_budget",
            )
            raise row.last_error
        while True:
            settled = self._settled
            if self.halt.stopping:
                raise _Stopped
            if budget.reserve(worst):
                return worst
            if budget.reserved_usd <= 0:
                self.halt.stop(
                    StopReason.BUDGET,
                    f"budget of {format_usd(budget.limit_usd)} reached: {format_usd(budget.spent_usd)} spent, "
                    f"and the next request could cost up to {format_usd(worst)}",
                )
                raise _Stopped
            await settled.wait()

    def _worst_case(self, body: dict[str, Any], model: str) -> Decimal:
        """The most one request can cost: its prompt, its max_tokens, and what plugins may add, at the dearer of
        the standard tier's prices and those of the tier it asks (a flex request without a flex endpoint is served
        at the standard ones; a priority one costs more), with OpenRouter's BYOK fee on top where it may be billed
        (fee_share). With server-side fallbacks OpenRouter may answer with any model of the chain: the dearest."""
        candidates = self.spec.model_chain(model) if self.spec.server_fallbacks else [model]
        prompt = body_prompt(body)
        text_tokens, media = most_text_tokens(prompt) + most_field_tokens(body), media_tally(prompt)
        fitted = _middle_out(body)  # OpenRouter cuts the prompt to the context: it bills no more than that
        worst = []
        for name in candidates:
            pricing = self.pricing[name]
            context = pricing.context_length
            # Servers bill the prompt they were sent, longer than the context or not: the text is never capped.
            # What media adds is a guess; a provider resizes images and pages to what the model takes.
            tokens = text_tokens + min(media.most_tokens(), context or media.most_tokens())
            if fitted and context:
                tokens = min(tokens, context)
            completion = self.requests.max_completion_tokens(pricing, body) * choices(body)
            tiered = self.pricing.tier(name, body.get("service_tier") or "")  # a dearer tier (priority) is its own
            for listed in (pricing, *([tiered] if tiered is not None else [])):
                worst.append(
                    listed.worst_case_usd(tokens, completion, images=media.images) + self._allowance(name, media)
                )
        return max(worst) * (1 + self.fee_share) * self.underpriced

    def _settle(self, reserved: Decimal, actual: Decimal) -> None:
        """Turn a reservation into what was spent. A request that cost more than its worst case means the prices
        it was reserved at are too low (a stale `prices:` entry, a provider dearer than listed): later requests
        reserve that many times more, and once the budget is passed the run stops, saying why."""
        if self.budget is None:
            return
        budget = self.budget
        budget.settle(reserved, actual)
        if actual > reserved > 0:
            ratio = actual / reserved
            if ratio > self.underpriced:
                self.underpriced = ratio
                log.warning(
                    "a request cost %s, %.1f times its worst case at the model's prices: they are too low (a stale "
                    "prices: entry?); later requests reserve that many times more",
                    format_usd(actual),
                    ratio,
                )
            if budget.spent_usd + budget.reserved_usd > budget.limit_usd and not self.halt.stopping:
                self.halt.stop(
                    StopReason.BUDGET,
                    f"budget of {format_usd(budget.limit_usd)} passed: {format_usd(budget.spent_usd)} spent, as "
                    f"requests cost up to {ratio:.1f} times what the model's prices allow; check its prices",
                )
        self._settled.set()
        self._settled = asyncio.Event()

    # -- waiting ----------------------------------------------------------------------------

    async def _backoff(self, attempt: int, error: TransientError | None) -> None:
        delay = self.retry.delay_s(attempt, error.retry_after_s if error else None)
        if self.on_wait is not None:
            self.on_wait(+1)
        try:
            await self._unless_stopped(asyncio.sleep(delay))
        finally:
            if self.on_wait is not None:
                self.on_wait(-1)

    async def _unless_stopped(self, waiting: Coroutine[Any, Any, _T]) -> _T:
        """Wait for `waiting` (a backoff, a breaker, a slot), but leave the pair pending as soon as the run
        stops: only requests on the wire get the grace period, pairs merely waiting are released at once."""
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

    # -- results ----------------------------------------------------------------------------

    @staticmethod
    def _result(item: RowRequest, row: RowState, **fields: Any) -> RowResult:
        """The one place a RowResult is made: the pair's identity, its whole bill, and `fields`."""
        total = row.total
        return RowResult(
            row_index=item.row.index,
            row_id=item.row.id,
            model_position=item.model_position,
            requested_model=item.requested_model,
            fingerprint=item.fingerprint,
            cost_usd=total.cost_usd,
            upstream_cost_usd=total.upstream_usd,
            cost_source=total.source,
            billed_prompt_tokens=total.prompt_tokens,
            billed_completion_tokens=total.completion_tokens,
            attempts=total.attempts,
            this_run=row.bill,
            **fields,
        )

    def _ok(
        self, item: RowRequest, completion: Completion, row: RowState, *, parsed: Any, fallback_used: bool
    ) -> RowResult:
        return self._result(
            item,
            row,
            status="ok",
            parsed=None if parsed is None else json.dumps(parsed, ensure_ascii=False),
            fallback_used=fallback_used,
            **_answer_fields(completion),
        )


def _answer_fields(completion: Completion, *, failed: bool = False) -> dict[str, Any]:
    """The columns an answer fills; a failed row keeps its refused or invalid answer's text."""
    usage = completion.usage
    return {
        "response": (completion.text or completion.refusal) if failed else completion.text,
        "model": completion.model or None,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "latency_s": round(completion.latency_s, 4),
        "ttft_s": None if completion.ttft_s is None else round(completion.ttft_s, 4),
        "generation_id": completion.generation_id,
        "provider": completion.provider,
        "service_tier": completion.service_tier,
        "tool_calls": json.dumps(completion.tool_calls, ensure_ascii=False) if completion.tool_calls else None,
    }


def _middle_out(body: dict[str, Any]) -> bool:
    """Whether the request asks OpenRouter to cut its prompt to fit the context (transforms: [middle-out])."""
    transforms = body.get("transforms")
    return isinstance(transforms, list) and "middle-out" in transforms


def _one_line(error: object) -> str:
    """An error for the output's `error` column: one line, at most 500 characters."""
    return " ".join(str(error).split())[:500]
