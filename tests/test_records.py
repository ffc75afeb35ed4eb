"""Run totals: exact cost, counts and the reasons rows failed."""

from __future__ import annotations

from decimal import Decimal

from batchrunner.records import RowResult, Summary


def test_summary_counts_and_sums_exactly() -> None:
    """Summary adds costs as Decimal (0.1 ten times is exactly 1) and groups failure reasons."""
    summary = Summary()
    for i in range(10):
        summary.add(RowResult(i, str(i), 0, "m", "ok", cost_usd=Decimal("0.1"), prompt_tokens=3, attempts=1))
    summary.add(RowResult(10, "10", 0, "m", "failed", error="HTTP 400: bad", attempts=1))
    assert summary.cost_usd == Decimal("1.0")
    assert (summary.ok, summary.failed, summary.prompt_tokens, summary.attempts) == (10, 1, 30, 11)
    assert summary.errors == {"HTTP 400": 1}
    assert "rows: 10 ok, 1 failed, 2 pending" in summary.lines(wall_s=1.0, pending=2)


def test_per_model_stats_for_the_summary() -> None:
    """Per model: latency percentiles, retries and fallbacks used; JSON keeps cost as an exact string."""
    summary = Summary()
    for i in range(20):
        summary.add(
            RowResult(
                i,
                str(i),
                0,
                "m",
                "ok",
                latency_s=float(i + 1),
                attempts=2 if i < 3 else 1,
                fallback_used=i < 2,
                cost_usd=Decimal("0.01"),
            )
        )
    stats = summary.by_model["m"]
    assert stats.latency_percentile_s(0.5) in (10.0, 11.0) and stats.latency_percentile_s(0.95) == 19.0
    assert (stats.retries, stats.fallbacks) == (3, 2)
    data = summary.to_json(wall_s=1.0, pending=0, resumed=0, stopped=None)
    assert data["cost_usd"] == "0.20" and data["models"]["m"]["fallbacks_used"] == 2
