"""Money: exact arithmetic in Decimal USD. Pure, no I/O.

OpenRouter reports `usage.cost` as a JSON number; it is read as the decimal it was
written as and summed as Decimal, so a run's total never drifts from what was billed.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

ZERO_USD = Decimal(0)


def to_decimal(value: Any) -> Decimal | None:
    """A JSON number (or numeric string) as the Decimal it was written as; None if it is not one.

    Floats go through their shortest round-tripping repr, so 0.000123 becomes
    Decimal('0.000123'), not the binary float's 0.000122999999999999994...
    """
    if value is None or isinstance(value, bool):
        return None
    try:
        result = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return result if result.is_finite() else None


def total_usd(costs: Iterable[Decimal | None]) -> Decimal:
    """The exact sum of the known costs."""
    return sum((c for c in costs if c is not None), ZERO_USD)


def format_usd(amount: Decimal) -> str:
    """Dollars for people: cents for large sums, more digits for the fractions of a cent LLM calls cost."""
    if amount == 0:
        return "$0.00"
    if abs(amount) >= 1:
        return f"${amount.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):,}"
    return f"${amount:.6f}".rstrip("0").rstrip(".") if abs(amount) >= Decimal("0.000001") else f"${amount:.2E}"
