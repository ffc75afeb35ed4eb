"""The result of one (row, model) pair, and the run's summary. Pure: no I/O.

These records are what the engine produces, the output writes, and (later) the checkpoint
store keeps; they are the one definition of an output row's extra columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

import polars as pl

from batchrunner.costs import ZERO_USD, format_usd

Status = Literal["ok", "failed"]
COST_DTYPE = pl.Decimal(precision=38, scale=12)  # exact to a millionth of a micro-dollar

# The columns added to every input row, in output order, with their types.
RESULT_SCHEMA: dict[str, pl.DataType] = {
    "model": pl.String(),
    "requested_model": pl.String(),
    "status": pl.String(),
    "response": pl.String(),
    "error": pl.String(),
    "finish_reason": pl.String(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "cached_tokens": pl.Int64(),
    "reasoning_tokens": pl.Int64(),
    "cost_usd": COST_DTYPE,
    "cost_source": pl.String(),
    "latency_s": pl.Float64(),
    "attempts": pl.Int64(),
    "generation_id": pl.String(),
    "provider": pl.String(),
}


@dataclass(frozen=True)
class RowResult:
    """What happened to one input row for one requested model."""

    row_index: int  # the row's position in the input
    row_id: str
    model_position: int  # the requested model's position in the spec's `models`
    requested_model: str
    status: Status
    model: str | None = None  # the model that answered
    response: str | None = None
    error: str | None = None  # one line, for failed rows
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal = ZERO_USD  # every billed attempt of this row, not just the last
    cost_source: str = "reported"  # reported (usage.cost), computed (from /models prices) or unknown
    latency_s: float | None = None  # of the attempt that answered
    attempts: int = 0  # across all models tried
    generation_id: str | None = None
    provider: str | None = None
    fingerprint: str = ""  # of the request, for the checkpoint key (see request.py)
    fallback_used: bool = False  # answered by a model from `fallbacks`

    def columns(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in RESULT_SCHEMA}


@dataclass
class Summary:
    """Totals of a run, kept exact: cost in Decimal, counts in ints."""

    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = ZERO_USD
    attempts: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # first words of each error -> count

    def add(self, result: RowResult) -> None:
        if result.status == "ok":
            self.ok += 1
        else:
            self.failed += 1
            reason = (result.error or "unknown").split(":")[0][:60]
            self.errors[reason] = self.errors.get(reason, 0) + 1
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens
        self.cost_usd += result.cost_usd
        self.attempts += result.attempts

    @property
    def done(self) -> int:
        return self.ok + self.failed

    def lines(self, *, wall_s: float, pending: int, resumed: int = 0) -> list[str]:
        rate = f", {self.done / wall_s:.1f} rows/s" if wall_s > 0 and self.done else ""
        earlier = f", {resumed} answered by earlier runs" if resumed else ""
        lines = [
            f"rows: {self.ok} ok, {self.failed} failed, {pending} pending{earlier}",
            f"tokens: {self.prompt_tokens:,} prompt, {self.completion_tokens:,} completion",
            f"cost: {format_usd(self.cost_usd)}",
            f"wall time: {wall_s:.1f} s{rate}",
        ]
        for reason, count in sorted(self.errors.items(), key=lambda kv: -kv[1])[:5]:
            lines.append(f"failed: {count} × {reason}")
        return lines
