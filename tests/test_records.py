"""Run totals: exact cost, counts and the reasons rows failed."""

from __future__ import annotations

from decimal import Decimal

from batchrunner.records import Bill, RowResult, Summary


def result(
    i: int, status: str = "ok", *, cost: str = "0", prompt_tokens: int = 0, attempts: int = 1, **fields: object
) -> RowResult:
    """A row result whose whole bill was paid in this run."""
    bill = Bill(Decimal(cost), {"reported"}, prompt_tokens, 0, attempts)
    return RowResult(
        i,
        str(i),
        0,
        "m",
        status,
        cost_usd=bill.cost_usd,
        prompt_tokens=prompt_tokens,
        attempts=attempts,
        this_run=bill,
        **fields,
    )  # type: ignore[arg-type]  # status: str for a Literal


def test_summary_counts_and_sums_exactly() -> None:
    """Summary adds costs as Decimal (0.1 ten times is exactly 1) and groups failure reasons."""
    summary = Summary()
    for i in range(10):
        summary.add(result(i, cost="0.1", prompt_tokens=3))
    summary.add(result(10, "failed", error="HTTP 400: bad"))
    assert summary.cost_usd == Decimal("1.0")
    assert (summary.ok, summary.failed, summary.prompt_tokens, summary.attempts) == (10, 1, 30, 11)
    assert summary.errors == {"HTTP 400": 1}
    assert "rows: 10 ok, 1 failed, 2 pending" in summary.lines(wall_s=1.0, pending=2)


def test_per_model_stats_for_the_summary() -> None:
    """Per model: latency percentiles, retries and fallbacks used; JSON keeps cost as an exact string."""
    summary = Summary()
    for i in range(20):
        summary.add(result(i, latency_s=float(i + 1), attempts=2 if i < 3 else 1, fallback_used=i < 2, cost="0.01"))
    stats = summary.by_model["m"]
    assert stats.latency_percentile_s(0.5) in (10.0, 11.0) and stats.latency_percentile_s(0.95) == 19.0
    assert (stats.retries, stats.fallbacks) == (3, 2)
    data = summary.to_json(wall_s=1.0, pending=0, resumed=0, stopped=None)
    assert data["cost_usd"] == "0.20" and data["models"]["m"]["fallbacks_used"] == 2


def test_summary_counts_what_this_run_paid_including_rows_it_stopped_in() -> None:
    """A retried row counts only this run's attempts; a row left pending after paid attempts still counts its bill."""
    summary = Summary()
    earlier, now = Bill(Decimal("0.5"), {"reported"}, 100, 10, 2), Bill(Decimal("0.25"), {"reported"}, 50, 5, 1)
    total = earlier.plus(now)
    summary.add(RowResult(0, "0", 0, "m", "ok", cost_usd=total.cost_usd, attempts=total.attempts, this_run=now))
    summary.add(result(1, "pending", cost="0.125", prompt_tokens=7, attempts=2))
    assert summary.cost_usd == Decimal("0.375")
    assert (summary.ok, summary.failed, summary.prompt_tokens, summary.attempts) == (1, 0, 57, 3)
    assert summary.by_model["m"].retries == 1
    assert total.cost_usd == Decimal("0.75") and total.attempts == 3 and total.prompt_tokens == 150
