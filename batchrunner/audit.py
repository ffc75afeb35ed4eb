"""Checking the bill: what the checkpoint recorded of each answer against what OpenRouter kept (GET /generation).
Pure: no I/O; auditing.py asks the server and keeps what it was told.

No tool checks its own cost records against the provider's, so a wrong price, a misread `usage.cost`, a BYOK
upstream cost left out, or tokens the provider recounted later would go unnoticed. Each answered row is compared
with its generation's record: its cost exactly (Decimal, never a float comparison: a micro-dollar off is off) and
its prompt and completion tokens. A row's recorded cost is its whole bill across its attempts (records.Bill), and
a generation is one attempt: a row with other billed attempts cannot be compared on cost (its tokens still can),
and a row whose bill holds an estimate (a reply abandoned, `cost_source: estimated`) was never meant to be exact:
it is shown beside the real cost, outside the drift. A generation OpenRouter does not (yet) know is not a
mismatch: its record comes some time after the answer (a 404 meanwhile), and the next audit asks again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from batchrunner.costs import ZERO_USD, to_decimal

Verdict = Literal["match", "mismatch", "estimated", "unpriced", "other_attempts", "unknown"]
# match/mismatch: compared; estimated: the recorded bill holds an estimate; unpriced: no cost was recorded (no
# price); other_attempts: the row's bill holds attempts beside this answer (tokens compared, cost not); unknown:
# OpenRouter had no record of it (a 404 after the retries): asked again by the next audit

DEFAULT_TOLERANCE_USD = Decimal("0.0001")


@dataclass(frozen=True)
class RecordedRow:
    """What the checkpoint holds of one answered row (its record in `results`)."""

    generation_id: str
    row_id: str
    requested_model: str
    cost_usd: Decimal | None
    cost_source: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    # billed_* and attempts: the row's whole bill; when its billed tokens are the answer's, no other attempt billed
    billed_prompt_tokens: int | None = None
    billed_completion_tokens: int | None = None
    attempts: int | None = 1

    @property
    def alone(self) -> bool:
        """Whether the row's bill is this answer's alone: one attempt, or others that billed no tokens."""
        if (self.attempts or 1) <= 1:
            return True
        billed = (self.billed_prompt_tokens, self.billed_completion_tokens)
        return billed == (self.prompt_tokens, self.completion_tokens)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RecordedRow:
        """From a checkpoint record by column name (money as exact decimal text)."""
        cost = record.get("cost_usd")
        return cls(
            generation_id=str(record["generation_id"]),
            row_id=str(record["row_id"]),
            requested_model=str(record["requested_model"]),
            cost_usd=None if cost is None else Decimal(str(cost)),
            cost_source=record.get("cost_source"),
            prompt_tokens=record.get("prompt_tokens"),
            completion_tokens=record.get("completion_tokens"),
            billed_prompt_tokens=record.get("billed_prompt_tokens"),
            billed_completion_tokens=record.get("billed_completion_tokens"),
            attempts=record.get("attempts"),
        )


@dataclass(frozen=True)
class KeptRecord:
    """What OpenRouter kept of one generation: its whole cost as costs.charge counts it (BYOK: OpenRouter's fee,
    `total_cost`, plus the provider's `upstream_inference_cost`) and its native token counts."""

    cost_usd: Decimal | None
    prompt_tokens: int | None
    completion_tokens: int | None
    upstream_usd: Decimal | None = None  # BYOK: the provider's part of cost_usd

    @classmethod
    def from_generation(cls, data: Mapping[str, Any]) -> KeptRecord:
        """From GET /generation's `data`. The upstream cost is added only when `is_byok` is true, as costs.charge
        adds it: without BYOK `total_cost` is the whole. Native token counts are what `usage` reports; the
        normalized ones (`tokens_prompt`) stand in only where a record has no native count."""
        fee = to_decimal(data.get("total_cost"))
        upstream = to_decimal(data.get("upstream_inference_cost")) if data.get("is_byok") is True else None
        cost = None if fee is None and upstream is None else (fee or ZERO_USD) + (upstream or ZERO_USD)
        return cls(
            cost_usd=cost,
            prompt_tokens=_count(data.get("native_tokens_prompt"), data.get("tokens_prompt")),
            completion_tokens=_count(data.get("native_tokens_completion"), data.get("tokens_completion")),
            upstream_usd=upstream,
        )

    def to_json(self) -> dict[str, Any]:
        """As the checkpoint's audits table keeps it (money as exact decimal text)."""
        return {
            "cost_usd": None if self.cost_usd is None else str(self.cost_usd),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "upstream_usd": None if self.upstream_usd is None else str(self.upstream_usd),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> KeptRecord:
        return cls(
            cost_usd=_decimal_text(value.get("cost_usd")),
            prompt_tokens=value.get("prompt_tokens"),
            completion_tokens=value.get("completion_tokens"),
            upstream_usd=_decimal_text(value.get("upstream_usd")),
        )


def usd_text(amount: Decimal | None) -> str | None:
    """An exact amount as plain decimal text, without trailing zeros or an exponent ("0", never "0E-7")."""
    if amount is None:
        return None
    return "0" if amount == 0 else f"{amount.normalize():f}"


def _count(*values: Any) -> int | None:
    """The first of `values` that is a whole number of tokens."""
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _decimal_text(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


@dataclass(frozen=True)
class RowAudit:
    """One row against its generation's record."""

    row: RecordedRow
    kept: KeptRecord | None  # None: OpenRouter has no record of it (yet)
    verdict: Verdict
    cost_differs: bool = False
    tokens_differ: bool = False
    drift_usd: Decimal = ZERO_USD  # recorded minus kept, for rows compared on cost

    def to_json(self) -> dict[str, Any]:
        kept = self.kept
        return {
            "row_id": self.row.row_id,
            "model": self.row.requested_model,
            "generation_id": self.row.generation_id,
            "verdict": self.verdict,
            "recorded_cost_usd": usd_text(self.row.cost_usd),
            "kept_cost_usd": None if kept is None else usd_text(kept.cost_usd),
            "drift_usd": usd_text(self.drift_usd),
            "cost_source": self.row.cost_source,
            "recorded_tokens": [self.row.prompt_tokens, self.row.completion_tokens],
            "kept_tokens": None if kept is None else [kept.prompt_tokens, kept.completion_tokens],
        }


def audit_row(row: RecordedRow, kept: KeptRecord | None) -> RowAudit:
    """One row's verdict. Tokens are compared wherever both sides know them; the cost only where the row's bill
    is this answer alone, was not estimated, and both sides know it."""
    if kept is None:
        return RowAudit(row, None, "unknown")
    tokens_differ = _differs(row.prompt_tokens, kept.prompt_tokens) or _differs(
        row.completion_tokens, kept.completion_tokens
    )
    if row.cost_source == "estimated":
        return RowAudit(row, kept, "estimated", tokens_differ=tokens_differ)
    if row.cost_usd is None or row.cost_source == "unknown" or kept.cost_usd is None:
        return RowAudit(row, kept, "unpriced", tokens_differ=tokens_differ)
    if not row.alone:
        return RowAudit(row, kept, "other_attempts", tokens_differ=tokens_differ)
    drift = row.cost_usd - kept.cost_usd
    cost_differs = drift != 0
    verdict: Verdict = "mismatch" if cost_differs or tokens_differ else "match"
    return RowAudit(row, kept, verdict, cost_differs, tokens_differ, drift)


def _differs(recorded: int | None, kept: int | None) -> bool:
    return recorded is not None and kept is not None and recorded != kept


@dataclass
class ModelAudit:
    """One model's rows, audited. `drift_usd` is recorded minus kept over the rows compared on cost;
    `absolute_drift_usd` the sum of each row's difference without its sign, which offsetting errors cannot hide."""

    rows: int = 0  # audited rows (every verdict)
    checked: int = 0  # rows OpenRouter has a record of
    matched: int = 0
    mismatched: int = 0  # cost or tokens differ
    cost_mismatches: int = 0
    token_mismatches: int = 0
    recorded_usd: Decimal = ZERO_USD  # of the rows compared on cost
    kept_usd: Decimal = ZERO_USD
    drift_usd: Decimal = ZERO_USD
    absolute_drift_usd: Decimal = ZERO_USD
    unknown: int = 0  # no record (yet): asked again by the next audit
    estimated: int = 0
    estimated_recorded_usd: Decimal = ZERO_USD  # what the checkpoint estimated for them...
    estimated_kept_usd: Decimal = ZERO_USD  # ...and what OpenRouter kept of their answers
    unpriced: int = 0
    other_attempts: int = 0

    def add(self, item: RowAudit) -> None:
        self.rows += 1
        if item.kept is None:
            self.unknown += 1
            return
        self.checked += 1
        self.token_mismatches += item.tokens_differ
        if item.verdict == "estimated":
            self.estimated += 1
            self.estimated_recorded_usd += item.row.cost_usd or ZERO_USD
            self.estimated_kept_usd += item.kept.cost_usd or ZERO_USD
        elif item.verdict == "unpriced":
            self.unpriced += 1
        elif item.verdict == "other_attempts":
            self.other_attempts += 1
        else:
            self.recorded_usd += item.row.cost_usd or ZERO_USD
            self.kept_usd += item.kept.cost_usd or ZERO_USD
            self.drift_usd += item.drift_usd
            self.absolute_drift_usd += abs(item.drift_usd)
            self.cost_mismatches += item.cost_differs
        if item.verdict == "match":
            self.matched += 1
        elif item.tokens_differ or item.cost_differs:
            self.mismatched += 1

    def plus(self, other: ModelAudit) -> ModelAudit:
        total = ModelAudit()
        for name in self.__dataclass_fields__:
            setattr(total, name, getattr(self, name) + getattr(other, name))
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            name: usd_text(value) if isinstance(value, Decimal) else value
            for name, value in ((name, getattr(self, name)) for name in self.__dataclass_fields__)
        }


@dataclass(frozen=True)
class Tolerance:
    """How much drift an audit accepts: a number of dollars, or a share of what OpenRouter kept."""

    usd: Decimal | None = DEFAULT_TOLERANCE_USD
    share: Decimal | None = None  # 0.01 for 1%

    @classmethod
    def parse(cls, text: str) -> Tolerance:
        """Text as `--tolerance` takes it: "0.0001" (USD) or "1%" (of the kept cost); ValueError for anything else, or a negative amount."""
        text = text.strip().removeprefix("$")
        percent = text.endswith("%")
        try:
            value = Decimal(text.removesuffix("%").strip())
        except InvalidOperation:
            raise ValueError(f"{text!r} is not an amount of USD (0.0001) or a percentage (1%)") from None
        if not value.is_finite() or value < 0:
            raise ValueError(f"{text!r}: a tolerance is a finite amount, 0 or more")
        return cls(usd=None, share=value / 100) if percent else cls(usd=value)

    def allowed_usd(self, kept_usd: Decimal) -> Decimal:
        return self.usd if self.usd is not None else (self.share or ZERO_USD) * abs(kept_usd)

    def __str__(self) -> str:
        return f"${self.usd}" if self.usd is not None else f"{(self.share or ZERO_USD) * 100}%"


@dataclass
class Audit:
    """Every audited row and their totals per requested model."""

    rows: list[RowAudit] = field(default_factory=list)
    models: dict[str, ModelAudit] = field(default_factory=dict)

    @property
    def total(self) -> ModelAudit:
        total = ModelAudit()
        for model in self.models.values():
            total = total.plus(model)
        return total

    def exceeds(self, tolerance: Tolerance) -> bool:
        """Whether the rows' absolute drift is more than the tolerance allows."""
        total = self.total
        return total.absolute_drift_usd > tolerance.allowed_usd(total.kept_usd)

    def differing(self) -> list[RowAudit]:
        """The rows whose cost or tokens differ, and those whose cost was estimated: what a reader looks at."""
        return [item for item in self.rows if item.cost_differs or item.tokens_differ or item.verdict == "estimated"]


def audit(rows: Iterable[RecordedRow], kept: Mapping[str, KeptRecord | None]) -> Audit:
    """Each row against what was kept of its generation (a row whose id `kept` lacks, or maps to None, has no
    record yet), totalled per requested model in the order the models first appear."""
    result = Audit()
    for row in rows:
        item = audit_row(row, kept.get(row.generation_id))
        result.rows.append(item)
        result.models.setdefault(row.requested_model, ModelAudit()).add(item)
    return result
