"""The row flow: what one pair (a row, its model chain, a sample) takes, decided in one place. Pure.

The rules of answering a pair are written here once: retries within attempts (with the
server's Retry-After), what the breaker's verdict means for the pair, repairs of invalid
structured answers (the error fed back, twice the room when cut off), refusals, fallbacks,
refusing what cannot fit before it is sent, every attempt's bill, and the one place a
result is made. No asyncio, no HTTP, no clock: a `RowFlow` is given events and says what to
do next (the design of h11: the protocol is a state machine, I/O belongs to its drivers).

A driver loops::

    action = flow.next()
    Ask(model, body, reserve_usd)  -> reserve, send, then flow.answered(...) or flow.failed(...)
                                      (or flow.unreachable / flow.unsendable / flow.cancelled)
    Wait(delay_s)                  -> back off, then flow.waited()   (a batch asks in its next batch)
    Done(result)                   -> the pair's RowResult; None: leave it pending, nothing to record

What is shared across pairs (the breaker, the rate limit, the budget's waiting, dedupe) is the
drivers': the flow says what an attempt means for them in a `Verdict`, and is told the
breaker's verdict (`circuit_open`, `probed`) and when the run stops (`stop`). Drivers: live.py
(one asyncio task per pair), batch.py (the Batch API), and any test that scripts events.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from batchrunner.accounts import Pricer
from batchrunner.costs import ZERO_USD, Charge
from batchrunner.errors import ApiError, FatalApiError, RateLimited, RequestRejected, TransientError
from batchrunner.halt import StopReason
from batchrunner.pending import Todo
from batchrunner.records import Bill, RowResult
from batchrunner.request import RequestBuilder, body_prompt, media_tally
from batchrunner.retries import RetryPolicy
from batchrunner.spec import JobSpec
from batchrunner.structured import InvalidAnswer, Mode, parse_answer

if TYPE_CHECKING:
    from batchrunner.client import Completion

log = logging.getLogger("batchrunner")


# -- what the flow asks of its driver ---------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """Send `body` to `model`, having reserved `reserve_usd` against the budget (0 without one)."""

    model: str
    body: dict[str, Any]
    reserve_usd: Decimal
    has_fallback: bool  # a breaker that skips this model moves the pair on, rather than waiting for it


@dataclass(frozen=True)
class Wait:
    """Back off `delay_s` before asking `model` again (the server's Retry-After when it gave one)."""

    delay_s: float
    model: str


@dataclass(frozen=True)
class Done:
    """The pair is finished: its result, or None to leave it pending without a record (nothing was paid)."""

    result: RowResult | None


Action = Ask | Wait | Done


@dataclass(frozen=True)
class Halting:
    """The run must stop: why, in one sentence (FREE_CAP: the driver's rate limit says until when)."""

    reason: StopReason
    message: str
    error: ApiError | None = None


@dataclass(frozen=True)
class Verdict:
    """What one attempt means beyond its pair, for what the drivers share."""

    cost_usd: Decimal = ZERO_USD  # what it cost: the reservation settles to this
    paid: Charge | None = None  # how that cost is known (a batch compares it with the live price)
    healthy: bool | None = None  # tell the breaker: True it answered, False it failed (`why`); None says nothing
    why: str = ""
    slow_down: bool | None = None  # a 429: True an upstream provider's (slow the model), False OpenRouter's (the run)
    halting: Halting | None = None


@dataclass
class Rules:
    """One job's rules, shared by each of its pairs' flows: the spec, its requests, retries, prices."""

    spec: JobSpec
    requests: RequestBuilder
    retry: RetryPolicy
    pricer: Pricer

    def __post_init__(self) -> None:
        self.mode = Mode.of(self.spec.response_format)

    def flow(self, todo: Todo) -> RowFlow:
        return RowFlow(self, todo)


_OPEN = object()  # the pair is not finished yet


class RowFlow:
    """One pair's state across its models, attempts, repairs and runs."""

    def __init__(self, rules: Rules, todo: Todo) -> None:
        self.rules = rules
        self.todo = todo
        self.request = todo.request
        self.chain = rules.spec.model_chain(todo.request.requested_model)
        self.earlier = todo.earlier or Bill()  # what earlier runs were billed for it (it failed, or they stopped in it)
        self.bill = Bill()  # what this run was billed for it
        self.position = 0  # the model of the chain being asked
        self.tries = 0  # requests on the current model's current body (a repair starts again)
        self.repairs = 0  # invalid structured answers asked again on the current model
        self.body: dict[str, Any] | None = None  # the next request on this model (a repair, once one is due)
        self.delay_s: float | None = None  # a backoff due before the next request
        self.last_error: ApiError | None = None
        self.last_answer: Completion | None = None  # an answer that was refused or invalid, kept for the output
        self.asked: Ask | None = None  # the request in flight
        self._done: Any = _OPEN
        if todo.request.problem is not None:  # its media cannot be sent: failed, unsent
            self._done = self._result(status="failed", error=one_line(todo.request.problem))

    @property
    def model(self) -> str:
        """The model being asked: the requested one, then its fallbacks in turn."""
        return self.chain[self.position]

    @property
    def finished(self) -> bool:
        return self._done is not _OPEN

    @property
    def result(self) -> RowResult | None:
        """A finished pair's result (what `Done` carries): None leaves it pending without a record."""
        assert self._done is not _OPEN, "the pair is not finished"
        result: RowResult | None = self._done
        return result

    # -- the next action -----------------------------------------------------------------------

    def next(self) -> Action:
        """What to do now. Asking again (a retry, a repair, a fallback) is decided by the events before."""
        while True:
            if self._done is not _OPEN:
                return Done(self._done)
            if self.delay_s is not None:
                return Wait(self.delay_s, self.model)
            model = self.model
            if self.body is None:
                self.body = self.rules.requests.body(self.request.prompt, model, self.request.sample)
            pricer = self.rules.pricer
            reserve_usd = pricer.reservation(self.body, model)
            refused = pricer.refusal(self.body, model, reserve_usd)
            if refused is None:
                self.asked = Ask(model, self.body, reserve_usd, has_fallback=self.position + 1 < len(self.chain))
                return self.asked
            self.last_error = refused  # nothing was sent: this model cannot take it, a later one may
            self._give_up()

    # -- events --------------------------------------------------------------------------------

    def waited(self) -> None:
        """The backoff is over (or, in a batch, there is none: the pair goes in the next batch)."""
        self.delay_s = None

    def circuit_open(self) -> bool:
        """The breaker skips the model: with a fallback the pair moves on (True); without one the driver waits
        for the breaker's probes (False), then calls `probed`."""
        if self.position + 1 >= len(self.chain):
            return False
        self.last_error = TransientError(f"{self.model} skipped: it keeps failing (circuit open)", code="circuit_open")
        self._give_up()
        return True

    def probed(self, failed_probes: int, cause: str) -> None:
        """The breaker let this pair ask again after `failed_probes` of other pairs' probes failed: each counts
        as one of this pair's attempts on the model."""
        self.tries += failed_probes
        self.last_error = TransientError(
            f"{self.model} is unavailable: every probe of it failed" + (f" (last: {cause})" if cause else ""),
            code="circuit_open",
        )
        if self.tries >= self.rules.retry.max_attempts:
            self._give_up()

    def sent(self, model: str, reserved_usd: Decimal) -> None:
        """The request at the server for this pair went to `model`: the one this flow asked, or one an earlier run
        asked (a batch it submitted), whose answer is then taken as that model's (its place in the chain)."""
        if self.asked is not None and self.asked.model == model:
            return
        if model in self.chain and self.chain.index(model) != self.position:
            self.position, self.tries, self.repairs, self.body = self.chain.index(model), 0, 0, None
        body = self.body or self.rules.requests.body(self.request.prompt, model, self.request.sample)
        self.asked = Ask(model, body, reserved_usd, has_fallback=self.position + 1 < len(self.chain))

    def unreachable(self, error: ApiError) -> None:
        """The request never reached the server: not billed, not an attempt; ask again (the driver's server watch
        decides how long the run waits for the server)."""
        self.last_error = error
        self.asked = None

    def unsendable(self, problem: Exception) -> None:
        """A file the row names changed or vanished since it was fingerprinted: never sent whole; failed."""
        self.asked = None
        self._done = self._result(status="failed", error=one_line(problem))

    def cancelled(self) -> Verdict:
        """The run gave up on the request while it was on the wire: it may have been billed, so it is counted at
        its estimate, and the pair stays pending with that bill."""
        ask = self._in_flight()
        self.bill.attempts += 1
        self.last_error = TransientError(
            "the run stopped with this request in flight (it may have been billed)", code="abandoned"
        )
        cost_usd = self._estimated(ask)
        self.stop()
        return Verdict(cost_usd)

    def stop(self) -> None:
        """The run stops: a pair that was billed stays pending with its bill, one that was not leaves no record."""
        if self._done is not _OPEN:
            return
        if not self.bill.attempts:
            self._done = None
            return
        why = self.last_error or "the run stopped"  # pragma: no mutate (a billed pair always has an error)
        self._done = self._result(status="pending", error=one_line(why))

    def answered(self, completion: Completion) -> Verdict:
        """An answer to the request asked: billed; then refused, invalid (repaired), or the pair's result."""
        ask = self._in_flight()
        media = media_tally(body_prompt(ask.body))
        self.bill.attempts += 1
        paid = self.rules.pricer.charged(
            completion.usage,
            completion.model or ask.model,
            ask.model,
            completion.generation_id,
            media,
            completion.service_tier,
        )
        self._add(paid, completion.usage.prompt_tokens, completion.usage.completion_tokens)
        verdict = Verdict(paid.cost_usd, paid, healthy=True)
        spec = self.rules.spec
        if completion.refusal and not completion.text and not completion.tool_calls:
            self.last_error = RequestRejected(f"refusal: {completion.refusal}", code="refusal")
            self.last_answer = completion
            self._give_up()
            return verdict
        # a fallback is ours (a later model in the chain) or OpenRouter's (the `models` array)
        fallback_used = self.position > 0 or (spec.server_fallbacks and completion.model in spec.fallbacks)
        parsed = None
        if self.rules.mode.structured:
            try:
                parsed = parse_answer(completion.text, self.rules.mode, finish_reason=completion.finish_reason)
            except InvalidAnswer as exc:
                self._invalid(completion, ask, exc)
                return verdict
        self._done = self._result(
            status="ok",
            parsed=None if parsed is None else json.dumps(parsed, ensure_ascii=False),
            fallback_used=fallback_used,
            **answer_fields(completion),
        )
        return verdict

    def failed(self, error: ApiError) -> Verdict:
        """An error the server (or the client, classifying what it got) gave for the request asked: billed as it
        says, or at the estimate when the reply was abandoned; then retried, handed on, or the run stopped."""
        ask = self._in_flight()
        self.bill.attempts += 1
        self.last_error = error
        paid = None
        if error.abandoned and error.usage is None:
            cost_usd = self._estimated(ask)
        elif error.usage is not None:
            paid = self.rules.pricer.charged(error.usage, ask.model, media=media_tally(body_prompt(ask.body)))
            self._add(paid, error.usage.prompt_tokens, error.usage.completion_tokens)
            cost_usd = paid.cost_usd
        else:
            cost_usd = ZERO_USD
        if isinstance(error, FatalApiError):  # the account's problem, not the pair's: the run stops
            reason = StopReason.FREE_CAP if error.code == "free_daily_cap" else StopReason.ACCOUNT
            self.stop()
            return Verdict(cost_usd, paid, halting=Halting(reason, str(error), error))
        self.tries += 1
        if isinstance(error, RateLimited):  # says nothing of the model's health
            upstream = bool(error.metadata.get("provider_name")) or error.code == "flex_capacity"
            verdict = Verdict(cost_usd, paid, slow_down=upstream)
        elif isinstance(error, TransientError):
            verdict = Verdict(cost_usd, paid, healthy=False, why=str(error))
        else:  # RequestRejected: another model may take it; a 404 is the model's problem
            self._give_up()
            return Verdict(cost_usd, paid, healthy=False if error.status == 404 else None, why=str(error))
        if self.tries < self.rules.retry.max_attempts:
            self.delay_s = self.rules.retry.delay_s(self.tries, error.retry_after_s)
        else:
            self._give_up()
        return verdict

    # -- rules ---------------------------------------------------------------------------------

    def _in_flight(self) -> Ask:
        ask = self.asked
        assert ask is not None, "an answer or an error for a request never asked"  # pragma: no mutate
        self.asked = None
        return ask

    def _estimated(self, ask: Ask) -> Decimal:
        """Bill an attempt whose reply was abandoned at its estimate (Pricer.estimate); what it counts."""
        cost, source = self.rules.pricer.estimate(ask.body, ask.model, ask.reserve_usd)
        self.bill.add(cost, source, 0, 0)
        return cost

    def _add(self, paid: Charge, prompt_tokens: int, completion_tokens: int) -> None:
        self.bill.add(paid.cost_usd, paid.source, prompt_tokens, completion_tokens, paid.upstream_usd)

    def _invalid(self, completion: Completion, ask: Ask, exc: InvalidAnswer) -> None:
        """An answer that does not parse or validate: asked again on the same model, told what was wrong (with
        twice the room if it was cut off), while repairs remain; then the model gave up."""
        self.last_error = RequestRejected(f"invalid structured output: {exc}", code="invalid_output")
        self.last_answer = completion
        log.debug("row %s: %s answered invalid JSON (%s)", self.request.row.id, ask.model, exc)  # pragma: no mutate
        if self.repairs >= self.rules.spec.repair.same_model:
            self._give_up()
            return
        self.repairs += 1
        self.tries = 0  # a new request: its own attempts
        cut_off = completion.finish_reason == "length"
        self.body = self.rules.requests.repaired(ask.body, completion.text, str(exc), cut_off=cut_off)

    def _give_up(self) -> None:
        """This model is done with the pair: its next fallback, else the pair failed (with the answer that was
        refused or invalid, if there was one)."""
        log.debug("row %s: %s gave up: %s", self.request.row.id, self.model, self.last_error)  # pragma: no mutate
        self.delay_s = None
        if self.position + 1 < len(self.chain):
            self.position, self.tries, self.repairs, self.body = self.position + 1, 0, 0, None
            return
        answer = self.last_answer
        self._done = self._result(
            status="failed",
            error=one_line(self.last_error or "no model answered"),  # pragma: no mutate (always set)
            **({} if answer is None else answer_fields(answer, failed=True)),
        )

    def _result(self, **fields: Any) -> RowResult:
        """The one place a RowResult is made: the pair's identity, its whole bill, and `fields`."""
        item, total = self.request, self.earlier.plus(self.bill)
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
            this_run=self.bill,
            **fields,
        )


def answer_fields(completion: Completion, *, failed: bool = False) -> dict[str, Any]:
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


def one_line(error: object) -> str:
    """An error for the output's `error` column: one line, at most 500 characters."""
    return " ".join(str(error).split())[:500]
