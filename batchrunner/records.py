"""The result of one (row, model) pair, and the run's summary. Pure: no I/O.

These records are what the row policy produces, the checkpoint keeps and the output writes;
RESULT_SCHEMA is the one definition of an output row's result columns, by name and type:
adding one is a RowResult field, an entry here, and a numbered migration in store.py. Nothing
between the policy and the output names the columns one by one: a result becomes the checkpoint's
record by name (RowResult.to_row), comes back from it by name (RowResult.from_row, Store.fetch),
and the output selects RESULT_SCHEMA's columns from what the checkpoint returns.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, Protocol

import polars as pl

from batchrunner.costs import ZERO_USD, format_cost, format_usd

Status = Literal["ok", "failed", "pending"]  # pending: the run stopped mid-row, after paying for attempts
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
    "billed_prompt_tokens": pl.Int64(),
    "billed_completion_tokens": pl.Int64(),
    "cost_usd": COST_DTYPE,
    "upstream_cost_usd": COST_DTYPE,
    "cost_source": pl.String(),
    "latency_s": pl.Float64(),
    "ttft_s": pl.Float64(),
    "attempts": pl.Int64(),
    "generation_id": pl.String(),
    "provider": pl.String(),
    "service_tier": pl.String(),
    "deduped_from": pl.String(),
    "endpoint": pl.String(),
}
# Kept in the checkpoint as exact decimal text: every column of COST_DTYPE, so a new money column is one entry above.
MONEY_COLUMNS = tuple(name for name, dtype in RESULT_SCHEMA.items() if dtype == COST_DTYPE)


# What the checkpoint keeps besides the output columns: a structured answer, parsed; tool calls as JSON.
STORED_EXTRAS: dict[str, pl.DataType] = {"parsed": pl.String(), "tool_calls": pl.String()}
# Every stored result column with its type as the checkpoint returns it (money as exact decimal text).
STORED_SCHEMA: dict[str, pl.DataType] = {
    **{name: pl.String() if name in MONEY_COLUMNS else dtype for name, dtype in RESULT_SCHEMA.items()},
    **STORED_EXTRAS,
}
# The checkpoint key of a pair, in RowRequest.key's order: computed once, when its row is read (pending.py), and
# carried by its RowRequest to its RowResult, the checkpoint and the output's join (keylog.py).
KEY_COLUMNS = ("row_id", "requested_model", "fingerprint")
# Which pair a stored record answers, besides requested_model (a result column): its key and its place in the output.
PAIR_COLUMNS = ("row_id", "fingerprint", "row_index", "model_position")


@dataclass
class Bill:
    """What one row's attempts were billed: cost, how the cost is known, tokens, attempts.

    A row's bill grows across its attempts, its models and its runs: a row retried
    tomorrow starts from what it was billed today, so nothing paid for drops out."""

    cost_usd: Decimal = ZERO_USD  # the whole: with BYOK, OpenRouter's fees and the providers' bills together
    sources: set[str] = field(default_factory=set)  # reported, computed, estimated (a reply abandoned), unknown
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    upstream_usd: Decimal | None = None  # BYOK: the providers' part of cost_usd; None while no attempt was BYOK

    def add(
        self,
        cost_usd: Decimal,
        source: str,
        prompt_tokens: int,
        completion_tokens: int,
        upstream_usd: Decimal | None = None,
    ) -> None:
        self.cost_usd += cost_usd
        self.sources.add(source)
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.upstream_usd = _plus(self.upstream_usd, upstream_usd)

    def plus(self, other: Bill) -> Bill:
        return Bill(
            self.cost_usd + other.cost_usd,
            self.sources | other.sources,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.attempts + other.attempts,
            _plus(self.upstream_usd, other.upstream_usd),
        )

    @property
    def source(self) -> str:
        """The least certain source among the attempts: unknown, then estimated, then computed, then reported."""
        for source in ("unknown", "estimated", "computed"):
            if source in self.sources:
                return source
        return "reported"


def _plus(a: Decimal | None, b: Decimal | None) -> Decimal | None:
    """A sum of parts that may not be there: None only when neither is."""
    return a if b is None else b if a is None else a + b


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
    billed_prompt_tokens: int = 0  # every billed attempt's, in every run (prompt_tokens is the answer's own)
    billed_completion_tokens: int = 0
    cost_usd: Decimal = (
        ZERO_USD  # every billed attempt of this row, in every run, not just the last (BYOK: fee and upstream)
    )
    upstream_cost_usd: Decimal | None = None  # BYOK: the providers' part of cost_usd, billed to the user's own keys
    cost_source: str = "reported"  # reported (usage.cost), computed (from /models prices), estimated, or unknown
    latency_s: float | None = None  # of the attempt that answered
    ttft_s: float | None = None  # streamed: from sending to the first token, of the attempt that answered
    attempts: int = 0  # across all models tried, in every run
    generation_id: str | None = None
    provider: str | None = None
    service_tier: str | None = None  # the tier that served the answer, as the response says (flex, default, ...)
    fingerprint: str = ""  # of the request, for the checkpoint key (see request.py)
    fallback_used: bool = False  # answered by a model from `fallbacks`
    parsed: str | None = None  # a structured answer, parsed and validated, as JSON text
    tool_calls: str | None = None  # the answer's tool calls, as JSON text
    deduped_from: str | None = None  # the row whose identical request paid for this answer (dedupe)
    endpoint: str | None = None  # a pool's (api.endpoints) server that last answered the row's requests; else None
    this_run: Bill = field(default_factory=Bill)  # what this run paid for the row (the rest, earlier runs)
    saved_usd: Decimal = ZERO_USD  # a copy: what its answer cost the row that paid (not stored)

    def to_row(self) -> dict[str, Any]:
        """The checkpoint's record of this result, by column name: the pair (PAIR_COLUMNS) and every STORED_SCHEMA
        column, money as exact text. Read from the schema as it is, so a new column is stored once it is a field
        and a schema entry, and no reader depends on where a column stands."""
        row = {name: getattr(self, name) for name in (*PAIR_COLUMNS, *STORED_SCHEMA)}
        for name in MONEY_COLUMNS:
            if row[name] is not None:
                row[name] = str(row[name])
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RowResult:
        """A result from a record the checkpoint returns, by column name (to_row's inverse): money back to Decimal,
        a NULL where the field has a default (a column added after the answer was stored) as that default, and
        what is not a field (the store's own columns: run_id, server, ...) left out. Fields the checkpoint does
        not keep (this_run, fallback_used, saved_usd) are their defaults."""
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            if item.name not in row:
                continue
            value = row[item.name]
            if value is None and _has_default(item):
                continue
            values[item.name] = Decimal(value) if item.name in MONEY_COLUMNS and value is not None else value
        return cls(**values)


def _has_default(item: dataclasses.Field[Any]) -> bool:
    return item.default is not dataclasses.MISSING or item.default_factory is not dataclasses.MISSING


class ResultSink(Protocol):
    """Whatever takes each result as it arrives: the checkpoint store, the summary, the progress display."""

    def add(self, result: RowResult) -> None: ...

    def resumed(self, count: int) -> None:
        """`count` pairs an earlier run already answered were skipped."""


class Sinks:
    """Several sinks as one, fed in order (the summary first, so the progress display reads it current)."""

    def __init__(self, *sinks: ResultSink) -> None:
        self.sinks = sinks

    def add(self, result: RowResult) -> None:
        for sink in self.sinks:
            sink.add(result)

    def resumed(self, count: int) -> None:
        for sink in self.sinks:
            sink.resumed(count)


class KeptResults(list[RowResult]):
    """A sink that keeps every result in memory (keep_results: tests and small scripts)."""

    def add(self, result: RowResult) -> None:
        self.append(result)

    def resumed(self, count: int) -> None:
        pass


@dataclass
class ModelStats:
    """Totals for one requested model."""

    ok: int = 0
    failed: int = 0
    unfinished: int = 0  # rows the run stopped in the middle of, after paying for attempts
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal = ZERO_USD
    upstream_cost_usd: Decimal = ZERO_USD  # BYOK: the providers' part of cost_usd
    unpriced: int = 0  # rows with an attempt whose cost is unknown (not reported, no price)
    attempts: int = 0
    fallbacks: int = 0  # rows a fallback model answered
    deduped: int = 0  # rows answered by copying an identical request's answer: nothing sent
    dedupe_saved_usd: Decimal = ZERO_USD  # what those answers cost the rows that paid for them
    latencies_s: array[float] = field(default_factory=lambda: array("d"))  # 8 bytes a row, for percentiles
    tiers: dict[str, int] = field(default_factory=dict)  # answers by the service tier that served them

    def add(self, result: RowResult) -> None:
        """Count a row, and what this run was billed for it: every attempt's tokens and cost."""
        if result.status == "ok":
            self.ok += 1
            if result.latency_s is not None:
                self.latencies_s.append(result.latency_s)
            if result.service_tier is not None and result.deduped_from is None:
                self.tiers[result.service_tier] = self.tiers.get(result.service_tier, 0) + 1
        elif result.status == "failed":
            self.failed += 1
        else:
            self.unfinished += 1
        bill = result.this_run
        self.prompt_tokens += bill.prompt_tokens
        self.completion_tokens += bill.completion_tokens
        self.cached_tokens += result.cached_tokens
        self.reasoning_tokens += result.reasoning_tokens
        self.cost_usd += bill.cost_usd
        self.upstream_cost_usd += bill.upstream_usd or ZERO_USD
        self.unpriced += "unknown" in bill.sources
        self.attempts += bill.attempts
        self.fallbacks += result.fallback_used
        if result.deduped_from is not None:
            self.deduped += 1
            self.dedupe_saved_usd += result.saved_usd

    @property
    def retries(self) -> int:
        return max(0, self.attempts - (self.ok + self.failed + self.unfinished - self.deduped))

    def latency_percentile_s(self, q: float) -> float | None:
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def to_json(self) -> dict[str, object]:
        p50, p95 = self.latency_percentile_s(0.5), self.latency_percentile_s(0.95)
        return {
            "ok": self.ok,
            "failed": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cost_usd": str(self.cost_usd),
            "upstream_cost_usd": str(self.upstream_cost_usd),
            "cost_unknown_rows": self.unpriced,
            "service_tiers": dict(self.tiers),
            "latency_p50_s": p50,
            "latency_p95_s": p95,
            "retries": self.retries,
            "fallbacks_used": self.fallbacks,
            "deduped": self.deduped,
            "dedupe_saved_usd": str(self.dedupe_saved_usd),
        }


@dataclass
class EndpointStats:
    """What one server of a pool (api.endpoints) was asked and how it answered: counted per request, not per row,
    so an endpoint that went away shows the requests it refused."""

    requests: int = 0
    ok: int = 0  # answered (an answer the flow then judges, refusals and invalid ones too)
    errors: int = 0  # an error status, a dropped connection, or never reached

    def to_json(self) -> dict[str, int]:
        return {"requests": self.requests, "ok": self.ok, "errors": self.errors}


@dataclass
class Summary:
    """Totals of a run, per requested model and overall; cost exact in Decimal."""

    by_model: dict[str, ModelStats] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # first words of each error -> count
    endpoints: dict[str, EndpointStats] = field(default_factory=dict)  # a pool's, by URL (the pool updates them)

    def resumed(self, count: int) -> None:
        """Pairs answered by earlier runs are counted by the run report, not here."""

    def add(self, result: RowResult) -> None:
        self.by_model.setdefault(result.requested_model, ModelStats()).add(result)
        if result.status == "failed":
            reason = (result.error or "unknown").split(":")[0][:60]
            self.errors[reason] = self.errors.get(reason, 0) + 1

    def _total(self, name: str) -> int:
        return sum(getattr(stats, name) for stats in self.by_model.values())

    ok = property(lambda self: self._total("ok"))
    failed = property(lambda self: self._total("failed"))
    prompt_tokens = property(lambda self: self._total("prompt_tokens"))
    completion_tokens = property(lambda self: self._total("completion_tokens"))
    attempts = property(lambda self: self._total("attempts"))
    deduped = property(lambda self: self._total("deduped"))

    @property
    def dedupe_saved_usd(self) -> Decimal:
        return sum((stats.dedupe_saved_usd for stats in self.by_model.values()), ZERO_USD)

    @property
    def cost_usd(self) -> Decimal:
        return sum((stats.cost_usd for stats in self.by_model.values()), ZERO_USD)

    @property
    def upstream_cost_usd(self) -> Decimal:
        """BYOK: the providers' part of cost_usd (billed to the user's own keys; the rest is OpenRouter's)."""
        return sum((stats.upstream_cost_usd for stats in self.by_model.values()), ZERO_USD)

    unpriced = property(lambda self: self._total("unpriced"))

    @property
    def done(self) -> int:
        return self.ok + self.failed

    def lines(self, *, wall_s: float, pending: int, resumed: int = 0) -> list[str]:
        rate = f", {self.done / wall_s:.1f} rows/s" if wall_s > 0 and self.done else ""
        earlier = f", {resumed} answered by earlier runs" if resumed else ""
        lines = [
            f"rows: {self.ok} ok, {self.failed} failed, {pending} pending{earlier}",
            f"tokens: {self.prompt_tokens:,} prompt, {self.completion_tokens:,} completion",
            f"cost: {format_cost(self.cost_usd, self.unpriced)}" + self._byok_part(),
            f"wall time: {wall_s:.1f} s{rate}",
        ]
        if self.deduped:
            lines.insert(
                3,
                f"deduplicated: {self.deduped} rows answered from identical requests, saving {format_usd(self.dedupe_saved_usd)}",
            )
        if len(self.by_model) > 1 or any(s.fallbacks or s.retries or s.cached_tokens for s in self.by_model.values()):
            lines += self.table()
        for url, stats in self.endpoints.items():
            lines.append(f"endpoint {url}: {stats.requests} requests, {stats.ok} ok, {stats.errors} errors")
        for reason, count in sorted(self.errors.items(), key=lambda kv: -kv[1])[:5]:
            lines.append(f"failed: {count} × {reason}")
        return lines

    def _byok_part(self) -> str:
        """What of the cost the providers billed to the user's own keys (BYOK), when any did."""
        upstream = self.upstream_cost_usd
        if not upstream:
            return ""
        return (
            f" ({format_usd(upstream)} billed by providers to your own keys (BYOK), "
            f"{format_usd(self.cost_usd - upstream)} by OpenRouter)"
        )

    def table(self) -> list[str]:
        """Per model: rows, tokens, cost, latency percentiles, retries and fallbacks, as aligned text."""
        header = (
            "model",
            "ok",
            "failed",
            "prompt tok",
            "compl. tok",
            "cached",
            "reasoning",
            "cost",
            "p50 s",
            "p95 s",
            "retries",
            "fallbacks",
        )
        rows = [header]
        for model, s in self.by_model.items():
            p50, p95 = s.latency_percentile_s(0.5), s.latency_percentile_s(0.95)
            rows.append(
                (
                    model,
                    str(s.ok),
                    str(s.failed),
                    f"{s.prompt_tokens:,}",
                    f"{s.completion_tokens:,}",
                    f"{s.cached_tokens:,}",
                    f"{s.reasoning_tokens:,}",
                    format_cost(s.cost_usd, s.unpriced),
                    "-" if p50 is None else f"{p50:.2f}",
                    "-" if p95 is None else f"{p95:.2f}",
                    str(s.retries),
                    str(s.fallbacks),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        return [
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]

    def to_json(self, *, wall_s: float, pending: int, resumed: int, stopped: str | None) -> dict[str, object]:
        found: dict[str, object] = {
            "rows_ok": self.ok,
            "rows_failed": self.failed,
            "rows_pending": pending,
            "rows_answered_by_earlier_runs": resumed,
            "cost_usd": str(self.cost_usd),  # the whole: with BYOK, OpenRouter's fees and the providers' bills
            "upstream_cost_usd": str(self.upstream_cost_usd),  # BYOK: the providers' part of cost_usd
            "cost_unknown_rows": self.unpriced,  # when not 0, cost_usd is a lower bound
            "rows_deduped": self.deduped,
            "dedupe_saved_usd": str(self.dedupe_saved_usd),
            "wall_s": round(wall_s, 3),
            "stopped": stopped,
            "models": {model: stats.to_json() for model, stats in self.by_model.items()},
            "errors": self.errors,
        }
        if self.endpoints:  # a pool's: requests, ok and errors per server
            found["endpoints"] = {url: stats.to_json() for url, stats in self.endpoints.items()}
        return found
