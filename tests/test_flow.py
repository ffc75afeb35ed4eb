"""The row flow alone: a table of scripted scenarios, no sandbox, no event loop, no clock.

Each row of SCENARIOS is a job's settings, what happens to each request the flow asks for, in
order, and what the pair must end as. `drive` is the smallest driver there is: it does what the
flow asks, answering each Ask with the next scripted event. A new rule is a change to flow.py
and a row here.

The trace records what the flow asked, in order: a model's name for each request, `wait N` for
each backoff, `M skipped` when the breaker skipped M.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest

from batchrunner.accounts import Accounts, Pricer
from batchrunner.client import Completion
from batchrunner.costs import Budget, PriceTable, Usage
from batchrunner.dataset import Row
from batchrunner.errors import (
    ApiError,
    FatalApiError,
    MediaProblem,
    RateLimited,
    RequestRejected,
    TransientError,
)
from batchrunner.flow import Ask, Done, RowFlow, Rules, Verdict, Wait
from batchrunner.halt import StopReason
from batchrunner.pending import Todo
from batchrunner.records import Bill, RowResult
from batchrunner.request import RequestBuilder
from batchrunner.retries import RetryPolicy
from batchrunner.spec import JobSpec

A, F = "a/model", "f/fallback"
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "label",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"label": {"type": "string"}},
            "required": ["label"],
            "additionalProperties": False,
        },
    },
}
PRICES = [
    {"id": m, "pricing": {"prompt": "0.000001", "completion": "0.000004"}, "context_length": 2000} for m in (A, F)
]


# -- events -------------------------------------------------------------------------------------


def ok(text: str = "fine", *, model: str = "", finish: str = "stop", refusal: str | None = None) -> Completion:
    usage = Usage(10, 5, cost_usd=Decimal("0.00003"))  # what the prices say
    return Completion(text, model, finish, usage, "gen-1", "P", 0.1, refusal=refusal)


def e503(retry_after_s: float | None = None, **more: Any) -> TransientError:
    return TransientError("HTTP 503: overloaded", status=503, code="upstream", retry_after_s=retry_after_s, **more)


E429 = RateLimited("HTTP 429: slow down", status=429, code="rate_limited")
E429_UPSTREAM = RateLimited("HTTP 429", status=429, code="rate_limited", metadata={"provider_name": "P"})
E400 = RequestRejected("HTTP 400: bad request", status=400, code="bad_request")
E404 = RequestRejected("HTTP 404: no such model", status=404, code="not_found")
E401 = FatalApiError("HTTP 401: key revoked", status=401, code="unauthorized")
FREE_CAP = FatalApiError("HTTP 429: free models per day", status=429, code="free_daily_cap")
UNREACHABLE = TransientError("connection refused", code="unreachable")
TIMED_OUT = TransientError("timed out", code="timeout", abandoned=True)
BILLED_ERROR = TransientError(
    "HTTP 502: cut off", status=502, code="upstream", usage=Usage(10, 3, cost_usd=Decimal("0.000022"))
)
VALID = ok('{"label": "x"}')
INVALID = ok('{"label": 3}')
CUT_OFF = ok('{"label": "x', finish="length")


@dataclass(frozen=True)
class Open:
    """The breaker skips the model; without a fallback the pair waits while `probes` other probes fail."""

    probes: int = 0


STOP, CANCEL, VANISH = "stop", "cancel", "vanish"


# -- the driver ---------------------------------------------------------------------------------


@dataclass
class Drove:
    result: RowResult | None
    trace: list[str]
    verdicts: list[Verdict]
    asks: list[Ask]
    flow: RowFlow


def drive(flow: RowFlow, script: list[Any]) -> Drove:
    """Do what the flow asks, answering each request with the next scripted event, until it is done."""
    trace: list[str] = []
    verdicts: list[Verdict] = []
    asks: list[Ask] = []
    events = iter(script)
    for _ in range(100):
        action = flow.next()
        if isinstance(action, Done):
            assert next(events, None) is None, "the flow finished before the script did"
            return Drove(action.result, trace, verdicts, asks, flow)
        if isinstance(action, Wait):
            trace.append(f"wait {action.delay_s:g}")
            flow.waited()
            continue
        event = next(events)
        asks.append(action)
        trace.append(action.model)
        if isinstance(event, Open):
            trace[-1] += " skipped"
            if not flow.circuit_open():
                flow.probed(event.probes, "down")
        elif isinstance(event, Completion):
            verdicts.append(flow.answered(event))
        elif isinstance(event, ApiError) and event.code == "unreachable":
            flow.unreachable(event)
        elif isinstance(event, ApiError):
            verdicts.append(flow.failed(event))
        elif event == STOP:
            flow.stop()
        elif event == CANCEL:
            verdicts.append(flow.cancelled())
        elif event == VANISH:
            flow.unsendable(MediaProblem("photo.png changed since it was read"))
    raise AssertionError("the flow never finished")


def make_flow(
    settings: dict[str, Any] | None = None,
    *,
    budget_usd: str | None = None,
    earlier: Bill | None = None,
    problem: str | None = None,
    prompt: str = "classify this",
    sample: int = 0,
    accounts: Accounts | None = None,
) -> RowFlow:
    fields: dict[str, Any] = {
        "name": "t",
        "input": "in.csv",
        "output": "out.csv",
        "models": [A],
        "prompt": prompt,
        "params": {"max_tokens": 100},
        **(settings or {}),
    }
    spec = JobSpec.model_validate(fields)
    requests = RequestBuilder(spec)
    accounts = accounts or Accounts.of(PriceTable(PRICES), None if budget_usd is None else Budget(Decimal(budget_usd)))
    rules = Rules(spec, requests, RetryPolicy(3, 0.0, 0.0), Pricer(spec, requests, accounts))
    (request, *_) = [r for r in requests.for_rows([Row(0, "r0", {})]) if r.sample == sample]
    if problem is not None:
        request = dataclasses.replace(request, problem=problem)
    return rules.flow(Todo(request, earlier))


# -- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    script: list[Any]
    status: str | None  # None: no record (left pending, nothing paid)
    trace: list[str]
    attempts: int = 0
    error: str = ""  # the result's error column contains this
    settings: dict[str, Any] = field(default_factory=dict)
    check: Callable[[Drove], None] | None = None
    options: dict[str, Any] = field(default_factory=dict)


WITH_FALLBACK = {"fallbacks": [F]}
STRUCTURED = {"response_format": SCHEMA, "repair": {"same_model": 1}}


def _verdict(index: int, **expected: Any) -> Callable[[Drove], None]:
    def check(drove: Drove) -> None:
        verdict = drove.verdicts[index]
        for name, value in expected.items():
            assert getattr(verdict, name) == value, (name, getattr(verdict, name))

    return check


def _result(**expected: Any) -> Callable[[Drove], None]:
    def check(drove: Drove) -> None:
        assert drove.result is not None
        for name, value in expected.items():
            assert getattr(drove.result, name) == value, (name, getattr(drove.result, name))

    return check


def _repair_told_what_was_wrong(drove: Drove) -> None:
    first, second = drove.asks
    assert len(second.body["messages"]) == len(first.body["messages"]) + 2
    assert second.body["messages"][-2] == {"role": "assistant", "content": '{"label": 3}'}
    assert second.body["max_tokens"] == first.body["max_tokens"] == 100


def _cut_off_gets_twice_the_room(drove: Drove) -> None:
    first, second = drove.asks
    assert second.body["max_tokens"] == 2 * first.body["max_tokens"]
    assert second.reserve_usd > first.reserve_usd > 0, "the repair reserves its own, larger, worst case"


def _seeded(drove: Drove) -> None:
    assert drove.asks[0].body["seed"] == 8, "sample 1 of a job with seed 7 sends seed 8"


SCENARIOS = [
    Scenario("answered at once", [ok()], "ok", [A], 1, check=_result(response="fine", fallback_used=False)),
    Scenario("a 503 is retried after a backoff", [e503(), ok()], "ok", [A, "wait 0", A], 2),
    Scenario("Retry-After is the backoff", [e503(retry_after_s=7), ok()], "ok", [A, "wait 7", A], 2),
    Scenario(
        "OpenRouter's 429 slows the run, not the model's health",
        [E429, ok()],
        "ok",
        [A, "wait 0", A],
        2,
        check=_verdict(0, slow_down=False, healthy=None),
    ),
    Scenario(
        "a provider's 429 slows only its model",
        [E429_UPSTREAM, ok()],
        "ok",
        [A, "wait 0", A],
        2,
        check=_verdict(0, slow_down=True),
    ),
    Scenario(
        "a transient error counts against the model's health",
        [e503(), ok()],
        "ok",
        [A, "wait 0", A],
        2,
        check=_verdict(0, healthy=False),
    ),
    Scenario(
        "transient errors to the last attempt fail the pair",
        [e503(), e503(), e503()],
        "failed",
        [A, "wait 0", A, "wait 0", A],
        3,
        "overloaded",
    ),
    Scenario(
        "transient errors to the last attempt hand the pair to its fallback",
        [e503(), e503(), e503(), ok(model=F)],
        "ok",
        [A, "wait 0", A, "wait 0", A, F],
        4,
        settings=WITH_FALLBACK,
        check=_result(fallback_used=True, model=F),
    ),
    Scenario("a rejected request is not retried", [E400], "failed", [A], 1, "bad request"),
    Scenario(
        "a rejected request goes to the fallback at once",
        [E400, ok(model=F)],
        "ok",
        [A, F],
        2,
        settings=WITH_FALLBACK,
        check=_verdict(0, healthy=None),
    ),
    Scenario(
        "a 404 is the model's problem: its health hears of it",
        [E404, ok(model=F)],
        "ok",
        [A, F],
        2,
        settings=WITH_FALLBACK,
        check=_verdict(0, healthy=False),
    ),
    Scenario(
        "a revoked key stops the run; the pair stays pending with its bill",
        [E401],
        "pending",
        [A],
        1,
        "key revoked",
        check=lambda d: _halted(d, StopReason.ACCOUNT),
    ),
    Scenario(
        "the free models' daily cap stops the run as FREE_CAP",
        [FREE_CAP],
        "pending",
        [A],
        1,
        check=lambda d: _halted(d, StopReason.FREE_CAP),
    ),
    Scenario(
        "a request that never reached the server is not an attempt and not waited for",
        [UNREACHABLE, ok()],
        "ok",
        [A, A],
        1,
    ),
    Scenario(
        "a refusal goes to the fallback",
        [ok("", refusal="I cannot"), ok(model=F)],
        "ok",
        [A, F],
        2,
        settings=WITH_FALLBACK,
    ),
    Scenario(
        "a refusal with no fallback fails, keeping the refusal's text",
        [ok("", refusal="I cannot")],
        "failed",
        [A],
        1,
        "refusal: I cannot",
        check=_result(response="I cannot"),
    ),
    Scenario(
        "an invalid structured answer is repaired, told what was wrong",
        [INVALID, VALID],
        "ok",
        [A, A],
        2,
        settings=STRUCTURED,
        check=lambda d: (_repair_told_what_was_wrong(d), _result(parsed='{"label": "x"}')(d)),
    ),
    Scenario(
        "a cut-off structured answer is repaired with twice max_tokens, reserved",
        [CUT_OFF, VALID],
        "ok",
        [A, A],
        2,
        settings=STRUCTURED,
        options={"budget_usd": "1"},
        check=_cut_off_gets_twice_the_room,
    ),
    Scenario(
        "invalid past the repairs: the fallback",
        [INVALID, INVALID, ok('{"label": "y"}', model=F)],
        "ok",
        [A, A, F],
        3,
        settings={**STRUCTURED, **WITH_FALLBACK},
        check=_result(fallback_used=True),
    ),
    Scenario(
        "invalid past the repairs with no fallback fails, keeping the answer",
        [INVALID, INVALID],
        "failed",
        [A, A],
        2,
        "invalid structured output",
        settings=STRUCTURED,
        check=_result(response='{"label": 3}'),
    ),
    Scenario(
        "a repair is a new request with attempts of its own",
        [INVALID, e503(), e503(), VALID],
        "ok",
        [A, A, "wait 0", A, "wait 0", A],
        4,
        settings=STRUCTURED,
    ),
    Scenario(
        "no repairs when none are allowed",
        [INVALID],
        "failed",
        [A],
        1,
        settings={"response_format": SCHEMA, "repair": {"same_model": 0}},
    ),
    Scenario(
        "an open circuit with a fallback skips the model",
        [Open(), ok(model=F)],
        "ok",
        [f"{A} skipped", F],
        1,
        settings=WITH_FALLBACK,
    ),
    Scenario(
        "an open circuit with no fallback waits; failed probes count as attempts",
        [Open(probes=2), ok()],
        "ok",
        [f"{A} skipped", A],
        1,
    ),
    Scenario(
        "an open circuit whose probes all failed fails the pair",
        [Open(probes=3)],
        "failed",
        [f"{A} skipped"],
        0,
        "every probe of it failed (last: down)",
    ),
    Scenario("a stop before anything was paid leaves no record", [STOP], None, [A]),
    Scenario(
        "a stop after a paid attempt keeps its bill, pending",
        [BILLED_ERROR, STOP],
        "pending",
        [A, "wait 0", A],
        1,
        "cut off",
        check=_result(cost_usd=Decimal("0.000022"), billed_completion_tokens=3),
    ),
    Scenario(
        "a request cancelled on the wire is billed at its estimate, pending",
        [CANCEL],
        "pending",
        [A],
        1,
        "in flight",
        options={"budget_usd": "1"},
        check=lambda d: (_result(cost_source="estimated")(d), _estimate_is_reservation(d)),
    ),
    Scenario(
        "an abandoned reply is billed at its estimate and retried",
        [TIMED_OUT, ok()],
        "ok",
        [A, "wait 0", A],
        2,
        check=lambda d: _sources(d, {"estimated", "reported"}),
    ),
    Scenario(
        "an error's reported usage is billed",
        [BILLED_ERROR, ok()],
        "ok",
        [A, "wait 0", A],
        2,
        check=_result(cost_usd=Decimal("0.000052"), billed_prompt_tokens=20),
    ),
    Scenario(
        "a row whose media cannot be sent fails, unsent",
        [],
        "failed",
        [],
        0,
        "photo.png is missing",
        options={"problem": "photo.png is missing"},
    ),
    Scenario("a file that changed before it was sent fails the pair", [VANISH], "failed", [A], 0, "changed since"),
    Scenario(
        "a prompt longer than the context is refused unsent, then its fallback too",
        [],
        "failed",
        [],
        0,
        "more than f/fallback's context",
        settings=WITH_FALLBACK,
        options={"prompt": "word " * 20_000},
    ),
    Scenario(
        "middle-out lets a long prompt go",
        [ok()],
        "ok",
        [A],
        1,
        settings={"params": {"max_tokens": 100, "transforms": ["middle-out"]}},
        options={"prompt": "word " * 20_000},
    ),
    Scenario(
        "a request dearer than the whole budget fails unsent",
        [],
        "failed",
        [],
        0,
        "more than the whole budget",
        options={"budget_usd": "0.0001"},
    ),
    Scenario(
        "an earlier run's bill is carried into the result",
        [ok()],
        "ok",
        [A],
        3,
        options={"earlier": Bill(Decimal("0.002"), {"reported"}, 20, 10, 2)},
        check=_result(cost_usd=Decimal("0.00203")),
    ),
    Scenario(
        "OpenRouter's own fallback (the models array) is a fallback used",
        [ok(model=F)],
        "ok",
        [A],
        1,
        settings={**WITH_FALLBACK, "server_fallbacks": True},
        check=_result(fallback_used=True),
    ),
    Scenario(
        "each sample is its own pair, with its own seed",
        [ok()],
        "ok",
        [A],
        1,
        settings={"samples": 2, "params": {"max_tokens": 100, "seed": 7}},
        options={"sample": 1},
        check=_seeded,
    ),
]


def _halted(drove: Drove, reason: StopReason) -> None:
    halting = drove.verdicts[-1].halting
    assert halting is not None and halting.reason is reason


def _estimate_is_reservation(drove: Drove) -> None:
    assert drove.result is not None and drove.result.cost_usd == drove.asks[0].reserve_usd > 0


def _sources(drove: Drove, sources: set[str]) -> None:
    assert drove.result is not None and drove.result.this_run.sources == sources


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scenario: Scenario) -> None:
    """One row of the table: the trace of requests and waits, the pair's status, attempts and error."""
    drove = drive(make_flow(scenario.settings, **scenario.options), scenario.script)
    assert drove.trace == scenario.trace
    if scenario.status is None:
        assert drove.result is None
    else:
        assert drove.result is not None and drove.result.status == scenario.status
        assert drove.result.attempts == scenario.attempts
        assert scenario.error in (drove.result.error or "")
    if scenario.check is not None:
        scenario.check(drove)


def test_the_table_is_at_least_thirty_rows() -> None:
    """The issue asks for at least 30 scripted scenarios; a deleted row is a rule no longer pinned."""
    assert len(SCENARIOS) >= 30
    assert len({s.name for s in SCENARIOS}) == len(SCENARIOS)


def test_a_cost_above_the_worst_case_scales_later_reservations_and_passes_the_budget() -> None:
    """Accounts.settle: an answer dearer than its reservation raises what every later request reserves, and
    once spent plus reserved passes the limit the run must stop, saying why."""
    accounts = Accounts.of(PriceTable(PRICES), Budget(Decimal("0.01")))
    first = make_flow(accounts=accounts)
    ask = first.next()
    assert isinstance(ask, Ask) and accounts.budget is not None and accounts.budget.reserve(ask.reserve_usd)
    assert accounts.settle(ask.reserve_usd, ask.reserve_usd * 3) is None  # dear, but within the budget
    later = make_flow(accounts=accounts).next()
    assert isinstance(later, Ask) and later.reserve_usd == 3 * ask.reserve_usd
    assert accounts.budget.reserve(later.reserve_usd)
    passed = accounts.settle(later.reserve_usd, Decimal("0.02"))
    assert passed is not None and "budget of $0.01 passed" in passed


def test_budget_exhausted_only_when_nothing_in_flight_can_free_any() -> None:
    """Accounts.exhausted: a request that does not fit waits while reservations are held; it stops the run only
    when none is (the budget wait, then the stop)."""
    accounts = Accounts.of(PriceTable(PRICES), Budget(Decimal("0.001")))
    assert accounts.budget is not None
    assert accounts.budget.reserve(Decimal("0.0009"))
    assert accounts.exhausted(Decimal("0.0005")) is None
    accounts.settle(Decimal("0.0009"), Decimal("0.0009"))
    assert "budget of $0.001 reached" in (accounts.exhausted(Decimal("0.0005")) or "")


def test_the_reservation_holds_the_byok_fee_once_an_answer_says_byok() -> None:
    """Pricer.charged learns OpenRouter's BYOK fee from an answer: later reservations hold it on top."""
    accounts = Accounts.of(PriceTable(PRICES), Budget(Decimal("1")))
    flow = make_flow(accounts=accounts)
    ask = flow.next()
    assert isinstance(ask, Ask)
    flow.answered(Completion("x", A, "stop", Usage(10, 5, cost_usd=Decimal("0.00001"), is_byok=True), None, None, 0.1))
    again = make_flow(accounts=accounts).next()
    assert isinstance(again, Ask) and again.reserve_usd == ask.reserve_usd * Decimal("1.055")


def test_no_request_body_is_shared_between_asks() -> None:
    """A repair's body is a new dict: the first request's messages are not changed under a driver holding them."""
    drove = drive(make_flow(STRUCTURED), [INVALID, VALID])
    assert json.dumps(drove.asks[0].body) != json.dumps(drove.asks[1].body)
    assert len(drove.asks[0].body["messages"]) + 2 == len(drove.asks[1].body["messages"])
