"""BYOK: with a provider key of the user's own, usage.cost is only OpenRouter's fee, and the provider bills the rest.

A row's `cost_usd` is the whole of what it cost (the fee plus the provider's `upstream_inference_cost`),
`upstream_cost_usd` the provider's part; the budget, its reservations, the summary and the batch discount all
count the whole. Every test talks to the sandbox in its BYOK mode (or a scripted server) over loopback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from helpers.scripted import Reply, Scripted, answer

from batchrunner.breaker import Breaker
from batchrunner.costs import format_usd
from batchrunner.files import summary_path
from batchrunner.retries import RetryPolicy
from batchrunner.runner import RunSettings, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec
from batchrunner.store import Store

MICRO = Decimal("0.000001")


def rows_csv(tmp_path: Path, n: int) -> str:
    path = tmp_path / f"rows{n}.csv"
    pl.DataFrame({"ticket_id": [f"T-{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)]}).write_csv(path)
    return path.name


@pytest.mark.parametrize("stream", [False, True])
async def test_a_byok_rows_cost_is_the_fee_plus_what_the_provider_billed(
    write_spec: Callable[..., Path], stream: bool
) -> None:
    """Each BYOK row's cost_usd is OpenRouter's fee plus the provider's upstream cost (upstream_cost_usd), reported;
    the output, the summary, its JSON and `status` add up to what the user was billed, not to the fees alone."""
    from batchrunner.offline import job_status

    async with Sandbox(SandboxConfig(byok=True)) as sandbox:
        params = {"temperature": 0, "max_tokens": 50, **({"stream": True} if stream else {})}
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}, params=params))
        outcome = await run_job(spec)
    output = pl.read_parquet(spec.output)
    charged, upstream = sandbox.stats.charged_usd, sandbox.stats.byok_upstream_usd
    assert outcome.report.summary.ok == 12 and set(output["cost_source"]) == {"reported"}
    assert output["cost_usd"].sum() == charged == outcome.report.summary.cost_usd
    assert output["upstream_cost_usd"].sum() == upstream == outcome.report.summary.upstream_cost_usd
    for cost, part in zip(output["cost_usd"], output["upstream_cost_usd"], strict=True):
        assert abs(cost - part * Decimal("1.05")) < MICRO / 1000, "the fee is 5% of the provider's part"
    said = "\n".join(outcome.report.summary.lines(wall_s=1, pending=0))
    assert f"billed by providers to your own keys (BYOK), {format_usd(charged - upstream)} by OpenRouter" in said
    written = json.loads(summary_path(spec.output).read_text())
    assert Decimal(written["cost_usd"]) == charged and Decimal(written["upstream_cost_usd"]) == upstream
    assert Decimal(job_status(spec)["cost_usd"]) == charged


async def test_a_byok_budget_counts_both_parts_and_is_never_passed(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """A $0.05 budget on BYOK answers stops before the fees plus the providers' bills pass it, having used most of it
    (counting the fees alone, it would have let every row go, at many times the budget)."""
    async with Sandbox(SandboxConfig(byok=True)) as sandbox:
        spec = load_spec(
            write_spec(input=rows_csv(tmp_path, 300), models=["openai/gpt-4o"], api={"base_url": sandbox.base_url})
        )
        outcome = await run_job(spec, RunSettings(max_cost_usd=Decimal("0.05")))
    report = outcome.report
    assert report.halted and "budget of $0.05 reached" in report.halted
    assert 0 < report.pending < 300
    assert Decimal("0.045") <= sandbox.stats.charged_usd <= Decimal("0.05")
    assert report.summary.cost_usd == sandbox.stats.charged_usd


@pytest.mark.parametrize("learned", [False, True])
async def test_each_reservation_holds_the_byok_fee_on_top_of_the_worst_case(
    write_spec: Callable[..., Path], reservations: list[Decimal], learned: bool
) -> None:
    """Each request reserves its worst case plus 5.5% for OpenRouter's fee: from the first request where the
    server may bill BYOK (the sandbox in BYOK mode, as OpenRouter), and, on another server, from the first
    BYOK answer on (learned: concurrency 1, so every later request knows). The same job on plain answers
    reserves the worst cases alone."""
    seen = reservations
    spec = load_spec(write_spec(concurrency=1))
    await run_job(spec, RunSettings(max_cost_usd=Decimal(100), sandbox=SandboxConfig(), fresh=True))
    plain, seen[:] = list(seen), []
    if learned:  # another server that answers BYOK: the fee is learned from its first answer
        async with Sandbox(SandboxConfig(byok=True)) as sandbox:
            spec = load_spec(write_spec(concurrency=1, api={"base_url": sandbox.base_url}))
            await run_job(spec, RunSettings(max_cost_usd=Decimal(100), fresh=True))
    else:  # the in-process sandbox in BYOK mode: known before the first request
        await run_job(spec, RunSettings(max_cost_usd=Decimal(100), sandbox=SandboxConfig(byok=True), fresh=True))
    assert len(plain) == len(seen) == 12
    fee = [Decimal(1) if learned and i == 0 else Decimal("1.055") for i in range(12)]
    assert seen == [worst * share for worst, share in zip(plain, fee, strict=True)]


MODEL = "openai/gpt-4o-mini"
PRICED = {
    "/models": [
        Reply(
            200,
            {
                "data": [
                    {
                        "id": MODEL,
                        "pricing": {"prompt": "0.00000015", "completion": "0.0000006"},
                        "context_length": 128000,
                        "top_provider": {"max_completion_tokens": 16384},
                    }
                ]
            },
        )
    ]
}


def byok_answer(fee: float | None, upstream: float | None) -> dict[str, Any]:
    """An answer of 10 prompt and 2 completion tokens through the user's own key: `fee` and `upstream` as reported."""
    body = answer(cost_usd=fee)
    details = {} if upstream is None else {"upstream_inference_cost": upstream}
    body["usage"].update(is_byok=True, cost_details=details)
    return body


@pytest.mark.parametrize(
    ("fee", "upstream", "expected", "source"),
    [
        # a fee under ten times the worst case ($0.000027) with an upstream cost far above: the total is judged
        (0.00001, 0.0002, (10 * Decimal("0.00000015") + 2 * Decimal("0.0000006")) * Decimal("1.055"), "computed"),
        # the fee waived (OpenRouter's free BYOK requests) and no upstream cost: the provider's part from prices
        (0, None, 10 * Decimal("0.00000015") + 2 * Decimal("0.0000006"), "computed"),
        # both believable: reported as they are
        (0.000000135, 0.0000027, Decimal("0.000002835"), "reported"),
    ],
)
async def test_a_byok_answers_cost_is_judged_whole(
    write_spec: Callable[..., Path],
    tickets_csv: Path,
    caplog: pytest.LogCaptureFixture,
    fee: float,
    upstream: float | None,
    expected: Decimal,
    source: str,
) -> None:
    """The 10x check on a reported cost judges a BYOK answer's fee plus upstream cost, not the fee alone (an absurd
    total is computed from prices, with the fee, and a warning); a missing upstream cost is computed from prices."""
    tickets_csv.write_text("ticket_id,subject,text\nT-0,s,t\n")
    async with Scripted([Reply(200, byok_answer(fee, upstream))], gets=PRICED) as server:
        spec = load_spec(write_spec(api={"base_url": server.base_url}))
        outcome = await run_job(spec)
    output = pl.read_parquet(spec.output)
    assert outcome.report.summary.ok == 1
    assert output["cost_source"].to_list() == [source] and output["cost_usd"].to_list() == [expected]
    assert ("far above what the prices allow" in caplog.text) == (upstream == 0.0002)


async def test_a_byok_pending_rows_bill_is_kept_whole_across_runs(write_spec: Callable[..., Path]) -> None:
    """A BYOK row whose attempts were billed and failed keeps both parts of its bill in the checkpoint: the next run
    starts from them, and its output counts every attempt's fee and upstream cost."""
    config = SandboxConfig(byok=True, faults={"empty": 1.0}, bill_failed_answers=True)
    async with Sandbox(config) as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}, retry={"max_attempts": 2}))
        first = await run_job(spec, RunSettings(retry=RetryPolicy.immediate(2), breaker=Breaker(threshold=1000)))
        with Store.open(spec.checkpoint_path()) as store:
            earlier = store.unfinished([f"T-{i}" for i in range(12)])
        config.faults.clear()
        await run_job(spec)
    assert first.report.summary.failed == 12
    assert all(bill.upstream_usd for _, bill in earlier.values())
    output = pl.read_parquet(spec.output)
    assert output["status"].to_list() == ["ok"] * 12
    assert output["cost_usd"].sum() == sandbox.stats.charged_usd
    assert output["upstream_cost_usd"].sum() == sandbox.stats.byok_upstream_usd


async def test_a_byok_batch_discount_is_set_against_the_whole_cost(write_spec: Callable[..., Path]) -> None:
    """In batch mode on BYOK answers at half price, the discount shown (batch_saved_usd) is what the live requests
    would have cost more, fee and upstream both: as much as was paid, not the live price less the fees."""
    async with Sandbox(SandboxConfig(byok=True)) as sandbox:
        spec = load_spec(write_spec(mode="batch", api={"base_url": sandbox.base_url}))
        outcome = await run_job(spec)
    paid = outcome.report.summary.cost_usd
    assert outcome.report.summary.ok == 12 and paid == sandbox.stats.charged_usd
    assert outcome.report.batch_saved_usd is not None
    assert abs(outcome.report.batch_saved_usd - paid) < MICRO / 1000, "half price: saved as much as was paid"


async def test_a_cancelled_byok_batch_counts_what_the_providers_billed_too(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """A BYOK batch cancelled half-way reports in usage.cost only OpenRouter's fees for what it finished: the job
    records the providers' part too (its tokens at the live price, the most it can be), never the fees alone."""
    from batchrunner.offline import job_status
    from batchrunner.queries import cancel_batches

    class Clock:
        now_s = 1_000_000.0

        def __call__(self) -> float:
            return self.now_s

    clock = Clock()
    config = SandboxConfig(byok=True, batch_turnaround_s=100, batch_clock=clock, batch_cancel_delay_s=0)
    async with Sandbox(config) as sandbox:
        spec = load_spec(write_spec(mode="batch", api={"base_url": sandbox.base_url}))
        await run_job(spec, RunSettings(wait=False))
        clock.now_s += 50
        assert len((await cancel_batches(spec)).cancelling) == 1
        cancelled_upstream = sandbox.stats.byok_upstream_usd  # at the batch price, half the live one
        clock.now_s += 1
        sandbox.config.batch_turnaround_s = 0
        rerun = await run_job(spec)
    assert rerun.report.summary.ok == 12 and cancelled_upstream > 0
    spent = Decimal(job_status(spec)["cost_usd"])
    assert abs(spent - (sandbox.stats.charged_usd + cancelled_upstream)) < MICRO / 1000
