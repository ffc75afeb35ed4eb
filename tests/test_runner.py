"""A whole run against a sandbox on loopback: the rate it picks, keys, free-model caps."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from helpers.formats import strict_object

from batchrunner import limits as limits_module
from batchrunner import openapi
from batchrunner import runner as runner_module
from batchrunner.breaker import Breaker
from batchrunner.client import Client
from batchrunner.costs import PriceTable, format_cost
from batchrunner.errors import RunHalted, SpecError
from batchrunner.limits import Limits
from batchrunner.offline import job_status
from batchrunner.preflight import api_key, prepare
from batchrunner.retries import RetryPolicy
from batchrunner.runner import RunSettings, follow_credits, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec
from batchrunner.store import Store


def rows_csv(tmp_path: Path, n: int) -> str:
    path = tmp_path / f"rows{n}.csv"
    pl.DataFrame({"ticket_id": [f"T-{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)]}).write_csv(path)
    return path.name


@pytest.mark.slow  # seconds of paced or multi-process runs: the long set (CI's second step)
async def test_the_rate_comes_from_the_credits_and_no_429_follows(
    write_spec: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With 100.5 credits the run paces at OpenRouter's rule, 100 requests/s, and the sandbox (enforcing
    the same rule) never answers 429. How fully the rate is used is measured on virtual time
    (test_limits.py) and end to end by bench/throughput.py."""
    caplog.set_level(logging.INFO, logger="batchrunner")
    config = SandboxConfig(rate_limit="credits", credits_usd=Decimal("100.5"))
    async with Sandbox(config) as sandbox:
        spec = load_spec(write_spec(input=rows_csv(tmp_path, 200), concurrency=16, api={"base_url": sandbox.base_url}))
        outcome = await run_job(spec, RunSettings(retry=RetryPolicy.immediate()))
    assert outcome.report.summary.ok == 200
    assert "rate limit: 100 requests/s (100.50 credits remaining" in caplog.text
    assert sandbox.stats.statuses[429] == 0


async def test_explicit_rate_limit_from_the_spec(
    write_spec: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """rate_limit: {requests_per_minute: N} paces the run at N/60 per second, whatever the credits say."""
    caplog.set_level(logging.INFO, logger="batchrunner")
    async with Sandbox(SandboxConfig(credits_usd=Decimal("3"))) as sandbox:
        spec = load_spec(write_spec(rate_limit={"requests_per_minute": 1200}, api={"base_url": sandbox.base_url}))
        outcome = await run_job(spec)
    assert outcome.report.summary.ok == 12
    assert "rate limit: 20 requests/s (set by rate_limit in the spec)" in caplog.text


async def test_free_model_daily_cap_defers_rows_to_tomorrow(
    write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the daily cap the run stops sending to free models, leaves their rows pending, and the next run knows."""
    monkeypatch.setattr(limits_module, "FREE_REQUESTS_PER_MINUTE", 60_000)
    async with Sandbox(SandboxConfig(report_free_daily=False)) as sandbox:  # /key says no count: the spec's cap
        spec = load_spec(
            write_spec(
                models=["meta-llama/llama-3.3-70b-instruct:free"],
                free_requests_per_day=5,
                api={"base_url": sandbox.base_url},
            )
        )
        first = (await run_job(spec)).report
        second = (await run_job(spec)).report
    assert first.summary.ok == 5 and first.pending == 7
    assert first.deferred and "resets at" in first.deferred
    assert second.summary.ok == 0 and second.deferred, "the day's count persisted"
    assert sandbox.stats.requests == 5


async def test_server_daily_cap_defers_free_rows_and_paid_models_go_on(
    write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A free-models-per-day 429 from the server leaves free rows pending; the paid model's rows all finish."""
    monkeypatch.setattr(limits_module, "FREE_REQUESTS_PER_MINUTE", 60_000)
    # a server whose /key does not say its cap, so the run learns it from the 429
    async with Sandbox(SandboxConfig(free_daily_cap=3, report_free_daily=False)) as sandbox:
        spec = load_spec(
            write_spec(
                models=["openai/gpt-4o-mini", "meta-llama/llama-3.3-70b-instruct:free"],
                concurrency=1,
                api={"base_url": sandbox.base_url},
            )
        )
        report = (await run_job(spec)).report
    output = pl.read_parquet(spec.output)
    by_model = {m: output.filter(pl.col("requested_model") == m).height for m in spec.models}
    assert by_model == {"openai/gpt-4o-mini": 12, "meta-llama/llama-3.3-70b-instruct:free": 3}
    assert report.deferred and not report.halted
    assert sandbox.stats.statuses[429] == 1, "one refusal is enough to stop asking"


async def test_follow_credits_lowers_the_rate_as_credits_are_spent() -> None:
    """The credit rule is re-applied while the run goes: fewer credits, a lower rate, no restart."""
    async with Sandbox(SandboxConfig(credits_usd=Decimal("7.5"))) as sandbox, Client(sandbox.base_url) as client:
        limits = Limits(100)
        task = asyncio.create_task(follow_credits(client, limits, every_s=0.01))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if limits.pacer.limit_rps == 7:
                break
        task.cancel()
    assert limits.pacer.limit_rps == 7


def test_api_key_rules(write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenRouter needs an sk-or-v1- key; another server may go without one."""
    spec = load_spec(write_spec(api={"api_key_env": "MY_KEY"}))
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(SpecError, match=r"\$MY_KEY is not set"):
        api_key(spec, "https://openrouter.ai/api/v1")
    assert api_key(spec, "http://localhost:8000/v1") is None
    monkeypatch.setenv("MY_KEY", "sk-or-v1-abc")
    assert api_key(spec, "https://openrouter.ai/api/v1") == "sk-or-v1-abc"


async def test_unchanged_rerun_sends_nothing_and_appended_rows_only_them(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """The nightly pattern: a rerun sends nothing; rows appended to the input are the only new work."""
    source = tmp_path / "tickets.csv"
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
        assert sandbox.stats.requests == 12
        again = (await run_job(spec)).report
        assert sandbox.stats.requests == 12 and again.resumed == 12 and again.summary.done == 0
        grown = pl.concat(
            [
                pl.read_csv(source),
                pl.DataFrame({"ticket_id": ["T-new1", "T-new2"], "subject": ["s", "s"], "text": ["new a", "new b"]}),
            ]
        )
        grown.write_csv(source)
        await run_job(spec)
    assert sandbox.stats.requests == 14
    output = pl.read_parquet(spec.output)
    assert output.height == 14 and output["ticket_id"].n_unique() == 14


async def test_editing_params_or_one_row_reruns_exactly_what_changed(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Changing a row's text re-sends that row only; changing params re-sends every row."""
    source = tmp_path / "tickets.csv"
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
        frame = pl.read_csv(source)
        frame.with_columns(
            pl.when(pl.col("ticket_id") == "T-3").then(pl.lit("edited text")).otherwise(pl.col("text")).alias("text")
        ).write_csv(source)
        await run_job(spec)
        assert sandbox.stats.requests == 13
        edited = load_spec(
            write_spec(params={"temperature": 0.5, "max_tokens": 50}, api={"base_url": sandbox.base_url})
        )
        await run_job(edited)
    assert sandbox.stats.requests == 25
    assert "edited text" in pl.read_parquet(spec.output).filter(pl.col("ticket_id") == "T-3")["response"][0]


async def test_failed_rows_are_retried_on_the_next_run(write_spec: Callable[..., Path]) -> None:
    """Rows that failed (a model down) are sent again next run; the ones answered are not."""
    down = SandboxConfig(down_models={"openai/gpt-4o-mini"})
    async with Sandbox(down) as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}, retry={"max_attempts": 1}))
        first = (
            await run_job(spec, RunSettings(retry=RetryPolicy.immediate(1), breaker=Breaker(threshold=1000)))
        ).report
        assert first.summary.failed == 12
        down.down_models.clear()
        second = (await run_job(spec)).report
    assert second.summary.ok == 12 and second.resumed == 0
    assert pl.read_parquet(spec.output)["status"].to_list() == ["ok"] * 12


@pytest.mark.parametrize("report_cost", [True, False])
async def test_costs_add_up_to_what_was_charged(write_spec: Callable[..., Path], report_cost: bool) -> None:
    """The run's cost_usd sums to what the sandbox charged, to the micro-dollar, whether usage.cost is
    reported or computed from /models prices, billed failed attempts and cached prompts included."""
    config = SandboxConfig(report_cost=report_cost, bill_failed_answers=True, faults={"finish_error": 0.3}, seed=5)
    async with Sandbox(config) as sandbox:
        spec = load_spec(
            write_spec(
                system="You are terse.",
                models=["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"],
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec, RunSettings(retry=RetryPolicy.immediate(8)))
    output = pl.read_parquet(spec.output)
    assert outcome.report.summary.ok == 24
    assert sandbox.stats.statuses[200] > 24, "some attempts failed and were billed"
    assert output["cost_source"].unique().to_list() == ["reported" if report_cost else "computed"]
    assert output["cached_tokens"].sum() > 0
    assert abs(output["cost_usd"].sum() - sandbox.stats.charged_usd) < Decimal("0.000001")
    assert outcome.report.summary.cost_usd == output["cost_usd"].sum()


async def test_budget_is_never_exceeded_and_mostly_used(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """A budget run stops dispatching before spent plus worst case passes the budget, having used most of it."""
    async with Sandbox() as sandbox:
        spec = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 300),
                models=["openai/gpt-4o"],
                concurrency=4,
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec, RunSettings(max_cost_usd=Decimal("0.05")))
    report = outcome.report
    assert report.halted and "budget of $0.05 reached" in report.halted
    assert 0 < report.pending < 300
    assert sandbox.stats.charged_usd <= Decimal("0.05")
    assert sandbox.stats.charged_usd >= Decimal("0.045"), "most of the budget is used"


async def test_budget_without_prices_is_refused(write_spec: Callable[..., Path]) -> None:
    """A budget needs every model's price; a router without one is refused before sending."""
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(models=["openrouter/auto"], budget_usd=1, api={"base_url": sandbox.base_url}))
        with pytest.raises(SpecError, match="no prices for openrouter/auto"):
            await run_job(spec)
    assert sandbox.stats.requests == 0


async def test_summary_json_is_written_beside_the_output(write_spec: Callable[..., Path]) -> None:
    """<output>.summary.json has per-model rows, tokens, cost, latency percentiles, retries and fallbacks."""
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
    summary = json.loads(spec.output.with_name("result.summary.json").read_text())
    model = summary["models"]["openai/gpt-4o-mini"]
    assert summary["rows_ok"] == 12 and model["ok"] == 12 and model["latency_p95_s"] is not None
    assert Decimal(summary["cost_usd"]) == sandbox.stats.charged_usd


TRIAGE = strict_object(
    {
        "category": {"type": "string", "enum": ["bug", "billing", "account"]},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "confidence": {"type": "number"},
        "needs_human": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    name="triage",
)


async def test_invalid_json_a_quarter_of_the_time_ends_valid_or_failed_with_typed_columns(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """With a quarter of answers broken, every row ends valid (repaired or by a fallback) or failed with the
    reason and its raw text, and the output columns carry the schema's types."""
    faults = {"invalid_json": 0.15, "schema_violation": 0.10}
    async with Sandbox(SandboxConfig(faults=faults, seed=11, record_bodies=True)) as sandbox:
        spec = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 80),
                response_format=TRIAGE,
                fallbacks=["google/gemini-2.0-flash-001"],
                api={"base_url": sandbox.base_url},
            )
        )
        report = (await run_job(spec)).report
    output = pl.read_parquet(spec.output)
    assert output.height == 80 and report.summary.ok + report.summary.failed == 80
    assert output.schema["category"] == pl.Enum(["bug", "billing", "account"])
    assert (output.schema["urgency"], output.schema["confidence"], output.schema["needs_human"]) == (
        pl.Int64,
        pl.Float64,
        pl.Boolean,
    )
    assert output.schema["tags"] == pl.List(pl.String)
    ok = output.filter(pl.col("status") == "ok")
    assert ok["category"].null_count() == 0 and ok["urgency"].is_between(1, 5).all()
    failed = output.filter(pl.col("status") == "failed")
    assert failed["error"].str.starts_with("invalid structured output").all()
    assert failed["response"].null_count() == 0
    repairs = [b for b in sandbox.stats.bodies if any("was not valid" in str(m.get("content")) for m in b["messages"])]
    assert repairs, "invalid answers are re-asked with the error fed back"
    assert (output["attempts"] > 1).sum() >= len(repairs) // 2


async def test_cut_off_answers_are_retried_with_more_room(write_spec: Callable[..., Path]) -> None:
    """An answer cut off at max_tokens is asked again with twice the max_tokens, and then validates."""
    async with Sandbox(SandboxConfig(record_bodies=True)) as sandbox:
        spec = load_spec(
            write_spec(response_format=TRIAGE, params={"max_tokens": 30}, api={"base_url": sandbox.base_url})
        )
        report = (await run_job(spec)).report
    assert report.summary.failed == 0
    sizes = [b["max_tokens"] for b in sandbox.stats.bodies]
    assert set(sizes) == {30, 60}, "cut-off answers were asked again with twice the room"
    assert pl.read_parquet(spec.output)["finish_reason"].to_list() == ["stop"] * 12


async def test_refusals_are_recorded_and_go_to_the_fallback(write_spec: Callable[..., Path]) -> None:
    """A refusal is not repaired on the same model; with no fallback left the row fails as 'refusal'."""
    async with Sandbox(SandboxConfig(faults={"refusal": 1.0})) as sandbox:
        spec = load_spec(write_spec(fallbacks=["anthropic/claude-3.5-haiku"], api={"base_url": sandbox.base_url}))
        await run_job(spec)
    output = pl.read_parquet(spec.output)
    assert output["error"].str.starts_with("refusal: I can't help").all()
    assert output["attempts"].to_list() == [2] * 12, "one try per model: refusals are not retried"


async def test_json_object_and_tool_calls_columns(write_spec: Callable[..., Path]) -> None:
    """json_object answers land in `parsed`; tool calls are recorded as JSON in `tool_calls`."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "route",
                "parameters": {
                    "type": "object",
                    "properties": {"team": {"type": "string", "enum": ["a", "b"]}},
                    "required": ["team"],
                },
            },
        }
    ]
    async with Sandbox() as sandbox:
        as_object = load_spec(write_spec(response_format={"type": "json_object"}, api={"base_url": sandbox.base_url}))
        await run_job(as_object)
        parsed = pl.read_parquet(as_object.output)["parsed"].to_list()
        with_tools = load_spec(
            write_spec(
                params={"max_tokens": 50, "tools": tools},
                output="out/tools.parquet",
                api={"base_url": sandbox.base_url},
            )
        )
        await run_job(with_tools)
    assert all(json.loads(p)["answer"].startswith("Simulated answer") for p in parsed)
    calls = [json.loads(c) for c in pl.read_parquet(with_tools.output)["tool_calls"].to_list()]
    assert all(
        c[0]["function"]["name"] == "route" and json.loads(c[0]["function"]["arguments"])["team"] in "ab" for c in calls
    )


def test_input_problems_name_the_spec_line(write_spec: Callable[..., Path]) -> None:
    """A placeholder the input lacks names the template's field and line; an id problem names id_column's line."""
    path = write_spec(
        prompt=None, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "{body}"}]
    )
    with pytest.raises(SpecError) as info:
        prepare(load_spec(path))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "{body}" in text)
    assert f"{path}:{line}: messages[1].content: placeholder {{body}} names no input column" in str(info.value)
    with pytest.raises(SpecError, match=rf"{path}:3: id_column: 'nope' is not an input column"):
        prepare(load_spec(write_spec(id_column="nope")))


async def test_a_run_held_back_by_concurrency_says_so(
    write_spec: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """When requests in flight, not the rate limit, set the pace, the run suggests a concurrency that would use the limit."""
    async with Sandbox(SandboxConfig(latency_s=0.05)) as sandbox:
        spec = load_spec(write_spec(concurrency=2, api={"base_url": sandbox.base_url}))
        with caplog.at_level("INFO", logger="batchrunner"):
            await run_job(spec)
    assert "concurrency 2 held the run to about" in caplog.text and "concurrency: " in caplog.text


async def test_an_unreachable_server_stops_the_run_before_the_first_row(write_spec: Callable[..., Path]) -> None:
    """Nothing listening at the base URL: the run stops at once (exit 3) instead of retrying every row."""
    async with Sandbox() as sandbox:
        url = sandbox.base_url  # the port is free again once the sandbox stops
    spec = load_spec(write_spec(api={"base_url": url}))
    with pytest.raises(RunHalted, match="cannot reach"):
        await run_job(spec)


# -- the money promises at the edges ----------------------------------------------------


async def test_cut_off_repairs_are_reserved_and_stay_within_the_budget(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Repairs of cut-off answers (a longer prompt, twice the max_tokens) reserve their own worst case: never over budget."""
    async with Sandbox() as sandbox:
        spec = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 200),
                response_format=TRIAGE,
                params={"max_tokens": 30},
                concurrency=8,
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec, RunSettings(max_cost_usd=Decimal("0.002")))
    assert outcome.report.halted and "budget" in outcome.report.halted
    assert sandbox.stats.charged_usd <= Decimal("0.002")
    assert outcome.report.summary.cost_usd == sandbox.stats.charged_usd


async def test_a_run_stopped_mid_row_records_the_attempts_it_paid_for(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Rows the budget stopped between an answer and its repair are kept as pending with their bill:
    the summary, the checkpoint and `status` all say what the account was charged."""
    config = SandboxConfig(faults={"schema_violation": 1.0})
    async with Sandbox(config) as sandbox:
        spec = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 200),
                response_format=TRIAGE,
                concurrency=8,
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec, RunSettings(max_cost_usd=Decimal("0.0015")))
    assert outcome.report.halted
    with Store.open(spec.checkpoint_path()) as store:
        pending = {key: bill for key, (_, bill) in store.unfinished([f"T-{i}" for i in range(200)]).items()}
        spent = store.spent_usd(spec.server(sandbox=False))
    assert any(bill.attempts == 1 and bill.cost_usd > 0 for bill in pending.values()), "a row stopped mid-repair"
    assert outcome.report.summary.cost_usd == sandbox.stats.charged_usd == spent
    assert Decimal(job_status(spec)["cost_usd"]) == sandbox.stats.charged_usd


@pytest.mark.slow  # seconds of paced or multi-process runs: the long set (CI's second step)
async def test_a_budget_is_not_stranded_by_the_reservations_in_flight(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """With max_tokens 4000 the worst cases in flight exceed the budget; the run waits for them to settle
    and uses at least 80% of the budget, never more than all of it."""
    async with Sandbox() as sandbox:
        spec = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 2000),
                params={"max_tokens": 4000},
                concurrency=16,
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec, RunSettings(max_cost_usd=Decimal("0.02")))
    assert outcome.report.halted and "budget of $0.02 reached" in outcome.report.halted
    assert Decimal("0.016") <= sandbox.stats.charged_usd <= Decimal("0.02")


async def test_hostile_reported_costs_are_replaced_by_computed_ones(
    write_spec: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A usage.cost of -15 or 1e30 is not used: the cost is computed from prices (and matches what was
    charged), cost_source says so, a warning names the generation, and the output is still written."""
    config = SandboxConfig(faults={"negative_cost": 0.25, "absurd_cost": 0.25}, seed=3)
    async with Sandbox(config) as sandbox:
        spec = load_spec(write_spec(input=rows_csv(tmp_path, 40), api={"base_url": sandbox.base_url}))
        outcome = await run_job(spec)
    output = pl.read_parquet(spec.output)
    assert output.height == 40 and outcome.output_rows == 40
    assert set(output["cost_source"]) == {"reported", "computed"}
    assert (output["cost_usd"] >= 0).all()
    assert abs(output["cost_usd"].sum() - sandbox.stats.charged_usd) < Decimal("0.000001")
    assert "is negative (generation gen-" in caplog.text and "is not believable (generation gen-" in caplog.text


async def test_malformed_replies_are_retried_and_every_answer_is_saved(write_spec: Callable[..., Path]) -> None:
    """Replies claiming 2^70 prompt tokens or content that is an object are errors for their row, retried;
    the checkpoint writer never sees them, and every row is saved."""
    config = SandboxConfig(faults={"huge_tokens": 0.2, "content_object": 0.2}, seed=1)
    async with Sandbox(config) as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        outcome = await run_job(spec, RunSettings(retry=RetryPolicy.immediate(10)))
    assert outcome.report.summary.ok == 12
    assert sandbox.stats.requests > 12, "some replies were malformed"
    assert pl.read_parquet(spec.output)["prompt_tokens"].max() < 1000


async def test_a_retried_row_keeps_what_its_failed_attempts_cost(write_spec: Callable[..., Path]) -> None:
    """A row that failed yesterday after billed attempts and is answered today shows both days' cost and attempts."""
    config = SandboxConfig(faults={"empty": 1.0}, bill_failed_answers=True)
    async with Sandbox(config) as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}, retry={"max_attempts": 2}))
        first = (
            await run_job(spec, RunSettings(retry=RetryPolicy.immediate(2), breaker=Breaker(threshold=1000)))
        ).report
        charged_first = sandbox.stats.charged_usd
        config.faults.clear()
        await run_job(spec)
    assert first.summary.failed == 12 and charged_first > 0
    output = pl.read_parquet(spec.output)
    assert output["status"].to_list() == ["ok"] * 12 and output["attempts"].to_list() == [3] * 12
    assert abs(output["cost_usd"].sum() - sandbox.stats.charged_usd) < Decimal("0.000001")
    assert Decimal(job_status(spec)["cost_usd"]) == sandbox.stats.charged_usd


async def test_tokens_of_every_billed_attempt_are_counted(write_spec: Callable[..., Path]) -> None:
    """Cut-off answers and their repairs: billed_*_tokens hold every attempt's tokens, and so does the summary."""
    async with Sandbox() as sandbox:
        spec = load_spec(
            write_spec(response_format=TRIAGE, params={"max_tokens": 30}, api={"base_url": sandbox.base_url})
        )
        report = (await run_job(spec)).report
    output = pl.read_parquet(spec.output)
    repaired = output.filter(pl.col("attempts") > 1)
    assert repaired.height >= 6, "most rows were cut off and repaired"
    assert (repaired["billed_prompt_tokens"] > repaired["prompt_tokens"]).all()
    once = output.filter(pl.col("attempts") == 1)
    assert (once["billed_prompt_tokens"] == once["prompt_tokens"]).all()
    assert output["billed_prompt_tokens"].sum() == sandbox.stats.prompt_tokens == report.summary.prompt_tokens
    assert output["billed_completion_tokens"].sum() == sandbox.stats.completion_tokens
    assert report.summary.completion_tokens == sandbox.stats.completion_tokens


async def test_a_full_disk_stops_the_run_and_keeps_every_paid_answer(
    write_spec: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint fills up (SQLite: database or disk is full): dispatch stops at once, the answers it
    could not save go to a spill file beside it, and the next run merges them, paying for no answer twice."""
    open_store = Store.open

    def full_soon(path: Path, **options: str) -> Store:
        store = open_store(path, **options)
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages + 4}")  # a few pages more, then SQLITE_FULL
        return store

    async with Sandbox(SandboxConfig(latency_s=0.005)) as sandbox:
        spec = load_spec(write_spec(input=rows_csv(tmp_path, 400), concurrency=8, api={"base_url": sandbox.base_url}))
        spill = spec.checkpoint_path().with_name(spec.checkpoint_path().name + ".unsaved.jsonl")
        monkeypatch.setattr(Store, "open", full_soon)
        first = await run_job(spec)
        assert first.report.halted and "cannot write the checkpoint" in first.report.halted
        assert first.unsaved > 0 and spill.exists()
        assert first.report.pending > 0, "dispatch stopped instead of buying answers it could not keep"
        monkeypatch.setattr(Store, "open", open_store)
        second = await run_job(spec)
    assert not spill.exists()
    assert second.report.resumed >= first.unsaved
    assert pl.read_parquet(spec.output).height == 400
    assert max(sandbox.stats.answered.values()) == 1, "no answer was paid for twice"


async def test_an_appended_row_that_widens_a_column_re_sends_nothing_else(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Appending a row with `2.5` under integers and `A100` under zero-padded ids sends that row only,
    and the model sees `02134` and `1` as written."""
    data = tmp_path / "scores.csv"
    data.write_text("id,zip,score\n0001,02134,1\n0002,10001,3\n")
    async with Sandbox(SandboxConfig(record_bodies=True)) as sandbox:
        spec = load_spec(
            write_spec(
                input="scores.csv", id_column="id", prompt="{zip} scored {score}", api={"base_url": sandbox.base_url}
            )
        )
        await run_job(spec)
        with data.open("a") as appended:
            appended.write("A100,x,2.5\n")
        await run_job(spec)
    assert sandbox.stats.requests == 3
    assert sandbox.stats.bodies[0]["messages"][-1]["content"] in ("02134 scored 1", "10001 scored 3")
    assert pl.read_parquet(spec.output)["id"].to_list() == ["0001", "0002", "A100"]


async def test_an_unknown_cost_is_never_shown_as_zero(
    write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No usage.cost and no prices: the summary, summary.json and status say the cost is unknown, not $0.00."""

    async def no_prices(client: Client, *_: object) -> PriceTable:
        return PriceTable([])

    monkeypatch.setattr(runner_module, "fetch_prices", no_prices)
    async with Sandbox(SandboxConfig(report_cost=False)) as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        report = (await run_job(spec)).report
    assert "cost: unknown" in report.summary.lines(wall_s=1.0, pending=0)
    summary = json.loads(spec.output.with_name("result.summary.json").read_text())
    assert summary["cost_unknown_rows"] == 12
    status = job_status(spec)
    assert status["cost_unknown_rows"] == 12
    assert format_cost(Decimal(status["cost_usd"]), status["cost_unknown_rows"]) == "unknown"
    assert format_cost(Decimal("1.5"), 1) == "at least $1.50"


# -- images, documents and audio ------------------------------------------------------------

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"


def image_job(tmp_path: Path, rows: list[tuple[str, str]], **changes: object) -> Path:
    """A one-model image job over `rows` of (id, photo) in tmp_path, its spec at tmp_path/job.yaml."""
    pl.DataFrame({"id": [r[0] for r in rows], "photo": [r[1] for r in rows]}).write_csv(tmp_path / "photos.csv")
    spec: dict[str, object] = {
        "name": "photos",
        "input": "photos.csv",
        "id_column": "id",
        "output": "out/photos.parquet",
        "models": ["openai/gpt-4o-mini"],
        "prompt": "What shape is this?",
        "images": ["photo"],
        "params": {"max_tokens": 40},
        **changes,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def copy_shapes(folder: Path, count: int) -> list[tuple[str, str]]:
    """The first `count` sample shape images copied into folder/img, as (id, relative path) rows."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for number in range(1, count + 1):
        name = f"img_{number:03d}.png"
        shutil.copy(SAMPLE / "shapes" / name, folder / "img" / name)
        rows.append((f"p{number}", f"img/{name}"))
    return rows


async def test_the_image_labeling_job_sends_valid_parts_and_writes_typed_columns(tmp_path: Path) -> None:
    """jobs/label_shapes.yaml on the sandbox: every body validates against ChatRequest with its image part
    (a base64 PNG data URL), and the answers land in typed columns."""
    job = SAMPLE.parent / "jobs" / "label_shapes.yaml"
    async with Sandbox(SandboxConfig(record_bodies=True)) as sandbox:
        overrides = {
            "output": str(tmp_path / "shapes.parquet"),
            "checkpoint": str(tmp_path / "shapes.sqlite"),
            "api": {"base_url": sandbox.base_url},
        }
        outcome = await run_job(load_spec(job, overrides=overrides))
    assert outcome.report.summary.ok == 72 and sandbox.stats.images == 72
    for body in sandbox.stats.bodies:
        assert openapi.validation_errors("ChatRequest", body) == []
        text, image = body["messages"][0]["content"]
        assert text["type"] == "text" and image["type"] == "image_url"
        assert image["image_url"]["detail"] == "low"
        assert image["image_url"]["url"].startswith("data:image/png;base64,iVBORw0KGgo")
    output = pl.read_parquet(tmp_path / "shapes.parquet")
    assert output.schema["shape"] == pl.Enum(["circle", "square", "triangle"])
    assert output.schema["colour"] == pl.Enum(["red", "green", "blue", "yellow", "other"])
    right = output.filter(pl.col("shape").cast(pl.String) == pl.col("expected_shape")).height
    assert right > 50  # the sandbox sees the shapes; each model gets most of them right


async def test_replacing_one_image_resends_exactly_one_request_and_moving_the_folder_none(tmp_path: Path) -> None:
    """The checkpoint knows images by content: a rerun sends nothing, replacing one file re-asks its row alone,
    and the whole job moved to another folder re-asks nothing."""
    folder = tmp_path / "job"
    rows = copy_shapes(folder, 6)
    async with Sandbox() as sandbox:
        job = image_job(folder, rows, api={"base_url": sandbox.base_url})
        await run_job(load_spec(job))
        assert sandbox.stats.requests == 6
        await run_job(load_spec(job))
        assert sandbox.stats.requests == 6
        shutil.copy(SAMPLE / "shapes" / "img_020.png", folder / "img" / "img_003.png")
        outcome = await run_job(load_spec(job))
        assert sandbox.stats.requests == 7 and outcome.report.summary.done == 1
        moved = tmp_path / "elsewhere"
        shutil.move(folder, moved)
        outcome = await run_job(load_spec(moved / "job.yaml"))
    assert sandbox.stats.requests == 7 and outcome.report.resumed == 6


async def test_each_row_file_problem_fails_its_row_with_nothing_sent(tmp_path: Path) -> None:
    """A missing file, one that cannot be read, a folder, a file that is no image, one over the size limit, an
    http URL and an empty cell each fail their own row with a clear error, cost nothing and send nothing; the good row is answered."""
    rows = copy_shapes(tmp_path, 1)
    (tmp_path / "img" / "folder.png").mkdir()
    (tmp_path / "img" / "bitmap.png").write_bytes(b"BM" + b"\x00" * 100)
    (tmp_path / "img" / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 3000)
    problems = {
        "missing": ("img/nope.png", "img/nope.png: no such file"),
        "unreadable": ("img/img_001.png/inside.png", "cannot read it (Not a directory)"),
        "folder": ("img/folder.png", "img/folder.png is a folder"),
        "bitmap": ("img/bitmap.png", "is a image/bmp file, not a supported image; convert it to PNG"),
        "huge": ("img/huge.png", "over the 0.002 MB limit for images (media_limits_mb.image)"),
        "http": ("http://example.com/a.png", "is not https"),
        "empty": ("", "no image in this row (the cell is empty)"),
    }
    rows += [(name, cell) for name, (cell, _) in problems.items()]
    async with Sandbox() as sandbox:
        job = image_job(tmp_path, rows, media_limits_mb={"image": 0.002}, api={"base_url": sandbox.base_url})
        outcome = await run_job(load_spec(job))
    assert sandbox.stats.requests == 1
    assert outcome.report.summary.ok == 1 and outcome.report.summary.failed == len(problems)
    output = pl.read_parquet(tmp_path / "out" / "photos.parquet")
    for name, (_, says) in problems.items():
        row = output.filter(pl.col("id") == name).row(0, named=True)
        assert row["status"] == "failed" and says in row["error"] and "nothing was sent" in row["error"], row
        assert row["error"].startswith("photo: ")
        assert row["attempts"] == 0 and row["cost_usd"] == 0


async def test_an_endpoint_refusing_images_sends_the_row_to_its_fallback(tmp_path: Path) -> None:
    """A 404 "No endpoints found that support image input" is the model's problem: the fallback answers;
    with no fallback the row fails with the provider's words."""
    rows = copy_shapes(tmp_path, 3)
    config = SandboxConfig(refuse_inputs={"openai/gpt-4o-mini": {"image"}})
    async with Sandbox(config) as sandbox:
        job = image_job(tmp_path, rows, fallbacks=["google/gemini-2.0-flash-001"], api={"base_url": sandbox.base_url})
        outcome = await run_job(load_spec(job))
        assert outcome.report.summary.ok == 3
        output = pl.read_parquet(tmp_path / "out" / "photos.parquet")
        assert set(output["model"]) == {"google/gemini-2.0-flash-001"}
        job = image_job(
            tmp_path,
            rows,
            output="out/alone.parquet",
            checkpoint="out/alone.sqlite",
            api={"base_url": sandbox.base_url},
        )
        outcome = await run_job(load_spec(job))
    assert outcome.report.summary.failed == 3
    errors = pl.read_parquet(tmp_path / "out" / "alone.parquet")["error"]
    assert all("No endpoints found that support image input" in e for e in errors)


async def test_a_model_that_takes_no_images_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    """/models says what each model takes: an image job on a text-only model is refused up front, naming
    the model, the field and models that do take images."""
    rows = copy_shapes(tmp_path, 2)
    job = image_job(tmp_path, rows, models=["deepseek/deepseek-chat-v3-0324"])
    with pytest.raises(SpecError) as caught:
        await run_job(load_spec(job), RunSettings(sandbox=SandboxConfig()))
    assert not (tmp_path / "out" / "photos.checkpoint.sqlite").exists()  # refused before the checkpoint opened
    message = str(caught.value)
    assert "job.yaml:" in message and "models[0]" in message
    assert "'deepseek/deepseek-chat-v3-0324' takes no image input (it takes text)" in message
    assert "e.g. anthropic/" in message


@pytest.mark.parametrize("report_cost", [True, False])
async def test_image_costs_add_up_to_what_was_charged(tmp_path: Path, report_cost: bool) -> None:
    """Per-image prices count: the run's cost equals what the sandbox charged, reported or computed from /models."""
    rows = copy_shapes(tmp_path, 4)
    async with Sandbox(SandboxConfig(report_cost=report_cost)) as sandbox:
        outcome = await run_job(load_spec(image_job(tmp_path, rows, api={"base_url": sandbox.base_url})))
    assert sandbox.stats.charged_usd > Decimal("0.007225") * 4  # the images are most of it
    assert outcome.report.summary.cost_usd == sandbox.stats.charged_usd


async def test_images_as_parquet_bytes_and_audio_files(tmp_path: Path) -> None:
    """A Parquet binary column is sent as base64 images; a WAV file as input_audio with its format read from it."""
    png = (SAMPLE / "shapes" / "img_001.png").read_bytes()
    wav = (
        b"RIFF"
        + (36 + 32000).to_bytes(4, "little")
        + b"WAVEfmt "
        + bytes.fromhex("10000000010001003e0000007d00000200100064617461")
        + (32000).to_bytes(4, "little")
        + b"\x00" * 32000
    )
    (tmp_path / "call.wav").write_bytes(wav)
    pl.DataFrame({"id": ["a", "b"], "photo": [png, png], "call": ["call.wav", "call.wav"]}).write_parquet(
        tmp_path / "rows.parquet"
    )
    async with Sandbox(SandboxConfig(record_bodies=True)) as sandbox:
        job = image_job(
            tmp_path,
            [],
            input="rows.parquet",
            models=["google/gemini-2.0-flash-001"],
            audio=["call"],
            api={"base_url": sandbox.base_url},
        )
        outcome = await run_job(load_spec(job))
    assert outcome.report.summary.ok == 2
    parts = sandbox.stats.bodies[0]["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "input_audio"]
    assert parts[1]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(png).decode()
    assert parts[2]["input_audio"]["format"] == "wav"
    output = pl.read_parquet(tmp_path / "out" / "photos.parquet")
    assert output["photo"].to_list() == [png, png]
    assert output["prompt_tokens"][0] > 32  # a second of audio counts 32 tokens, on top of the text and image


async def test_samples_three_then_five_sends_three_n_then_two_n(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """samples: k asks each (row, model) k times, each its own checkpoint entry with its own seed; raising k
    sends only the new samples; the output has a sample column; dedupe never merges samples."""
    async with Sandbox(SandboxConfig(record_bodies=True)) as sandbox:
        changes = {
            "input": rows_csv(tmp_path, 6),
            "params": {"max_tokens": 20, "seed": 7},
            "api": {"base_url": sandbox.base_url},
        }
        await run_job(load_spec(write_spec(samples=3, **changes)))
        assert sandbox.stats.requests == 18
        assert sorted({body["seed"] for body in sandbox.stats.bodies}) == [7, 8, 9]
        spec = load_spec(write_spec(samples=5, **changes))
        outcome = await run_job(spec)
    assert sandbox.stats.requests == 18 + 12 and outcome.report.resumed == 18
    assert sorted({body["seed"] for body in sandbox.stats.bodies[18:]}) == [10, 11]
    output = pl.read_parquet(spec.output)
    assert output.height == 30 and output["sample"].to_list()[:5] == [0, 1, 2, 3, 4]
    assert output.columns.index("sample") < output.columns.index("model")
    assert output.filter(pl.col("deduped_from").is_not_null()).is_empty()


async def test_a_streamed_run_with_broken_streams_ends_every_row_with_costs_equal_to_the_ledger(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """stream: true with a fifth of the streams breaking mid-answer (an error chunk) and a tenth cut off: every row
    ends answered or failed with a reason, answered rows have ttft_s, and the cost is what the sandbox charged,
    plus each cut-off stream at its worst case (what it generated until the cut may have been billed: the
    sandbox bills nothing for it, a real server may)."""
    config = SandboxConfig(faults={"stream_error": 0.2, "stream_cut": 0.1}, seed=3)
    async with Sandbox(config) as sandbox:
        spec = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 60),
                params={"max_tokens": 60, "stream": True},
                retry={"max_attempts": 3},
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec, RunSettings(retry=RetryPolicy.immediate(max_attempts=3)))
    output = pl.read_parquet(spec.output)
    assert output.height == 60 and outcome.report.pending == 0
    assert sandbox.stats.statuses[200] > 60, "broken streams were asked again"
    ok = output.filter(pl.col("status") == "ok")
    assert ok.height > 50 and ok["ttft_s"].is_not_null().all() and (ok["ttft_s"] <= ok["latency_s"]).all()
    failed = output.filter(pl.col("status") == "failed")
    assert failed["error"].str.contains("mid-answer|cut off").all()
    estimated = output.filter(pl.col("cost_source") == "estimated")
    most_per_cut = (len("Ticket T-00: text 00") + 16) * Decimal("0.00000015") + 60 * Decimal("0.0000006")
    cost = outcome.report.summary.cost_usd
    assert estimated.height > 0 and sandbox.stats.charged_usd < cost
    assert cost <= sandbox.stats.charged_usd + int(estimated["attempts"].sum()) * most_per_cut


@pytest.mark.slow  # seconds of paced or multi-process runs: the long set (CI's second step)
async def test_the_key_the_models_and_the_endpoints_are_asked_for_in_one_round_trip(
    write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before its first completion a run asks GET /key, /models and each model's endpoints: with every request
    0.3 s away (a far server), all three leave before any answer is back, so the run waits one round trip for
    them, not three; and a rejected key still stops the run with the key's own message."""
    from aiohttp import web

    arrived: list[tuple[float, str]] = []
    network = Sandbox._network

    @web.middleware
    async def recording(self: Sandbox, request: web.Request, handler: Any) -> web.StreamResponse:
        arrived.append((asyncio.get_running_loop().time(), request.path))
        return await network(self, request, handler)

    monkeypatch.setattr(Sandbox, "_network", recording)
    async with Sandbox(SandboxConfig(round_trip_s=0.3)) as sandbox:
        spec = load_spec(
            write_spec(models=["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"], api={"base_url": sandbox.base_url})
        )
        await run_job(spec)
    first = [when for when, path in arrived if not path.endswith("/completions")]
    assert len(first) == 4 and max(first) - min(first) < 0.3, arrived[:4]
    async with Sandbox(SandboxConfig(round_trip_s=0.05, require_key=True)) as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        monkeypatch.setenv("OPENROUTER_API_KEY", "not-a-key")
        with pytest.raises(RunHalted, match="API key"):
            await run_job(spec)


async def test_a_prompt_longer_than_the_context_is_reserved_at_what_it_would_be_billed(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Servers bill the prompt they were sent: a 700 KB cell may cost $0.10 at gpt-4o-mini's price, more than the
    $0.05 budget, so that row fails unsent; a 5 MB cell (at least 160k tokens, past the 128k context) is refused
    unsent; the short rows are answered; the sandbox charges within the budget."""
    texts = ["short one", "x" * 700_000, "y " * 2_600_000, "short two"]
    pl.DataFrame({"ticket_id": [f"T-{i}" for i in range(4)], "text": texts}).write_csv(tmp_path / "long.csv")
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(input="long.csv", prompt="{text}", api={"base_url": sandbox.base_url}))
        outcome = await run_job(spec, RunSettings(max_cost_usd=Decimal("0.05")))
    assert sandbox.stats.requests == 2 and sandbox.stats.charged_usd <= Decimal("0.05")
    output = pl.read_parquet(spec.output).sort("ticket_id")
    assert output["status"].to_list() == ["ok", "failed", "failed", "ok"]
    over_budget, past_context = output["error"].to_list()[1:3]
    assert "more than the whole budget of $0.05 (nothing was sent)" in over_budget
    assert "more than openai/gpt-4o-mini's context of 128,000" in past_context
    assert output["attempts"].to_list() == [1, 0, 0, 1] and outcome.report.summary.cost_usd == sandbox.stats.charged_usd


@pytest.mark.parametrize("answer", [{"data": []}, {"data": "unlimited"}, {"data": {}}])
async def test_a_server_answering_key_with_nothing_we_read_is_not_paced_as_openrouter(
    write_spec: Callable[..., Path], answer: dict[str, Any]
) -> None:
    """A server that is not OpenRouter and answers GET /key with JSON of no shape we know has said nothing of a
    rate limit: the run is not paced at OpenRouter's surge limit (500/s) as if it were a key without a credit limit."""
    from helpers.scripted import Reply, Scripted

    async with Scripted(gets={"/key": [Reply(200, answer)]}) as server, Client(server.base_url) as client:
        spec = load_spec(write_spec(api={"base_url": server.base_url}))
        limits, _ = await runner_module.plan_limits(spec, client, None)
    assert limits.pacer.rate_rps == float("inf")
