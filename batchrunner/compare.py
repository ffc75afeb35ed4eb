"""One evaluation run against another (`report --baseline`): what changed, per model. Pure.

Paired on the rows both runs answered (the same input row, the same requested model, the same
sample): the change in score with a paired 95% interval (the mean of per-row differences, as
eval-statistics.md says a paired comparison is made), the change in cost and latency on those rows,
the rows whose 0/1 score flipped, and whether the model that served the rows moved: OpenRouter can
change what runs without a new slug (`~...-latest` aliases, providers reordered, presets), so a
changed served model or provider is said, between the runs and within each.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

import polars as pl

from batchrunner.evaluation import Interval, mean_interval

KEY = "__compare_key"
FLIPS_SHOWN = 20  # rows listed per direction of a flip; the counts are whole


@dataclass
class ModelChange:
    model: str  # the requested model
    rows: int  # rows both runs answered (and scored)
    score_before: float | None
    score_after: float | None
    change: Interval | None  # mean of per-row (after - before), with its 95% interval
    cost_before_usd: str
    cost_after_usd: str
    latency_p50_before_s: float | None
    latency_p50_after_s: float | None
    now_wrong: list[str] = field(default_factory=list)  # ids of rows right before, wrong now (0/1 scores)
    now_right: list[str] = field(default_factory=list)
    now_wrong_count: int = 0
    now_right_count: int = 0
    served_before: list[str] = field(default_factory=list)  # the models that answered, as the answers say
    served_after: list[str] = field(default_factory=list)
    served_moved: int = 0  # rows whose serving model differs between the runs
    providers_moved: int = 0  # rows whose provider differs between the runs

    @property
    def sentence(self) -> str:
        if self.change is None:
            return f"{self.model}: no row both runs scored"
        points = 100 * self.change.mean
        if self.change.low > 0 or self.change.high < 0:
            verb = "better" if points > 0 else "worse"
            how = f"{abs(points):.1f} points {verb}"
        else:
            how = f"no clear change ({points:+.1f} points)"
        return (
            f"{self.model}: {how} (95% CI {100 * self.change.low:+.1f} to {100 * self.change.high:+.1f}) "
            f"on {self.rows} rows"
        )


@dataclass
class Comparison:
    before: str  # what the baseline is (run:3 of 2026-12-01, another job, an output file)
    after: str
    score_column: str | None
    models: list[ModelChange]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "sentences": [m.sentence for m in self.models]}


def compare(
    after: pl.DataFrame,
    before: pl.DataFrame,
    *,
    id_column: str,
    score_column: str | None,
    after_label: str,
    before_label: str,
) -> Comparison:
    """What changed from `before` to `after` (each an output frame with `id_column`, requested_model, status,
    the score, model, provider, cost_usd, latency_s), per requested model both have."""
    keys = [
        id_column,
        "requested_model",
        *(["sample"] if "sample" in after.columns and "sample" in before.columns else []),
    ]
    joined = _keyed(after, keys).join(_keyed(before, keys), on=KEY, how="inner", suffix="_before")
    models = [m for m in dict.fromkeys(after["requested_model"].to_list()) if m in set(before["requested_model"])]
    changes = [_model(joined.filter(pl.col("requested_model") == m), m, id_column, score_column) for m in models]
    notes = []
    for change in changes:
        if change.served_moved or change.providers_moved:
            notes.append(
                f"{change.model}: on {change.served_moved} rows another model served the answer, on "
                f"{change.providers_moved} another provider: the runs may not compare the same thing"
            )
        for label, served in (("before", change.served_before), ("after", change.served_after)):
            if len(served) > 1:
                notes.append(f"{change.model}: {label}, its rows were served by {', '.join(served)}")
    return Comparison(before_label, after_label, score_column, changes, notes)


def _keyed(frame: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    return frame.with_columns(pl.concat_str([pl.col(k).cast(pl.String) for k in keys], separator="\x1f").alias(KEY))


def _model(rows: pl.DataFrame, model: str, id_column: str, score_column: str | None) -> ModelChange:
    change = None
    before_score = after_score = None
    flips: dict[str, list[str]] = {"now_wrong": [], "now_right": []}
    if score_column is not None and score_column in rows.columns:
        scored = rows.filter(pl.col(score_column).is_not_null() & pl.col(f"{score_column}_before").is_not_null())
        after_values = scored[score_column].to_list()
        before_values = scored[f"{score_column}_before"].to_list()
        if after_values:
            change = mean_interval([a - b for a, b in zip(after_values, before_values, strict=True)])
            after_score = sum(after_values) / len(after_values)
            before_score = sum(before_values) / len(before_values)
        ids = [str(v) for v in scored[id_column].to_list()]
        for row_id, a, b in zip(ids, after_values, before_values, strict=True):
            if b == 1 and a == 0:
                flips["now_wrong"].append(row_id)
            elif b == 0 and a == 1:
                flips["now_right"].append(row_id)
    rows_n = rows.height if change is None else len(after_values)
    return ModelChange(
        model,
        rows_n,
        before_score,
        after_score,
        change,
        _sum_usd(rows, "cost_usd_before"),
        _sum_usd(rows, "cost_usd"),
        _p50(rows, "latency_s_before"),
        _p50(rows, "latency_s"),
        flips["now_wrong"][:FLIPS_SHOWN],
        flips["now_right"][:FLIPS_SHOWN],
        len(flips["now_wrong"]),
        len(flips["now_right"]),
        _served(rows, "model_before"),
        _served(rows, "model"),
        _moved(rows, "model"),
        _moved(rows, "provider"),
    )


def _sum_usd(rows: pl.DataFrame, column: str) -> str:
    if column not in rows.columns:
        return "0"
    return str(sum((Decimal(str(v)) for v in rows[column].to_list() if v is not None), Decimal(0)))


def _p50(rows: pl.DataFrame, column: str) -> float | None:
    if column not in rows.columns:
        return None
    values = sorted(v for v in rows[column].to_list() if v is not None and not math.isnan(v))
    return None if not values else round(values[len(values) // 2], 4)


def _served(rows: pl.DataFrame, column: str) -> list[str]:
    if column not in rows.columns:
        return []
    return sorted({str(v) for v in rows[column].to_list() if v is not None})


def _moved(rows: pl.DataFrame, name: str) -> int:
    if name not in rows.columns or f"{name}_before" not in rows.columns:
        return 0
    both = rows.filter(pl.col(name).is_not_null() & pl.col(f"{name}_before").is_not_null())
    return int((both[name] != both[f"{name}_before"]).sum())


def to_markdown(comparison: Comparison) -> str:
    """The comparison for a pull request comment: a table per model, the sentences, the flips, the notes."""
    lines = [
        f"## {comparison.after} against {comparison.before}",
        "",
        "| model | rows | score before | score after | change (95% CI) | cost before | cost after | p50 s before | p50 s after |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for m in comparison.models:
        change = (
            "n/a"
            if m.change is None
            else f"{100 * m.change.mean:+.1f} ({100 * m.change.low:+.1f} to {100 * m.change.high:+.1f})"
        )
        lines.append(
            f"| {m.model} | {m.rows} | {_pct(m.score_before)} | {_pct(m.score_after)} | {change} | "
            f"${m.cost_before_usd} | ${m.cost_after_usd} | {_s(m.latency_p50_before_s)} | {_s(m.latency_p50_after_s)} |"
        )
    lines.append("")
    lines += [f"- {m.sentence}" for m in comparison.models]
    for m in comparison.models:
        if m.now_wrong_count or m.now_right_count:
            lines.append(
                f"- {m.model}: {m.now_wrong_count} rows now wrong ({', '.join(m.now_wrong) or '-'}), "
                f"{m.now_right_count} now right ({', '.join(m.now_right) or '-'})"
            )
    lines += [f"- note: {note}" for note in comparison.notes]
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
