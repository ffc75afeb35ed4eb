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
from batchrunner.flow import Ask, Done, Halting, RowFlow, Rules, Verdict, Wait, answer_fields, one_line
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


def ok(
    text: str = "fine",
    *,
    model: str = "",
    finish: str = "stop",
    refusal: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> Completion:
    usage = Usage(10, 5, cost_usd=Decimal("0.00003"))  # what the prices say
    return Completion(text, model, finish, usage, "gen-1", "P", 0.1, tool_calls=tool_calls, refusal=refusal)


def e503(retry_after_s: float | None = None, **more: Any) -> TransientError:
    return TransientError("HTTP 503: overloaded", status=503, code="upstream", retry_after_s=retry_after_s, **more)


E429 = RateLimited("HTTP 429: slow down", status=429, code="rate_limited")
E429_FLEX = RateLimited("HTTP 429: no flex capacity", status=429, code="flex_capacity")
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
BILLED = Usage(10, 3, cost_usd=Decimal("0.000022"))
BILLED_REJECTION = RequestRejected(
    "HTTP 400: context too long for this provider", status=400, code="bad_request", usage=BILLED
)
BILLED_429 = RateLimited("HTTP 429: slow down", status=429, code="rate_limited", usage=BILLED)
BILLED_401 = FatalApiError("HTTP 401: key revoked mid-stream", status=401, code="unauthorized", usage=BILLED)
BYOK = Completion(
    "fine",
    "",
    "stop",
    Usage(10, 5, cost_usd=Decimal("0.0000015"), is_byok=True, upstream_cost_usd=Decimal("0.00003")),
    "gen-2",
    "P",
    0.1,
)
VALID = ok('{"label": "x"}')
INVALID = ok('{"label": 3}')
CUT_OFF = ok('{"label": "x', finish="length")


@dataclass(frozen=True)
class Open:
    """The breaker skips the model; without a fallback the pair waits while `probes` other probes fail."""

    probes: int = 0
    cause: str = "down"


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
    """Do what the flow asks, answering each request with the next scripted event, until it is done; every
    verdict is checked against what its event means (`_check_verdict`)."""
    trace: list[str] = []
    verdicts: list[Verdict] = []
    asks: list[Ask] = []
    events = iter(script)
    for _ in range(100):
        action = flow.next()
        if isinstance(action, Done):
            assert next(events, None) is None, "the flow finished before the script did"
            if action.result is not None:
                assert action.result.this_run.cost_usd == sum((v.cost_usd for v in verdicts), Decimal(0))
            return Drove(action.result, trace, verdicts, asks, flow)
        if isinstance(action, Wait):
            assert action.model == flow.model
            trace.append(f"wait {action.delay_s:g}")
            flow.waited()
            continue
        event = next(events)
        asks.append(action)
        assert action.has_fallback == (action.model != flow.chain[-1])
        assert action.body["model"] == action.model, "the body asks the model the action names"
        trace.append(action.model)
        if isinstance(event, Open):
            moved_on = flow.circuit_open()
            trace[-1] += " skipped" if moved_on else " waited"
            if not moved_on:
                flow.probed(event.probes, event.cause)
        elif isinstance(event, Completion):
            verdicts.append(_check_verdict(flow.answered(event), event))
        elif isinstance(event, ApiError) and event.code == "unreachable":
            flow.unreachable(event)
        elif isinstance(event, ApiError):
            verdicts.append(_check_verdict(flow.failed(event), event))
        elif event == STOP:
            flow.stop()
        elif event == CANCEL:
            verdicts.append(flow.cancelled())
            assert verdicts[-1].paid is None and verdicts[-1].healthy is None
        elif event == VANISH:  # a file the row names changed since it was read
            flow.unsendable(MediaProblem("photo.png changed since it was read"))
    raise AssertionError("the flow never finished")


def _check_verdict(verdict: Verdict, event: Completion | ApiError) -> Verdict:
    """What an answer or an error must tell the drivers: the breaker's news, a slow-down, a stop, its cost."""
    if isinstance(event, Completion):
        assert (verdict.healthy, verdict.why, verdict.slow_down, verdict.halting) == (True, "", None, None)
        assert verdict.paid is not None and verdict.paid.cost_usd == verdict.cost_usd
        return verdict
    if event.usage is not None:
        assert verdict.paid is not None and verdict.paid.cost_usd == verdict.cost_usd > 0
    else:
        assert verdict.paid is None and (verdict.cost_usd > 0) == event.abandoned
    if isinstance(event, FatalApiError):
        reason = StopReason.FREE_CAP if event.code == "free_daily_cap" else StopReason.ACCOUNT
        assert verdict.halting == Halting(reason, str(event), event)
        assert (verdict.healthy, verdict.slow_down) == (None, None)
    elif isinstance(event, RateLimited):
        upstream = bool(event.metadata.get("provider_name")) or event.code == "flex_capacity"
        assert (verdict.healthy, verdict.why, verdict.slow_down, verdict.halting) == (None, "", upstream, None)
    else:
        sick = isinstance(event, TransientError) or event.status == 404
        assert (verdict.healthy, verdict.why) == (False if sick else None, str(event))
        assert (verdict.slow_down, verdict.halting) == (None, None)
    return verdict


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
    error: str | None = None  # the result's error column, exactly
    code: str | None = None  # the code of the pair's last error (what a summary or a report may count by)
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
    Scenario("a 503 is retried after a backoff", [e503(), ok()], "ok", [A, "wait 0", A], 2, code="upstream"),
    Scenario("Retry-After is the backoff", [e503(retry_after_s=7), ok()], "ok", [A, "wait 7", A], 2, code="upstream"),
    Scenario(
        "OpenRouter's 429 slows the run, not the model's health",
        [E429, ok()],
        "ok",
        [A, "wait 0", A],
        2,
        check=_verdict(0, slow_down=False, healthy=None),
        code="rate_limited",
    ),
    Scenario(
        "a provider's 429 slows only its model",
        [E429_UPSTREAM, ok()],
        "ok",
        [A, "wait 0", A],
        2,
        check=_verdict(0, slow_down=True),
        code="rate_limited",
    ),
    Scenario(
        "a transient error counts against the model's health",
        [e503(), ok()],
        "ok",
        [A, "wait 0", A],
        2,
        check=_verdict(0, healthy=False),
        code="upstream",
    ),
    Scenario(
        "transient errors to the last attempt fail the pair",
        [e503(), e503(), e503()],
        "failed",
        [A, "wait 0", A, "wait 0", A],
        3,
        "HTTP 503: overloaded",
        code="upstream",
    ),
    Scenario(
        "transient errors to the last attempt hand the pair to its fallback",
        [e503(), e503(), e503(), ok(model=F)],
        "ok",
        [A, "wait 0", A, "wait 0", A, F],
        4,
        settings=WITH_FALLBACK,
        check=_result(fallback_used=True, model=F),
        code="upstream",
    ),
    Scenario("a rejected request is not retried", [E400], "failed", [A], 1, "HTTP 400: bad request", "bad_request"),
    Scenario(
        "a rejected request goes to the fallback at once",
        [E400, ok(model=F)],
        "ok",
        [A, F],
        2,
        settings=WITH_FALLBACK,
        check=_verdict(0, healthy=None),
        code="bad_request",
    ),
    Scenario(
        "a 404 is the model's problem: its health hears of it",
        [E404, ok(model=F)],
        "ok",
        [A, F],
        2,
        settings=WITH_FALLBACK,
        check=_verdict(0, healthy=False),
        code="not_found",
    ),
    Scenario(
        "a revoked key stops the run; the pair stays pending with its bill",
        [E401],
        "pending",
        [A],
        1,
        "HTTP 401: key revoked",
        "unauthorized",
        check=lambda d: _halted(d, StopReason.ACCOUNT),
    ),
    Scenario(
        "the free models' daily cap stops the run as FREE_CAP",
        [FREE_CAP],
        "pending",
        [A],
        1,
        "HTTP 429: free models per day",
        "free_daily_cap",
        check=lambda d: _halted(d, StopReason.FREE_CAP),
    ),
    Scenario(
        "a request that never reached the server is not an attempt and not waited for",
        [UNREACHABLE, ok()],
        "ok",
        [A, A],
        1,
        code="unreachable",
    ),
    Scenario(
        "a refusal goes to the fallback",
        [ok("", refusal="I cannot"), ok(model=F)],
        "ok",
        [A, F],
        2,
        settings=WITH_FALLBACK,
        code="refusal",
    ),
    Scenario(
        "a refusal with no fallback fails, keeping the refusal's text",
        [ok("", refusal="I cannot")],
        "failed",
        [A],
        1,
        "refusal: I cannot",
        "refusal",
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
        code="invalid_output",
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
        code="invalid_output",
    ),
    Scenario(
        "invalid past the repairs: the fallback",
        [INVALID, INVALID, ok('{"label": "y"}', model=F)],
        "ok",
        [A, A, F],
        3,
        settings={**STRUCTURED, **WITH_FALLBACK},
        check=_result(fallback_used=True),
        code="invalid_output",
    ),
    Scenario(
        "invalid past the repairs with no fallback fails, keeping the answer",
        [INVALID, INVALID],
        "failed",
        [A, A],
        2,
        "invalid structured output: fails the schema at label: 3 is not of type 'string'",
        "invalid_output",
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
        code="upstream",
    ),
    Scenario(
        "no repairs when none are allowed",
        [INVALID],
        "failed",
        [A],
        1,
        "invalid structured output: fails the schema at label: 3 is not of type 'string'",
        "invalid_output",
        settings={"response_format": SCHEMA, "repair": {"same_model": 0}},
    ),
    Scenario(
        "an open circuit with a fallback skips the model",
        [Open(), ok(model=F)],
        "ok",
        [f"{A} skipped", F],
        1,
        settings=WITH_FALLBACK,
        code="circuit_open",
    ),
    Scenario(
        "an open circuit with no fallback waits; failed probes count as attempts",
        [Open(probes=2), ok()],
        "ok",
        [f"{A} waited", A],
        1,
        code="circuit_open",
    ),
    Scenario(
        "an open circuit whose probes all failed fails the pair",
        [Open(probes=3)],
        "failed",
        [f"{A} waited"],
        0,
        "a/model is unavailable: every probe of it failed (last: down)",
        "circuit_open",
    ),
    Scenario("a stop before anything was paid leaves no record", [STOP], None, [A]),
    Scenario(
        "a stop after a paid attempt keeps its bill, pending",
        [BILLED_ERROR, STOP],
        "pending",
        [A, "wait 0", A],
        1,
        "HTTP 502: cut off",
        "upstream",
        check=_result(cost_usd=Decimal("0.000022"), billed_completion_tokens=3),
    ),
    Scenario(
        "a request cancelled on the wire is billed at its estimate, pending",
        [CANCEL],
        "pending",
        [A],
        1,
        "the run stopped with this request in flight (it may have been billed)",
        "abandoned",
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
        code="timeout",
    ),
    Scenario(
        "an error's reported usage is billed",
        [BILLED_ERROR, ok()],
        "ok",
        [A, "wait 0", A],
        2,
        check=_result(cost_usd=Decimal("0.000052"), billed_prompt_tokens=20),
        code="upstream",
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
    Scenario(
        "a file that changed before it was sent fails the pair",
        [VANISH],
        "failed",
        [A],
        0,
        "photo.png changed since it was read",
    ),
    Scenario(
        "a prompt longer than the context is refused unsent, then its fallback too",
        [],
        "failed",
        [],
        0,
        "the prompt is at least 3,125 tokens, more than f/fallback's context of 2,000 (nothing was sent): shorten it, or "
        "ask for params.transforms: [middle-out]",
        "context_length",
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
        "this request could cost up to $0.000429, more than the whole budget of $0.0001 (nothing was sent): shorten "
        "the prompt or lower max_tokens",
        "over_budget",
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
    Scenario(
        "a fallback gets attempts of its own",
        [e503(), e503(), e503(), e503(), e503(), ok(model=F)],
        "ok",
        [A, "wait 0", A, "wait 0", A, F, "wait 0", F, "wait 0", F],
        6,
        code="upstream",
        settings=WITH_FALLBACK,
    ),
    Scenario(
        "a fallback gets repairs of its own",
        [INVALID, INVALID, INVALID, ok('{"label": "y"}', model=F)],
        "ok",
        [A, A, F, F],
        4,
        code="invalid_output",
        settings={**STRUCTURED, **WITH_FALLBACK},
    ),
    Scenario(
        "two repairs allowed: two asked",
        [INVALID, INVALID, VALID],
        "ok",
        [A, A, A],
        3,
        code="invalid_output",
        settings={"response_format": SCHEMA, "repair": {"same_model": 2}},
    ),
    Scenario(
        "a cut-off answer past its repairs fails, saying it was cut off",
        [CUT_OFF, CUT_OFF],
        "failed",
        [A, A],
        2,
        "invalid structured output: cut off at max_tokens before the JSON was complete (Unterminated string "
        "starting at: line 1 column 11 (char 10))",
        "invalid_output",
        settings=STRUCTURED,
        check=lambda d: _repair_says(d, "cut off"),
    ),
    Scenario(
        "failed probes add to the attempts already made",
        [e503(), Open(probes=2)],
        "failed",
        [A, "wait 0", f"{A} waited"],
        1,
        "a/model is unavailable: every probe of it failed (last: down)",
        "circuit_open",
    ),
    Scenario(
        "probes that failed for no known reason say only that",
        [Open(probes=3, cause="")],
        "failed",
        [f"{A} waited"],
        0,
        "a/model is unavailable: every probe of it failed",
        "circuit_open",
    ),
    Scenario(
        "a stop after a skipped model keeps why it was skipped",
        [BILLED_ERROR, Open(), STOP],
        "pending",
        [A, "wait 0", f"{A} skipped", F],
        1,
        "a/model skipped: it keeps failing (circuit open)",
        "circuit_open",
        settings=WITH_FALLBACK,
    ),
    Scenario(
        "a stop after an unreachable server keeps that error",
        [BILLED_ERROR, UNREACHABLE, STOP],
        "pending",
        [A, "wait 0", A, A],
        1,
        "connection refused",
        "unreachable",
    ),
    Scenario(
        "a cancel after a failed attempt counts both",
        [e503(), CANCEL],
        "pending",
        [A, "wait 0", A],
        2,
        "the run stopped with this request in flight (it may have been billed)",
        "abandoned",
        options={"budget_usd": "1"},
        check=lambda d: _result(billed_prompt_tokens=0, billed_completion_tokens=0)(d),
    ),
    Scenario(
        "an answer with text and a refusal note is an answer",
        [ok("fine", refusal="partly")],
        "ok",
        [A],
        1,
        check=_result(response="fine"),
    ),
    Scenario(
        "a tool call with no text is an answer, not a refusal",
        [ok("", refusal="none", tool_calls=[{"id": "c1"}])],
        "ok",
        [A],
        1,
        check=_result(tool_calls='[{"id": "c1"}]'),
    ),
    Scenario(
        "without server fallbacks, an answer naming a fallback model is not a fallback used",
        [ok(model=F)],
        "ok",
        [A],
        1,
        settings=WITH_FALLBACK,
        check=_result(fallback_used=False),
    ),
    Scenario(
        "a structured answer keeps its text as written",
        [ok('{"label": "café"}')],
        "ok",
        [A],
        1,
        settings=STRUCTURED,
        check=_result(parsed='{"label": "café"}', response='{"label": "café"}'),
    ),
    Scenario(
        "an unstructured answer has nothing parsed",
        [ok()],
        "ok",
        [A],
        1,
        check=_result(parsed=None),
    ),
    Scenario(
        "the flex tier's 429 slows only the model",
        [E429_FLEX, ok()],
        "ok",
        [A, "wait 0", A],
        2,
        code="flex_capacity",
        check=_verdict(0, slow_down=True),
    ),
    Scenario(
        "a BYOK answer's provider part is kept beside the whole",
        [BYOK],
        "ok",
        [A],
        1,
        check=_result(upstream_cost_usd=Decimal("0.00003"), cost_usd=Decimal("0.0000315")),
    ),
    Scenario(
        "two repairs allowed, then the model gave up",
        [INVALID, INVALID, INVALID],
        "failed",
        [A, A, A],
        3,
        "invalid structured output: fails the schema at label: 3 is not of type 'string'",
        "invalid_output",
        settings={"response_format": SCHEMA, "repair": {"same_model": 2}},
    ),
    Scenario(
        "a rejected request that was billed keeps its bill",
        [BILLED_REJECTION],
        "failed",
        [A],
        1,
        "HTTP 400: context too long for this provider",
        "bad_request",
        check=_result(cost_usd=Decimal("0.000022")),
    ),
    Scenario(
        "a 429 that was billed keeps its bill",
        [BILLED_429, ok()],
        "ok",
        [A, "wait 0", A],
        2,
        code="rate_limited",
        check=_result(cost_usd=Decimal("0.000052")),
    ),
    Scenario(
        "a revoked key's billed attempt keeps its bill",
        [BILLED_401],
        "pending",
        [A],
        1,
        "HTTP 401: key revoked mid-stream",
        "unauthorized",
        check=_result(cost_usd=Decimal("0.000022")),
    ),
]


def _check_identity(result: RowResult, flow: RowFlow) -> None:
    """Every result names its pair as the request did: row, model position, requested model, fingerprint."""
    request = flow.request
    assert (result.row_index, result.row_id, result.model_position, result.requested_model, result.fingerprint) == (
        request.row.index,
        request.row.id,
        request.model_position,
        request.requested_model,
        request.fingerprint,
    )


def _repair_says(drove: Drove, words: str) -> None:
    assert words in drove.asks[1].body["messages"][-1]["content"]


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
        assert drove.result.error == scenario.error
        _check_identity(drove.result, drove.flow)
    assert (drove.flow.last_error.code if drove.flow.last_error else None) == scenario.code
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


def test_an_answer_fills_every_answer_column() -> None:
    """The columns an answer fills, each from its own field: a swapped or dropped one shows here."""
    usage = Usage(11, 7, cached_tokens=3, reasoning_tokens=2, cost_usd=Decimal("0.000039"))
    completion = Completion(
        "fine",
        A,
        "stop",
        usage,
        "gen-9",
        "Prov",
        0.123456,
        tool_calls=[{"id": "ü"}],
        ttft_s=0.054321,
        service_tier="flex",
    )
    drove = drive(make_flow(), [completion])
    assert drove.result is not None
    fields = {name: getattr(drove.result, name) for name in answer_fields(completion)}
    assert fields == {
        "response": "fine",
        "model": A,
        "finish_reason": "stop",
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "cached_tokens": 3,
        "reasoning_tokens": 2,
        "latency_s": 0.1235,
        "ttft_s": 0.0543,
        "generation_id": "gen-9",
        "provider": "Prov",
        "service_tier": "flex",
        "tool_calls": '[{"id": "ü"}]',
    }
    assert answer_fields(ok("", refusal="no"), failed=True)["response"] == "no"
    assert answer_fields(ok("", refusal="no"))["response"] == ""
    assert answer_fields(ok())["ttft_s"] is None and answer_fields(ok())["model"] is None
    assert answer_fields(ok())["tool_calls"] is None


def test_an_error_is_one_line_of_at_most_500_characters() -> None:
    """The error column holds one line: whitespace runs become one space, and it is cut at 500 characters."""
    assert one_line("a\n  b\tc") == "a b c"
    assert one_line("x" * 600) == "x" * 500


class SpyPricer(Pricer):
    """A Pricer that records what each charge was asked with."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls: list[tuple[Any, ...]] = []

    def charged(self, usage: Usage, model: str, *args: Any, **named: Any) -> Any:
        self.calls.append((usage, model, *args, *named.values()))
        return super().charged(usage, model, *args, **named)


def test_each_charge_names_the_model_that_answered_the_one_asked_and_what_was_sent() -> None:
    """An answer is priced as the model that served it (else the one asked), at the tier that served it, with
    the media the request carried; an error's usage as the model asked."""
    flow = make_flow()
    spy = SpyPricer(flow.rules.spec, flow.rules.requests, flow.rules.pricer.accounts)
    flow.rules.pricer = spy
    served = Completion("x", F, "stop", Usage(1, 1), "gen-3", None, 0.1, service_tier="flex")
    drive(flow, [BILLED_ERROR, served])
    (error_usage, error_model, *error_rest), (usage, model, requested, generation_id, media, tier) = spy.calls
    assert (error_usage, error_model) == (BILLED_ERROR.usage, A) and error_rest[-1].images == 0
    assert (usage, model, requested, generation_id, tier) == (served.usage, F, A, "gen-3", "flex")
    assert media is not None and media.images == 0
    nameless = make_flow()
    nameless.rules.pricer = spy
    drive(nameless, [ok(model="")])
    assert spy.calls[-1][1:3] == (A, A), "an answer that names no model is priced as the model asked"


SENT = [  # (the model an earlier run's batch went to, what it answered) -> (status, model, fallback_used, has one)
    ((A, ok(model=A)), ("ok", A, False, True)),
    ((F, ok(model=F)), ("ok", F, True, False)),
    (("gone/model", ok(model="gone/model")), ("ok", "gone/model", False, True)),
]


@pytest.mark.parametrize(("sent", "expected"), SENT)
def test_an_answer_to_a_request_an_earlier_run_sent_is_taken_as_that_models(
    sent: tuple[str, Completion], expected: tuple[str, str, bool, bool]
) -> None:
    """A batch an earlier run submitted to a fallback is taken as the fallback's answer (its place in the chain);
    one to a model the spec no longer names is still taken, on the pair's current model."""
    model, answer = sent
    flow = make_flow(WITH_FALLBACK)
    flow.sent(model, Decimal("0.25"))
    assert flow.asked is not None and flow.asked.model == model and flow.asked.reserve_usd == Decimal("0.25")
    assert flow.asked.body["model"] == model and flow.todo.request is flow.request
    assert flow.asked.has_fallback == expected[3]
    flow.answered(answer)
    done = flow.next()
    assert isinstance(done, Done) and done.result is not None
    assert (done.result.status, done.result.model, done.result.fallback_used) == expected[:3]


def test_the_request_this_run_asked_is_the_one_taken() -> None:
    """sent() for the model just asked keeps that request (a repair's body), not a fresh one."""
    flow = make_flow(STRUCTURED)
    drive_until_ask = flow.next()
    assert isinstance(drive_until_ask, Ask)
    flow.answered(INVALID)
    repair = flow.next()
    assert isinstance(repair, Ask)
    flow.sent(A, repair.reserve_usd)
    assert flow.asked is repair
    flow.answered(INVALID)
    assert flow.repairs == 1 and flow.finished


def test_a_fallback_taken_from_an_earlier_batch_starts_its_attempts_and_repairs_afresh() -> None:
    """Moving to the model an earlier run's batch went to resets that model's attempts and repairs."""
    flow = make_flow({**STRUCTURED, **WITH_FALLBACK})
    flow.next()
    flow.answered(INVALID)  # a repair due on A
    flow.sent(F, Decimal(0))
    assert (flow.position, flow.tries, flow.repairs) == (1, 0, 0)
    assert flow.asked is not None and flow.asked.body["model"] == F
    assert flow.asked is not None and "messages" in flow.asked.body and len(flow.asked.body["messages"]) == 1


def test_an_earlier_runs_request_for_a_later_sample_keeps_its_seed() -> None:
    """sent() rebuilds the request an earlier run's batch carried for sample 1 with that sample's seed."""
    flow = make_flow({"samples": 2, "params": {"max_tokens": 100, "seed": 7}}, sample=1)
    flow.sent(A, Decimal(0))
    assert flow.asked is not None and flow.asked.body["seed"] == 8
