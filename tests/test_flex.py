"""service_tier flex: about half the price, slower, and never a silent fall back to the default tier.

A row records the tier that served it (`service_tier`, from the response) and is priced at that tier (its
endpoint's price, when the server reports no cost); `estimate` shows the flex price beside the live and batch
ones; a flex capacity error is asked again within the row's attempts, never answered at the full price instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from batchrunner.client import classify
from batchrunner.errors import RateLimited
from batchrunner.queries import estimate_job
from batchrunner.retries import RetryPolicy
from batchrunner.runner import RunSettings, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec

FLEXIBLE, STANDARD_ONLY = "openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"  # the second has no flex tier
TINY = Decimal("1E-12")  # the sandbox bills floats: their decimal repr is exact to this


@pytest.mark.parametrize("stream", [False, True])
async def test_a_flex_job_is_priced_at_the_tier_that_served_each_row_and_records_it(
    write_spec: Callable[..., Path], caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    """Without usage.cost, a flex row of a model with a flex tier is priced at its flex endpoint's price (half), and
    a row of a model without one at the standard price, as each was billed; service_tier says which tier served
    each row, and the standard one is announced (a warning), never silent."""
    params: dict[str, Any] = {"max_tokens": 50, "service_tier": "flex", **({"stream": True} if stream else {})}
    async with Sandbox(SandboxConfig(report_cost=False)) as sandbox:
        spec = load_spec(
            write_spec(models=[FLEXIBLE, STANDARD_ONLY], params=params, api={"base_url": sandbox.base_url})
        )
        outcome = await run_job(spec)
    output = pl.read_parquet(spec.output)
    assert outcome.report.summary.ok == 24 and set(output["cost_source"]) == {"computed"}
    tiers = dict(zip(output["requested_model"], output["service_tier"], strict=True))
    assert tiers == {FLEXIBLE: "flex", STANDARD_ONLY: "default"}
    assert sandbox.stats.tiers == {"flex": 12, "default": 12}
    assert abs(output["cost_usd"].sum() - sandbox.stats.charged_usd) < TINY
    assert f"{STANDARD_ONLY!r} has no flex endpoint" in caplog.text
    flex_json = outcome.report.summary.to_json(wall_s=1, pending=0, resumed=0, stopped=None)
    assert flex_json["models"][FLEXIBLE]["service_tiers"] == {"flex": 12}


def test_estimate_shows_the_flex_price_beside_the_live_and_batch_ones(write_spec: Callable[..., Path]) -> None:
    """`estimate` gives the flex tier's expected cost: a model with a flex tier at its flex endpoint's price (half),
    one without at its standard price (how OpenRouter serves it); the text says it beside live and batch."""
    from batchrunner.cli import main

    path = write_spec(models=[FLEXIBLE, STANDARD_ONLY])
    estimate = asyncio.run(estimate_job(load_spec(path), sandbox=SandboxConfig()))
    live = {model: Decimal(entry["expected_cost_usd"]) for model, entry in estimate["models"].items()}
    flex = {model: Decimal(entry["expected_flex_cost_usd"]) for model, entry in estimate["models"].items()}
    assert flex[FLEXIBLE] == live[FLEXIBLE] / 2 and flex[STANDARD_ONLY] == live[STANDARD_ONLY]
    assert [estimate["models"][model]["flex_tier"] for model in (FLEXIBLE, STANDARD_ONLY)] == [True, False]
    assert Decimal(estimate["expected_flex_cost_usd"]) == sum(flex.values())
    text = CliRunner().invoke(main, ["estimate", str(path), "--sandbox"]).output
    assert "at the flex tier (params.service_tier: flex" in text, text
    assert "as a batch" in text and "expected cost" in text


async def test_a_flex_capacity_error_is_asked_again_and_never_answered_at_full_price(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Half of flex requests find no capacity (a 429): each is asked again, still for flex, within the row's
    attempts; every answer is a flex one at the flex price, none from the default tier; a row whose attempts all
    found no capacity fails saying so."""
    rows = tmp_path / "rows.csv"
    pl.DataFrame({"ticket_id": [f"T-{i}" for i in range(40)], "text": [f"text {i}" for i in range(40)]}).write_csv(rows)
    config = SandboxConfig(faults={"flex_capacity": 0.5}, seed=7, retry_after_s=0, record_bodies=True)
    params = {"max_tokens": 50, "service_tier": "flex"}
    async with Sandbox(config) as sandbox:
        spec = load_spec(
            write_spec(input=rows.name, params=params, retry={"max_attempts": 3}, api={"base_url": sandbox.base_url})
        )
        outcome = await run_job(spec, RunSettings(retry=RetryPolicy.immediate(3)))
    output = pl.read_parquet(spec.output)
    ok, failed = output.filter(pl.col("status") == "ok"), output.filter(pl.col("status") == "failed")
    assert sandbox.stats.statuses[429] > 0 and len(sandbox.stats.bodies) == sandbox.stats.requests
    assert all(body["service_tier"] == "flex" for body in sandbox.stats.bodies), "every attempt asked for flex"
    assert sandbox.stats.tiers == {"flex": ok.height} and set(ok["service_tier"]) == {"flex"}
    assert (ok["attempts"] > 1).any(), "some rows were answered on a later attempt"
    assert ok.height + failed.height == 40 == outcome.report.summary.done
    assert failed.height > 0, "some rows found no capacity on every attempt"
    assert all("no capacity now; asked again later, never at the default tier" in error for error in failed["error"])
    assert (failed["attempts"] == 3).all() and failed["cost_usd"].sum() == 0
    assert abs(output["cost_usd"].sum() - sandbox.stats.charged_usd) < TINY


@pytest.mark.parametrize("status", [429, 503])
def test_a_flex_capacity_error_is_a_retry_later(status: int) -> None:
    """An error whose availability names the service_tier constraint (capacity_exhausted, temporarily_unavailable)
    is a flex capacity error: asked again later (a rate limit of the model's provider), and says flex does not fall
    back."""
    code = "capacity_exhausted" if status == 429 else "temporarily_unavailable"
    availability = {"code": code, "retryable": True, "constraint": {"field": "service_tier", "detail": "flex"}}
    error = classify(status, {"error": {"code": status, "message": "No capacity", "availability": availability}})
    assert isinstance(error, RateLimited) and error.code == "flex_capacity" and error.status == status
    assert "flex" in str(error) and "default tier" in str(error)
    plain = classify(429, {"error": {"code": 429, "message": "Rate limit exceeded"}})
    assert plain.code == "rate_limited"


async def test_a_request_for_a_dearer_tier_reserves_at_its_price(
    write_spec: Callable[..., Path], tickets_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flex request reserves at the standard price (served there when flex has no endpoint), a priority request at
    its tier endpoint's price when that is dearer: a budget never holds less than the tier it asks may bill."""
    from helpers.scripted import Reply, Scripted

    from batchrunner.costs import Budget

    seen: list[Decimal] = []
    reserve = Budget.reserve
    monkeypatch.setattr(Budget, "reserve", lambda self, amount: seen.append(amount) or reserve(self, amount))
    prices = {"prompt": "0.000001", "completion": "0.000002"}
    listing = {"data": [{"id": FLEXIBLE, "pricing": prices, "context_length": 1000}]}
    endpoint = {"tag": "p", "supported_parameters": ["max_tokens"], "pricing": prices, "service_tier": None}
    tiers = [
        endpoint,
        {
            **endpoint,
            "tag": "p/flex",
            "service_tier": "flex",
            "pricing": {"prompt": "0.0000005", "completion": "0.000001"},
        },
        {
            **endpoint,
            "tag": "p/priority",
            "service_tier": "priority",
            "pricing": {"prompt": "0.000002", "completion": "0.000004"},
        },
    ]
    gets = {
        "/models": [Reply(200, listing)],
        f"/models/{FLEXIBLE}/endpoints": [Reply(200, {"data": {"endpoints": tiers}})],
    }
    tickets_csv.write_text("ticket_id,subject,text\nT-0,s,t\n")
    reserved = {}
    async with Scripted(gets=gets) as server:
        for tier in ("default", "flex", "priority"):
            spec = load_spec(
                write_spec(params={"max_tokens": 50, "service_tier": tier}, api={"base_url": server.base_url})
            )
            await run_job(spec, RunSettings(max_cost_usd=Decimal(1), fresh=True))
            reserved[tier] = seen.pop()
    assert reserved["flex"] == reserved["default"] and reserved["priority"] == 2 * reserved["default"]
