"""The evaluation report's figures: per model, and per pair of models on the same rows. Pure.

Everything is computed from the output frames (output.results()): no request is sent. A
failed row is a wrong answer (it scores 0) and is counted. Intervals are 95%: Wilson's for
0/1 scores, the normal approximation of the mean otherwise; pairs are compared on the rows
both models answered (paired differences), with McNemar's test for 0/1 scores. See
../shared/reference/eval-statistics.md (Miller, "Adding Error Bars to Evals").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

import polars as pl

Z95 = 1.959964
OTHER = "(other)"  # an answer (or reference) outside the enum, in a confusion matrix
NO_ANSWER = "(no answer)"  # a failed row, or an answer without the field


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


@dataclass
class ModelFigures:
    model: str
    rows: int
    ok: int
    failed: int
    scored: int  # rows with a reference (the rest have no score)
    score: Interval | None
    binary: bool  # every score is 0 or 1 (accuracy)
    cost_usd: str
    cost_per_1k_rows_usd: str | None
    cost_per_correct_usd: str | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    prompt_tokens: int
    completion_tokens: int
    retries: int
    fallbacks: int
    errors: dict[str, int] = field(default_factory=dict)  # error class -> rows
    confusion: Confusion | None = None  # enum answers with a reference: reference x answer counts


@dataclass
class Confusion:
    """Counts of (reference, answer) for an enum-valued answer: where a model's mistakes go, which an
    accuracy alone hides. References are the rows, answers the columns; a value outside the enum is
    OTHER, a failed or empty answer NO_ANSWER."""

    references: list[str]
    answers: list[str]
    counts: list[list[int]]  # counts[i][j]: rows whose reference is references[i], answered answers[j]


@dataclass
class PairFigures:
    a: str
    b: str
    rows: int  # rows both models have a score for
    difference: Interval  # mean of score(a) - score(b), in score units
    a_only_right: int | None = None  # McNemar's b: a right, b wrong (0/1 scores)
    b_only_right: int | None = None  # McNemar's c
    p_value: float | None = None
    sentence: str = ""


@dataclass
class Recommendation:
    """The choice the report is read for: the cheapest model the paired comparison cannot tell is worse than
    the best one, and what it saves. `model` is None when no cheaper model qualifies (then `sentence` says why)."""

    best: str
    model: str | None
    saving_per_1k_rows_usd: str | None
    sentence: str


@dataclass
class SliceFigures:
    """One model's score on the rows whose `by` column has one value, with its 95% interval."""

    value: str
    model: str
    rows: int
    score: Interval


@dataclass
class Report:
    job: str
    score_column: str | None
    models: list[ModelFigures]
    pairs: list[PairFigures]
    notes: list[str]
    recommendation: Recommendation | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def wilson(successes: float, n: int) -> Interval:
    """Wilson's score interval for a proportion: never outside [0, 1], sound at 0 and 1."""
    p = successes / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: list[float]) -> Interval:
    """The mean with its normal-approximation 95% interval (CLT standard error)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, mean, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half)


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's test on the discordant counts: exact binomial below 25, else chi-square
    with continuity correction."""
    n = b + c
    if n == 0:
        return 1.0
    if n < 25:
        tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
        return min(1.0, 2 * tail)
    statistic = (abs(b - c) - 1) ** 2 / n
    return math.erfc(math.sqrt(statistic / 2))


def gather(frames: Iterable[pl.DataFrame]) -> pl.DataFrame:
    """The output frames as one frame (an evaluation's rows fit in memory: the pairs need them all)."""
    collected = [frame for frame in frames if frame.height]
    return pl.concat(collected, how="vertical_relaxed") if collected else pl.DataFrame()


def enum_labels(response_format: dict[str, Any] | None, field_name: str | None) -> list[str] | None:
    """The values a structured answer's `field_name` may take, when its schema says `enum` (a classification):
    then the report shows each model's confusion matrix. None for free answers."""
    if not response_format or not field_name or response_format.get("type") != "json_schema":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema") or {}
    prop = (schema.get("properties") or {}).get(field_name) if isinstance(schema, dict) else None
    values = prop.get("enum") if isinstance(prop, dict) else None
    return [str(v) for v in values] if isinstance(values, list) and values else None


def build(
    job: str,
    frames: pl.DataFrame | Iterable[pl.DataFrame],
    *,
    id_column: str,
    score_column: str | None,
    reference: str | None = None,
    answer_column: str | None = None,
    labels: list[str] | None = None,
) -> Report:
    """The report's figures from the output frames of an evaluation (or any multi-model) job. With `labels` (the
    answer field's enum), a `reference` and an `answer_column`, each model also gets its confusion matrix."""
    data = frames if isinstance(frames, pl.DataFrame) else gather(frames)
    models = [] if data.is_empty() else list(dict.fromkeys(data["requested_model"].to_list()))
    figures = [_model(data.filter(pl.col("requested_model") == m), m, score_column, id_column) for m in models]
    if labels and reference and answer_column and {reference, answer_column} <= set(data.columns):
        for figure in figures:
            figure.confusion = confusion(
                data.filter(pl.col("requested_model") == figure.model), reference, answer_column, labels
            )
    pairs = []
    if score_column is not None:
        for i, a in enumerate(models):
            for b in models[i + 1 :]:
                pair = _pair(data, a, b, id_column, score_column)
                if pair is not None:
                    pairs.append(pair)
    notes = ["A failed row counts as a wrong answer (score 0)."] if score_column else []
    if score_column and "sample" in data.columns:
        notes.append("Each row's score is the mean of its samples; intervals count rows, not samples.")
    if len(pairs) > 1:
        notes.append(
            f"{len(pairs)} pairwise comparisons: their intervals are descriptive, not adjusted for multiple comparisons."
        )
    if figures and score_column and all(f.binary for f in figures) and figures[0].scored:
        n = figures[0].scored
        notes.append(f"With {n} rows, an accuracy near 50% is known to within about ±{100 / math.sqrt(n):.0f} points.")
    return Report(job, score_column, figures, pairs, notes, recommend(figures, pairs))


def confusion(frame: pl.DataFrame, reference: str, answer: str, labels: list[str]) -> Confusion:
    """Reference x answer counts over the rows that have a reference (each sample counts). Values are matched to
    the enum ignoring case and surrounding space, as `exact` compares them by default."""
    by_key = {label.strip().casefold(): label for label in labels}

    def place(value: Any, ok: bool) -> str:
        if not ok or value is None or (isinstance(value, str) and not value.strip()):
            return NO_ANSWER
        return by_key.get(str(value).strip().casefold(), OTHER)

    counts: dict[tuple[str, str], int] = {}
    for record in frame.select(reference, answer, "status").iter_rows(named=True):
        if record[reference] is None:
            continue
        key = (place(record[reference], True), place(record[answer], record["status"] == "ok"))
        counts[key] = counts.get(key, 0) + 1
    seen_refs = {r for r, _ in counts}
    seen_answers = {a for _, a in counts}
    references = labels + [OTHER] * (OTHER in seen_refs)
    answers = labels + [v for v in (OTHER, NO_ANSWER) if v in seen_answers]
    return Confusion(references, answers, [[counts.get((r, a), 0) for a in answers] for r in references])


def recommend(models: list[ModelFigures], pairs: list[PairFigures]) -> Recommendation | None:
    """The cheapest model not significantly worse than the best (by the paired 95% interval the sentences use),
    and its saving per 1,000 rows; when there is none, the sentence says why. None without scores."""
    scored = [m for m in models if m.score is not None and m.cost_per_1k_rows_usd is not None]
    if not scored:
        return None

    def cost(m: ModelFigures) -> Decimal:
        return Decimal(m.cost_per_1k_rows_usd or "0")

    best = max(scored, key=lambda m: (m.score.mean if m.score else 0.0, -cost(m)))
    head = "cheapest model not significantly worse than the best"
    cheaper = [m for m in scored if cost(m) < cost(best)]
    if not cheaper:
        what = "the only model scored" if len(scored) == 1 else "also the cheapest"
        return Recommendation(best.model, None, None, f"{head}: none; the best, {best.model}, is {what}")
    by_pair = {(p.a, p.b): p.difference for p in pairs} | {
        (p.b, p.a): Interval(-p.difference.mean, -p.difference.high, -p.difference.low) for p in pairs
    }
    compared = [m for m in cheaper if (best.model, m.model) in by_pair]
    close = [m for m in compared if by_pair[(best.model, m.model)].low <= 0]  # best - m: 0 inside the interval
    if not close:
        why = "every cheaper model is significantly worse" if compared else "no cheaper model shares scored rows"
        if compared and len(compared) < len(cheaper):
            why = "every cheaper model compared is significantly worse (some share no scored rows)"
        return Recommendation(best.model, None, None, f"{head} ({best.model}): none; {why}")
    choice = min(close, key=lambda m: (cost(m), -(m.score.mean if m.score else 0.0)))
    saving = cost(best) - cost(choice)
    return Recommendation(
        best.model,
        choice.model,
        str(saving),
        f"{head} ({best.model}): {choice.model}, saving {money(saving)} per 1,000 rows",
    )


def money(value: Decimal | str | float) -> str:
    """Dollars with the digits a small figure needs: $12.50, $0.0123, $0.000042 (never $0.00 for a real cost)."""
    amount = Decimal(str(value))
    if amount == 0:
        return "$0"
    if amount.copy_abs() >= 1:
        return f"${amount:,.2f}"
    text = f"{amount:.{min(8, 2 - amount.copy_abs().adjusted())}f}"  # three significant digits
    while text.endswith("0") and len(text.split(".")[1]) > 2:
        text = text[:-1]
    return "$" + text


def by_slice(data: pl.DataFrame, by: str, id_column: str, score_column: str, *, most: int = 20) -> list[SliceFigures]:
    """Each model's score on each value of `by` (the first `most` values, sorted), with the same 95% intervals
    as the overall figures (Wilson's for 0/1 scores): a slice of 12 rows is not read like one of 1,200."""
    if data.is_empty() or by not in data.columns:
        return []
    values = sorted({str(v) for v in data[by].to_list()})[:most]
    found = []
    keyed = data.with_columns(pl.col(by).cast(pl.String).alias("__slice"))
    for value in values:
        part = keyed.filter(pl.col("__slice") == value)
        for model in dict.fromkeys(part["requested_model"].to_list()):
            scores = _per_row(part.filter(pl.col("requested_model") == model), id_column, score_column)
            values_ = scores[score_column].drop_nulls().to_list()
            if not values_:
                continue
            binary = all(s in (0.0, 1.0) for s in values_)
            interval = wilson(sum(values_), len(values_)) if binary else mean_interval(values_)
            found.append(SliceFigures(value, model, len(values_), interval))
    return found


def _per_row(frame: pl.DataFrame, id_column: str, score: str) -> pl.DataFrame:
    """One score per input row: with several samples of a row, their mean (the row, not the sample, is the
    unit the intervals count)."""
    if "sample" not in frame.columns:
        return frame.select(id_column, score)
    return frame.group_by(id_column, maintain_order=True).agg(pl.col(score).mean())


def _model(frame: pl.DataFrame, model: str, score_column: str | None, id_column: str) -> ModelFigures:
    ok = frame.filter(pl.col("status") == "ok")
    rows = frame.height
    cost = sum((Decimal(str(v)) for v in frame["cost_usd"].drop_nulls().to_list()), Decimal(0))
    scores = _per_row(frame, id_column, score_column)[score_column].drop_nulls().to_list() if score_column else []
    binary = bool(scores) and all(s in (0.0, 1.0) for s in scores)
    interval = None
    if scores:
        interval = wilson(sum(scores), len(scores)) if binary else mean_interval(scores)
    correct = sum(scores)
    latencies = sorted(ok["latency_s"].drop_nulls().to_list())
    errors: dict[str, int] = {}
    for error in frame.filter(pl.col("status") == "failed")["error"].to_list():
        kind = (error or "unknown").split(":")[0][:60]
        errors[kind] = errors.get(kind, 0) + 1
    return ModelFigures(
        model=model,
        rows=rows,
        ok=ok.height,
        failed=rows - ok.height,
        scored=len(scores),
        score=interval,
        binary=binary,
        cost_usd=str(cost),
        cost_per_1k_rows_usd=str((cost * 1000 / rows).quantize(Decimal("1e-6"))) if rows else None,
        cost_per_correct_usd=str((cost / Decimal(str(correct))).quantize(Decimal("1e-6"))) if correct else None,
        latency_p50_s=_percentile(latencies, 0.5),
        latency_p95_s=_percentile(latencies, 0.95),
        prompt_tokens=int(frame["billed_prompt_tokens"].sum()),
        completion_tokens=int(frame["billed_completion_tokens"].sum()),
        retries=retries(frame),
        fallbacks=frame.filter(pl.col("model").is_not_null() & (pl.col("model") != pl.col("requested_model"))).height,
        errors=errors,
    )


def retries(frame: pl.DataFrame) -> int:
    """Attempts beyond the first, summed over the rows that were sent. A dedupe copy (or a row whose answer
    came without a request) has 0 attempts: "attempts minus rows" counted it as -1 retry, so a deduplicated
    job showed a negative count."""
    if frame.is_empty() or "attempts" not in frame.columns:
        return 0
    return int(frame.select((pl.col("attempts").fill_null(0) - 1).clip(lower_bound=0).sum()).item())


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _pair(data: pl.DataFrame, a: str, b: str, id_column: str, score: str) -> PairFigures | None:
    left = _per_row(data.filter(pl.col("requested_model") == a), id_column, score).rename({score: "a"})
    right = _per_row(data.filter(pl.col("requested_model") == b), id_column, score).rename({score: "b"})
    both = left.join(right, on=id_column, how="inner").drop_nulls()
    if both.is_empty():
        return None
    differences = (both["a"] - both["b"]).to_list()
    interval = mean_interval(differences)
    pair = PairFigures(a, b, both.height, interval)
    scores = both["a"].to_list() + both["b"].to_list()
    binary = all(s in (0.0, 1.0) for s in scores)
    if binary:
        pair.a_only_right = both.filter((pl.col("a") == 1) & (pl.col("b") == 0)).height
        pair.b_only_right = both.filter((pl.col("a") == 0) & (pl.col("b") == 1)).height
        pair.p_value = mcnemar_p(pair.a_only_right, pair.b_only_right)
    pair.sentence = _sentence(pair, binary)
    return pair


def _sentence(pair: PairFigures, binary: bool) -> str:
    """The comparison in words: who wins and by how much, or that these rows cannot tell them apart."""
    scale, unit = (100, " points") if binary else (1, "")
    d, low, high = (round(v * scale, 1) for v in (pair.difference.mean, pair.difference.low, pair.difference.high))
    if pair.difference.low > 0 or pair.difference.high < 0:
        winner, loser = (pair.a, pair.b) if pair.difference.mean > 0 else (pair.b, pair.a)
        d, low, high = (d, low, high) if pair.difference.mean > 0 else (-d, -high, -low)
        return f"{winner} beats {loser} by {d:g}{unit} (95% CI {low:g} to {high:g})"
    return (
        f"{pair.a} and {pair.b} cannot be told apart on these {pair.rows} rows "
        f"(difference {d:g}{unit}, 95% CI {low:g} to {high:g})"
    )


def to_markdown(report: Report) -> str:
    """The per-model table and the pairwise sentences, for CI logs and pull requests."""
    binary = bool(report.models) and all(m.binary for m in report.models)
    score_head = "accuracy (95% CI)" if binary else "mean score (95% CI)"
    lines = [
        f"# {report.job}",
        "",
        f"| model | rows | ok | {score_head} | cost | per 1k rows | per correct | p50 s | p95 s | retries | fallbacks |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in report.models:
        lines.append(
            f"| {m.model} | {m.rows} | {m.ok} | {_score(m.score, binary)} | ${Decimal(m.cost_usd):.6f} | "
            f"{_usd(m.cost_per_1k_rows_usd)} | {_usd(m.cost_per_correct_usd)} | {_seconds(m.latency_p50_s)} | "
            f"{_seconds(m.latency_p95_s)} | {m.retries} | {m.fallbacks} |"
        )
    if report.recommendation is not None:
        lines += ["", f"**Recommendation**: {report.recommendation.sentence}."]
    if report.pairs:
        lines += ["", "## Is the difference real?", ""]
        lines += [f"- {pair.sentence}" for pair in report.pairs]
    for m in report.models:
        if m.confusion is not None:
            lines += ["", f"## Confusion matrix: {m.model}", "", *confusion_markdown(m.confusion)]
    if report.notes:
        lines += ["", *(f"_{note}_" for note in report.notes)]
    return "\n".join(lines) + "\n"


def confusion_markdown(matrix: Confusion) -> list[str]:
    """A confusion matrix as a markdown table: a row per reference, a column per answer."""
    head = "| reference \\ answer | " + " | ".join(_cell(a) for a in matrix.answers) + " |"
    lines = [head, "|---|" + "---:|" * len(matrix.answers)]
    for reference, counts in zip(matrix.references, matrix.counts, strict=True):
        lines.append(f"| {_cell(reference)} | " + " | ".join(str(c) for c in counts) + " |")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def score_text(model: ModelFigures) -> str:
    """One model's score for the end-of-run summary: "91.3% (88.1 to 94.0)", "-" without references."""
    return _score(model.score, model.binary)


def _score(interval: Interval | None, binary: bool) -> str:
    if interval is None:
        return "-"
    if binary:
        return f"{100 * interval.mean:.1f}% ({100 * interval.low:.1f} to {100 * interval.high:.1f})"
    return f"{interval.mean:.3f} ({interval.low:.3f} to {interval.high:.3f})"


def _usd(value: str | None) -> str:
    return "-" if value is None else f"${Decimal(value):.6f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
