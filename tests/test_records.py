"""Run totals: exact cost, counts and the reasons rows failed."""

from __future__ import annotations

from decimal import Decimal

from batchrunner.costs import format_usd, to_decimal, total_usd
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


def test_to_decimal_reads_json_numbers_as_written() -> None:
    """A float from JSON becomes the decimal it was written as; junk becomes None."""
    assert to_decimal(0.000123) == Decimal("0.000123")
    assert to_decimal(1.5e-05) == Decimal("0.000015")
    assert to_decimal("0.0000025") == Decimal("0.0000025")
    assert to_decimal(None) is None and to_decimal("n/a") is None and to_decimal(True) is None
    assert to_decimal(float("nan")) is None


def test_totals_and_formatting() -> None:
    """Unknown costs are skipped in totals; small sums keep their significant digits."""
    assert total_usd([Decimal("0.1"), None, Decimal("0.2")]) == Decimal("0.3")
    assert format_usd(Decimal("12.345")) == "$12.35"
    assert format_usd(Decimal("0.000675")) == "$0.000675"
    assert format_usd(Decimal(0)) == "$0.00"
