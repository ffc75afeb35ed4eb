"""`prices:` in the spec: what a model costs where the server does not say (LiteLLM, vLLM, llama-server)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from helpers.scripted import Reply, Scripted, answer

from batchrunner.errors import SpecError
from batchrunner.runner import RunSettings, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec

MODEL = "openai/gpt-4o-mini"
UNPRICED = {"/models": [Reply(200, {"data": [{"id": MODEL, "object": "model"}]})]}  # LiteLLM's /models: no pricing


def priced(prompt: str, completion: str) -> dict[str, Any]:
    return {MODEL: {"prompt_per_mtok_usd": prompt, "completion_per_mtok_usd": completion}}


async def test_a_budget_runs_on_a_server_without_prices_given_the_specs(write_spec: Callable[..., Path]) -> None:
    """A server whose /models has no prices but which reports usage.cost runs a budgeted job once the spec prices
    its model (refused without them); the reported cost is what is kept."""
    replies = [Reply(200, answer(cost_usd=0.00002)) for _ in range(12)]
    async with Scripted(replies, gets=UNPRICED) as server:
        api = {"base_url": server.base_url}
        with pytest.raises(SpecError, match=r"no prices for openai/gpt-4o-mini .* `prices:`"):
            await run_job(load_spec(write_spec(budget_usd=5, api=api)))
        assert server.bodies == []
        outcome = await run_job(load_spec(write_spec(budget_usd=5, prices=priced("0.15", "0.60"), api=api)))
    assert outcome.report.stop is None and outcome.report.summary.ok == 12
    output = pl.read_parquet(outcome.output_path)
    assert set(output["cost_source"]) == {"reported"} and output["cost_usd"].sum() == Decimal("0.00024")


async def test_spec_prices_compute_costs_and_reserve_the_budget(write_spec: Callable[..., Path]) -> None:
    """Without usage.cost, each answer's cost is its tokens at the spec's prices, exactly; and a budget that
    the worst case at those prices does not fit sends nothing (each row fails, unsent, saying so)."""
    async with Scripted(gets=UNPRICED) as server:  # every answer: 10 prompt and 2 completion tokens, no cost
        api = {"base_url": server.base_url}
        computed = await run_job(load_spec(write_spec(budget_usd=5, prices=priced("2", "8"), api=api)))
        assert len(server.bodies) == 12
        dear = load_spec(write_spec(prices=priced("1000000", "1000000"), api=api, output="out/dear.parquet"))
        stopped = await run_job(
            dear, RunSettings(max_cost_usd=Decimal(1))
        )  # $1 a token: 50 answer tokens do not fit $1
        assert len(server.bodies) == 12, "nothing was sent past the budget"
    output = pl.read_parquet(computed.output_path)
    assert set(output["cost_source"]) == {"computed"}
    assert output["cost_usd"].to_list() == [Decimal("0.000036")] * 12  # 10 x $2/M + 2 x $8/M
    assert stopped.report.summary.failed == 12
    assert all("more than the whole budget of $1.00" in error for error in pl.read_parquet(dear.output)["error"])


async def test_the_servers_own_price_wins_over_the_specs(
    write_spec: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Where the server lists a price, that price is used (it is what it bills) and the spec's different one is
    named in a warning."""
    caplog.set_level(logging.WARNING, logger="batchrunner")
    async with Sandbox(SandboxConfig(report_cost=False)) as sandbox:
        spec = load_spec(write_spec(prices=priced("1000", "1000"), api={"base_url": sandbox.base_url}))
        outcome = await run_job(spec)
    output = pl.read_parquet(outcome.output_path)
    assert output["cost_usd"].sum() == sandbox.stats.charged_usd
    assert f"prices.{MODEL}" in caplog.text and "the server's price is used" in caplog.text


@pytest.mark.parametrize(
    ("prices", "message"),
    [
        (
            {MODEL: {"prompt_per_mtok": 1, "completion_per_mtok_usd": 2}},
            f"prices.{MODEL}.prompt_per_mtok: unknown key; did you mean 'prompt_per_mtok_usd'?",
        ),
        ({MODEL: {"prompt_per_mtok_usd": -1, "completion_per_mtok_usd": 2}}, "greater than or equal to 0"),
        ({MODEL: {"prompt_per_mtok_usd": 1}}, f"prices.{MODEL}.completion_per_mtok_usd: required key is missing"),
        ({MODEL: {"prompt_per_mtok_usd": "cheap", "completion_per_mtok_usd": 2}}, "valid decimal"),
    ],
)
def test_prices_are_checked_like_every_other_key(
    write_spec: Callable[..., Path], prices: dict[str, Any], message: str
) -> None:
    """A misspelt, negative, missing or non-numeric price is refused with its line and the fix."""
    with pytest.raises(SpecError) as refused:
        load_spec(write_spec(prices=prices))
    assert message in str(refused.value) and "job.yaml:" in str(refused.value)
