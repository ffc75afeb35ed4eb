"""The evaluation report as one self-contained HTML file. Pure: figures and rows in, text out.

It opens from disk with no network and no server: the charts are inline SVG drawn here, the
row explorer is a little inline JavaScript over data embedded as JSON. Everything that came
from outside (answers, references, model names, cells) is escaped: by html.escape in the
markup, and by textContent (never innerHTML) in the explorer. The explorer embeds at most
MAX_ROWS input rows (disagreements and failures first) with answers cut to ANSWER_CHARS, so
the file stays a few MB at 100,000 rows, and says how many it left out.
"""

from __future__ import annotations

import html
import json
import math
from decimal import Decimal
from typing import Any

import polars as pl

from batchrunner import jsontext
from batchrunner.evaluation import ModelFigures, Report, by_slice, money, score_text

MAX_ROWS = 5000
ANSWER_CHARS = 160
INPUT_CHARS = 400  # of all a row's input columns together, in the explorer
SLICE_CHARS = 80  # a --by value longer than this is cut in the chart (its full text in a tooltip)
WIDTH, ROW_HEIGHT, PLOT = 640, 34, 380  # PLOT: the width of a chart's plot area; its margins fit the labels
FONT = "DejaVu Sans, Verdana, Geneva, sans-serif"  # wide fonts: text_width's estimate holds for narrower ones
COLOURS = ["#3b6fb6", "#d0743c", "#3c9d5d", "#9b59b6", "#c0392b", "#16a085", "#7f8c8d", "#b7950b"]


def render(
    report: Report,
    data: pl.DataFrame,
    *,
    id_column: str,
    reference: str | None,
    answer_column: str,
    by: str | None = None,
    inputs: list[str] | None = None,
) -> str:
    """The whole page. `data` is the output (one row per input row and model), with `id_column`; `inputs` are the
    input columns the explorer shows beside the answers (what the models were asked about)."""
    models = [m.model for m in report.models]
    colour = {model: COLOURS[i % len(COLOURS)] for i, model in enumerate(models)}
    inputs = [c for c in inputs or [] if c in data.columns and c not in (id_column, reference)]
    rows, total_rows = _explorer_rows(data, models, id_column, reference, answer_column, report.score_column, inputs)
    payload = {"models": models, "colours": colour, "rows": rows, "scored": report.score_column is not None}
    sections = [
        _header(report, total_rows, len(rows)),
        _table(report),
        _pairs(report),
        _chart("Score, with its 95% interval", _dot_interval(report, colour)) if report.score_column else "",
        _chart(
            "Cost per 1,000 rows against score (Pareto frontier: no model both cheaper and better)",
            _cost_score(report, colour),
        )
        if report.score_column
        else "",
        _chart("Latency of answers (5th, 25th, 50th, 75th, 95th percentile)", _latency(data, models, colour)),
        _chart(
            f"Score by {by}, with its 95% interval", _slices(data, models, colour, by, report.score_column, id_column)
        )
        if by and report.score_column
        else "",
        _chart("Failed rows by kind of error", _errors(report, colour)),
        _confusions(report),
        _explorer(models),
    ]
    # JSON.parse reads it (strict JSON); "<" escaped so no cell can close the script element ("</script>")
    data_json = jsontext.dumps(payload, ensure_ascii=False).replace("<", "\\u003c").replace("\u2028", "\\u2028")
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(report.job)}: model comparison</title>"
        f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>"
        "<script>window.addEventListener('error',function(e){document.body.dataset.errors="
        "(document.body.dataset.errors||'')+e.message+';';});</script>"
        + "".join(sections)
        + f"<script type=application/json id=data>{data_json}</script><script>{SCRIPT}</script></body></html>\n"
    )


def _explorer_rows(
    data: pl.DataFrame,
    models: list[str],
    id_column: str,
    reference: str | None,
    answer: str,
    score: str | None,
    inputs: list[str] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """One entry per input row: its id, reference, input columns (cut to INPUT_CHARS in all) and each model's
    answer, score and status; the rows the explorer is most for (failures, disagreements) first when there are
    more than MAX_ROWS."""
    if data.is_empty():
        return [], 0
    by_row: dict[Any, dict[str, Any]] = {}
    inputs = inputs or []
    columns = [id_column, "requested_model", "status", "error", answer, *([reference] if reference else [])]
    columns += ([score] if score else []) + inputs
    for record in data.select(list(dict.fromkeys(columns))).iter_rows(named=True):
        entry = by_row.get(record[id_column])
        if entry is None:
            entry = by_row[record[id_column]] = {
                "id": str(record[id_column]),
                "ref": _cut(record.get(reference)) if reference else None,
                "in": _inputs(record, inputs),
                "m": {},
            }
        text = record[answer] if record["status"] == "ok" else (record["error"] or "failed")
        entry["m"][record["requested_model"]] = [
            record["status"] == "ok",
            _cut(text),
            None if not score or record[score] is None else round(float(record[score]), 4),
        ]
    rows = list(by_row.values())
    if len(rows) > MAX_ROWS:

        def interest(entry: dict[str, Any]) -> int:
            answers = list(entry["m"].values())
            failed = any(not ok for ok, _, _ in answers)
            disagree = len({s for _, _, s in answers}) > 1
            return 0 if failed else 1 if disagree else 2

        rows = sorted(rows, key=interest)[:MAX_ROWS]
    return rows, len(by_row)


def _inputs(record: dict[str, Any], inputs: list[str]) -> list[list[str]]:
    """A row's input columns as [column, text] pairs, INPUT_CHARS in all: the reader sees what the models were asked
    without the page growing with long inputs (the last column shown is cut with an ellipsis)."""
    shown: list[list[str]] = []
    room = INPUT_CHARS
    for column in inputs:
        value = record.get(column)
        if value is None or room <= 0:
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        if len(text) > room:
            text = text[: max(1, room - 1)] + "…"
        shown.append([column, text])
        room -= len(text)
    return shown


def _cut(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= ANSWER_CHARS else text[: ANSWER_CHARS - 1] + "…"


def _header(report: Report, total_rows: int, shown: int) -> str:
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in report.notes)
    left_out = (
        f"<li>The row explorer holds {shown:,} of {total_rows:,} rows (failures and disagreements first).</li>"
        if shown < total_rows
        else ""
    )
    return (
        f"<header><h1>{html.escape(report.job)}</h1><p>{len(report.models)} models on {total_rows:,} rows. "
        "Made by <code>batchrunner report</code> from the checkpoint; nothing was sent.</p>"
        f"<ul class=notes>{notes}{left_out}</ul></header>"
    )


def _table(report: Report) -> str:
    binary = bool(report.models) and all(m.binary for m in report.models)
    head = ["model", "rows", "ok %", "accuracy (95% CI)" if binary else "score (95% CI)", "cost", "per 1k rows"]
    head += ["per correct", "p50 s", "p95 s", "prompt tok", "compl. tok", "retries", "fallbacks"]
    body = []
    for m in report.models:
        cells = [
            m.model,
            f"{m.rows:,}",
            f"{100 * m.ok / m.rows:.1f}" if m.rows else "-",
            score_text(m),
            f"${float(m.cost_usd):.6f}",
            _usd(m.cost_per_1k_rows_usd),
            _usd(m.cost_per_correct_usd),
            _num(m.latency_p50_s),
            _num(m.latency_p95_s),
            f"{m.prompt_tokens:,}",
            f"{m.completion_tokens:,}",
            str(m.retries),
            str(m.fallbacks),
        ]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    advice = report.recommendation
    line = (
        f"<p class=recommendation><strong>Recommendation</strong>: {html.escape(advice.sentence)}.</p>"
        if advice
        else ""
    )
    return f"<section><h2>Models</h2>{line}<table class=figures><tr>{header}</tr>{''.join(body)}</table></section>"


def _confusions(report: Report) -> str:
    """Per model, a table of reference (rows) against answer (columns) counts, the diagonal marked: where each
    model's mistakes go."""
    tables = []
    for m in report.models:
        matrix = m.confusion
        if matrix is None:
            continue
        head = "<th>reference \\ answer</th>" + "".join(f"<th>{html.escape(a)}</th>" for a in matrix.answers)
        body = "".join(
            f"<tr><th>{html.escape(r)}</th>"
            + "".join(
                f"<td{' class=diag' if r == a else ''}>{count}</td>"
                for a, count in zip(matrix.answers, counts, strict=True)
            )
            + "</tr>"
            for r, counts in zip(matrix.references, matrix.counts, strict=True)
        )
        tables.append(
            f"<div class=confusion><h3>{html.escape(m.model)}</h3><table class=matrix><tr>{head}</tr>{body}</table></div>"
        )
    if not tables:
        return ""
    return (
        "<section><h2>Confusion matrices</h2><p class=small>Rows: the reference; columns: the model's answer "
        "(each sample counts).</p><div class=confusions>" + "".join(tables) + "</div></section>"
    )


def _pairs(report: Report) -> str:
    if not report.pairs:
        return ""
    models = [m.model for m in report.models]
    binary = all(m.binary for m in report.models)
    scale = 100 if binary else 1
    cells: dict[tuple[str, str], str] = {}
    for pair in report.pairs:
        d = pair.difference
        cells[(pair.a, pair.b)] = f"{scale * d.mean:+.1f} ({scale * d.low:+.1f} to {scale * d.high:+.1f})"
        cells[(pair.b, pair.a)] = f"{-scale * d.mean:+.1f} ({-scale * d.high:+.1f} to {-scale * d.low:+.1f})"
    header = "<th>row minus column</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in models)
    rows = "".join(
        f"<tr><th>{html.escape(a)}</th>"
        + "".join(f"<td>{html.escape(cells.get((a, b), '—'))}</td>" for b in models)
        + "</tr>"
        for a in models
    )
    sentences = "".join(f"<li>{html.escape(pair.sentence)}</li>" for pair in report.pairs)
    unit = "points of accuracy" if binary else "score"
    return (
        f"<section><h2>Is the difference real?</h2><ul class=sentences>{sentences}</ul>"
        f"<p class=small>Paired differences in {unit} on the rows both models answered, with 95% intervals.</p>"
        f"<table class=matrix>{header and '<tr>' + header + '</tr>'}{rows}</table></section>"
    )


def _chart(title: str, svg: str) -> str:
    return f"<section class=chart><h2>{html.escape(title)}</h2>{svg}</section>" if svg else ""


def _svg(height: float, body: str, width: float = WIDTH) -> str:
    return (
        f"<svg viewBox='0 0 {width:.0f} {height:.0f}' width={width:.0f} height={height:.0f} role=img "
        f"font-family='{FONT}'>{body}</svg>"
    )


def _label(x: float, y: float, text: str, anchor: str = "start", size: int = 12, extra: str = "") -> str:
    return f"<text x={x:.1f} y={y:.1f} font-size={size} text-anchor={anchor}{extra}>{html.escape(text)}</text>"


def text_width(text: str, size: float) -> float:
    """A generous estimate of `text`'s width in px at font size `size` in FONT (DejaVu Sans/Verdana are the widest
    common sans fonts): the layout sizes its margins from it, so no label is cut or runs into another."""
    wide, narrow = "mwMW@%", "iljtf.,:;|!'()[] /-"
    em = sum(0.95 if c in wide else 0.36 if c in narrow else 0.76 if c.isupper() else 0.64 for c in text)
    return em * size


def nice_ticks(low: float, high: float, most: int = 6) -> list[float]:
    """Round ticks (steps of 1, 2 or 5 times a power of ten) from at or below `low` to at or above `high`, at most
    `most` of them: 0, 0.02, 0.04 rather than steps of 0.015625. The axis spans the first to the last."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    power = 10 ** math.floor(math.log10((high - low) / max(1, most - 1)))
    for step in (m * power for m in (1, 2, 5, 10, 20, 50, 100)):
        first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
        if last - first + 1 <= most:
            break
    return [round(k * step, 12) for k in range(first, last + 1)]


def seconds_format(most: float) -> Any:
    """Latency ticks in ms under a second, else in s, with no more digits than the step needs."""
    if most < 1:
        return lambda t: f"{t * 1000:g} ms"
    return lambda t: f"{t:g} s"


def usd_format(value: float) -> str:
    """A cost tick: $0, $0.05, $1.20."""
    return money(Decimal(repr(round(value, 10))))


def score_format(binary: bool) -> Any:
    """Score ticks: percent for accuracy, a decimal for a mean score."""
    return (lambda t: f"{100 * t:g}%") if binary else (lambda t: f"{t:g}")


def _axis(x: Any, ticks: list[float], y: float, fmt: Any) -> str:
    """Vertical grid lines at the ticks and their labels under the plot (y is the plot's bottom)."""
    return "".join(
        f"<line x1={x(t):.1f} x2={x(t):.1f} y1=5 y2={y:.1f} stroke=#ddd />" + _label(x(t), y + 14, fmt(t), "middle", 10)
        for t in ticks
    )


def _binary(report: Report) -> bool:
    return bool(report.models) and all(m.binary for m in report.models if m.score is not None)


def _dot_interval(report: Report, colour: dict[str, str]) -> str:
    models = sorted((m for m in report.models if m.score is not None), key=lambda m: -m.score.mean)  # type: ignore[union-attr]  # filtered just before
    if not models:
        return ""
    left = max(text_width(m.model, 12) for m in models) + 16
    figures = max(text_width(score_text(m), 11) for m in models) + 16
    right = left + PLOT
    width = right + figures
    high = max(1.0, *(m.score.high for m in models if m.score))
    low = min(0.0, *(m.score.low for m in models if m.score))
    ticks = nice_ticks(low, high)
    low, high = ticks[0], ticks[-1]

    def x(value: float) -> float:
        return left + (value - low) / (high - low) * (right - left)

    bottom = len(models) * ROW_HEIGHT + 10
    parts = [_axis(x, ticks, bottom, score_format(_binary(report)))]
    for i, m in enumerate(models):
        assert m.score is not None
        y = 20 + i * ROW_HEIGHT
        parts.append(_label(left - 10, y + 4, m.model, "end"))
        parts.append(
            f"<line x1={x(m.score.low):.1f} x2={x(m.score.high):.1f} y1={y} y2={y} stroke={colour[m.model]} stroke-width=3 />"
        )
        parts.append(f"<circle class=dot cx={x(m.score.mean):.1f} cy={y} r=6 fill={colour[m.model]} />")
        parts.append(_label(width - 4, y + 4, score_text(m), "end", 11))
    return _svg(bottom + 30, "".join(parts), width)


Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _cost_score(report: Report, colour: dict[str, str]) -> str:
    """Each model's cost per 1,000 rows (x, square-root scale) against its score (y), the Pareto frontier dashed;
    points are numbered, the legend under the plot gives each number's full model name, cost and score."""
    figures = [m for m in report.models if m.score is not None and m.cost_per_1k_rows_usd is not None]
    if not figures:
        return ""
    points = [(float(m.cost_per_1k_rows_usd or 0), m.score.mean, m.model) for m in figures if m.score]
    binary = _binary(report)
    left, top, bottom, right = 70, 16, 250, WIDTH - 24
    cost_ticks = nice_ticks(0.0, max(p[0] for p in points) or 0.01, 5)
    most_cost = cost_ticks[-1]
    scores = [p[1] for p in points]
    score_ticks = nice_ticks(min(0.0, min(scores)), max(1.0, max(scores)), 5)
    low, high = score_ticks[0], score_ticks[-1]

    def x(cost: float) -> float:  # a square-root scale: cheap models do not all sit on the axis
        return left + math.sqrt(max(0.0, cost) / most_cost) * (right - left)

    def y(score: float) -> float:
        return bottom - (score - low) / (high - low) * (bottom - top)

    frontier = sorted(
        p for p in points if not any((o[0] <= p[0] and o[1] > p[1]) or (o[0] < p[0] and o[1] >= p[1]) for o in points)
    )
    line = " ".join(f"{x(c):.1f},{y(s):.1f}" for c, s, _ in frontier)
    fmt = score_format(binary)
    parts = [
        f"<line x1={left} x2={right} y1={bottom} y2={bottom} stroke=#999 />",
        f"<line x1={left} x2={left} y1={top} y2={bottom} stroke=#999 />",
        _label((right + left) / 2, bottom + 34, "cost per 1,000 rows (USD, square-root scale)", "middle", 11),
        _label(
            14,
            (top + bottom) / 2,
            "accuracy" if binary else "score",
            "middle",
            11,
            f" transform='rotate(-90 14 {(top + bottom) / 2:.1f})'",
        ),
    ]
    taken: list[Box] = []
    x_labels: list[str] = []
    for t in cost_ticks:  # the labels that would run into the previous one are left out (the square-root scale
        text = usd_format(t)  # crowds the cheap end); the grid line stays
        half = text_width(text, 10) / 2
        box: Box = (x(t) - half - 3, bottom + 4, x(t) + half + 3, bottom + 18)
        parts.append(f"<line x1={x(t):.1f} x2={x(t):.1f} y1={top} y2={bottom} stroke=#eee />")
        if not any(_overlaps(box, other) for other in taken):
            taken.append(box)
            x_labels.append(_label(x(t), bottom + 15, text, "middle", 10))
    for t in score_ticks:
        parts.append(f"<line x1={left} x2={right} y1={y(t):.1f} y2={y(t):.1f} stroke=#eee />")
        parts.append(_label(left - 6, y(t) + 4, fmt(t), "end", 10))
    parts += x_labels
    parts.append(f"<polyline class=frontier points='{line}' fill=none stroke=#888 stroke-dasharray='4 3' />")
    on_frontier = {p[2] for p in frontier}
    number = {m.model: i + 1 for i, m in enumerate(figures)}
    dots = [(x(c) - 8, y(s) - 8, x(c) + 8, y(s) + 8) for c, s, _ in points]
    for cost, score, model in points:
        ring = " stroke=#000 stroke-width=2" if model in on_frontier else ""
        parts.append(
            f"<circle class=dot cx={x(cost):.1f} cy={y(score):.1f} r=7 fill={colour[model]}{ring}>"
            f"<title>{html.escape(model)}</title></circle>"
        )
    plot: Box = (left, 0, right, bottom)
    for cost, score, model in points:  # each number beside its dot, where it runs into no other label or dot
        parts.append(_place(str(number[model]), x(cost), y(score), plot, taken, dots))
    legend_top = bottom + 50
    legend, legend_width = _numbered_legend(figures, number, colour, left, legend_top)
    parts.append(legend)
    return _svg(legend_top + len(figures) * 18, "".join(parts), legend_width)


def _place(text: str, cx: float, cy: float, plot: Box, taken: list[Box], dots: list[Box]) -> str:
    """`text` beside the dot at (cx, cy): the first of the spots around it that stays in `plot` and runs into no
    label in `taken` nor any dot; the box it takes is added to `taken`."""
    w = text_width(text, 11)
    spots = [(cx + 10, cy - 6), (cx - 10 - w, cy - 6), (cx + 10, cy - 22), (cx - 10 - w, cy - 22)]
    spots += [(cx + 10, cy + 8), (cx - 10 - w, cy + 8), (cx - w / 2, cy - 24), (cx - w / 2, cy + 10)]
    spots += [(cx + 10 + 12 * k, cy - 6 - 16 * j) for j in range(-3, 4) for k in range(1, 4)]
    for sx, sy in spots:
        box = (sx - 1, sy - 1, sx + w + 1, sy + 14)
        fits = plot[0] < box[0] and box[2] < plot[2] and box[1] >= plot[1] and box[3] < plot[3]
        if fits and not any(_overlaps(box, other) for other in taken + dots):
            break
    taken.append(box)
    return _label(sx, sy + 11, text, size=11, extra=" font-weight=600")


def _numbered_legend(
    figures: list[ModelFigures], number: dict[str, int], colour: dict[str, str], left: float, top: float
) -> tuple[str, float]:
    """The cost chart's legend: a line per model with its number, full name, cost per 1,000 rows and score; the
    markup and the width it needs."""
    parts, width = [], float(WIDTH)
    for i, m in enumerate(figures):
        y = top + i * 18
        text = f"{number[m.model]}  {m.model}: {money(m.cost_per_1k_rows_usd or 0)} per 1,000 rows, {score_text(m)}"
        parts.append(f"<circle cx={left + 6} cy={y - 4} r=5 fill={colour[m.model]} />")
        parts.append(_label(left + 16, y, text, size=11))
        width = max(width, left + 16 + text_width(text, 11) + 8)
    return "".join(parts), width


def _latency(data: pl.DataFrame, models: list[str], colour: dict[str, str]) -> str:
    if data.is_empty():
        return ""
    ok = data.filter(pl.col("status") == "ok")
    quantiles = {}
    for model in models:
        values = sorted(ok.filter(pl.col("requested_model") == model)["latency_s"].drop_nulls().to_list())
        if values:
            quantiles[model] = [
                values[min(len(values) - 1, round(q * (len(values) - 1)))] for q in (0.05, 0.25, 0.5, 0.75, 0.95)
            ]
    if not quantiles:
        return ""
    ticks = nice_ticks(0.0, max(q[-1] for q in quantiles.values()) or 0.001, 6)
    most = ticks[-1]
    fmt = seconds_format(most)
    left = max(text_width(m, 12) for m in quantiles) + 16
    right = left + PLOT
    width = right + max(text_width(f"p50 {fmt(q[2])}", 10) for q in quantiles.values()) + 24

    def x(value: float) -> float:
        return left + value / most * (right - left)

    bottom = len(quantiles) * ROW_HEIGHT + 10
    parts = [_axis(x, ticks, bottom, fmt)]
    for i, (model, (p5, p25, p50, p75, p95)) in enumerate(quantiles.items()):
        y = 20 + i * ROW_HEIGHT
        parts.append(_label(left - 10, y + 4, model, "end"))
        parts.append(f"<line x1={x(p5):.1f} x2={x(p95):.1f} y1={y} y2={y} stroke={colour[model]} />")
        parts.append(
            f"<rect x={x(p25):.1f} y={y - 8} width={max(1.0, x(p75) - x(p25)):.1f} height=16 fill={colour[model]} opacity=0.5 />"
        )
        parts.append(f"<line x1={x(p50):.1f} x2={x(p50):.1f} y1={y - 9} y2={y + 9} stroke=#000 stroke-width=2 />")
        parts.append(_label(right + 14, y + 4, f"p50 {fmt(p50)}", size=10))
    return _svg(bottom + 30, "".join(parts), width)


def _legend(models: list[str], colour: dict[str, str], left: float, top: float, width: float) -> tuple[str, float]:
    """Colour swatches and full model names, as many to a line as fit in `width`; the markup and its bottom."""
    parts, x, y = [], left, top
    for model in models:
        step = 14 + text_width(model, 10) + 18
        if x > left and x + step > width:
            x, y = left, y + 16
        parts.append(f"<rect x={x:.1f} y={y:.1f} width=10 height=10 fill={colour[model]} />")
        parts.append(_label(x + 14, y + 9, model, size=10))
        x += step
    return "".join(parts), y + 16


def _slices(
    data: pl.DataFrame, models: list[str], colour: dict[str, str], by: str | None, score: str | None, id_column: str
) -> str:
    """Each model's score per value of `by`, as bars with their 95% interval (evaluation.by_slice)."""
    if data.is_empty() or by is None or score is None or by not in data.columns:
        return ""
    found = by_slice(data, by, id_column, score)
    if not found:
        return ""
    table = {(f.value, f.model): f for f in found}
    slices = list(dict.fromkeys(f.value for f in found))
    names = {value: value if len(value) <= SLICE_CHARS else value[: SLICE_CHARS - 1] + "…" for value in slices}
    binary = data[score].drop_nulls().is_in([0.0, 1.0]).all()
    fmt = score_format(binary)
    group = len(models) * 14 + 12
    left = max(text_width(n, 12) for n in names.values()) + 16
    right = left + PLOT
    width = right + 44
    high = max(1.0, *(f.score.high for f in found))
    low = min(0.0, *(f.score.low for f in found))
    ticks = nice_ticks(low, high)
    low, high = ticks[0], ticks[-1]

    def x(value: float) -> float:
        return left + (value - low) / (high - low) * (right - left)

    bottom = 10 + len(slices) * group
    parts = [_axis(x, ticks, bottom, fmt)]
    for i, value in enumerate(slices):
        y0 = 10 + i * group
        full = f"<title>{html.escape(value)}</title>" if names[value] != value else ""
        parts.append(
            f"<text x={left - 10:.1f} y={y0 + group / 2:.1f} font-size=12 text-anchor=end>{full}"
            f"{html.escape(names[value])}</text>"
        )
        for j, model in enumerate(models):
            figure = table.get((value, model))
            if figure is None:
                continue
            top, mid = y0 + j * 14, y0 + j * 14 + 6
            interval = figure.score
            parts.append(
                f"<rect x={x(low):.1f} y={top} width={x(interval.mean) - x(low):.1f} height=12 fill={colour[model]}>"
                f"<title>{html.escape(model)}: {interval.mean:.3f} ({interval.low:.3f} to {interval.high:.3f}), "
                f"{figure.rows} rows</title></rect>"
            )
            parts.append(
                f"<path class=whisker d='M{x(interval.low):.1f} {mid - 4}v8M{x(interval.low):.1f} {mid}"
                f"H{x(interval.high):.1f}M{x(interval.high):.1f} {mid - 4}v8' stroke=#222 fill=none />"
            )
            parts.append(_label(x(interval.high) + 4, top + 10, fmt(round(interval.mean, 2)), size=10))
    legend, end = _legend(models, colour, left, bottom + 26, width)
    return _svg(end + 4, "".join(parts) + legend, width)


def _errors(report: Report, colour: dict[str, str]) -> str:
    """Failed rows by kind of error: a heading line per model, a bar per kind."""
    models: list[ModelFigures] = [m for m in report.models if m.errors]
    if not models:
        return "<p class=small>No row failed.</p>"
    kinds = {m.model: sorted(m.errors.items(), key=lambda kv: -kv[1])[:6] for m in models}
    most = max(count for rows in kinds.values() for _, count in rows)
    left = max(text_width(kind, 11) for rows in kinds.values() for kind, _ in rows) + 16
    right = left + 260
    width = max(right + 50, *(text_width(m.model, 12) + 12 for m in models))
    parts, y = [], 0.0
    for m in models:
        y += 20
        parts.append(_label(4, y, m.model, size=12, extra=" font-weight=600"))
        for kind, count in kinds[m.model]:
            y += 22
            bar = count / most * (right - left)
            parts.append(_label(left - 10, y, kind, "end", 11))
            parts.append(f"<rect x={left} y={y - 11:.1f} width={bar:.1f} height=14 fill={colour[m.model]} />")
            parts.append(_label(left + bar + 4, y, str(count), size=10))
        y += 6
    return _svg(y + 10, "".join(parts), width)


def _explorer(models: list[str]) -> str:
    options = "".join(
        f"<option value='wrong:{i}'>{html.escape(m)} wrong where another was right</option>"
        for i, m in enumerate(models)
    )
    return (
        "<section><h2>Rows</h2><div class=controls>"
        "<select id=filter><option value=all>all rows</option><option value=disagree>disagreements only</option>"
        f"<option value=failed>failures only</option>{options}</select>"
        "<input id=search type=search placeholder='search inputs, answers, references and ids'>"
        "<span id=count></span><button id=prev>previous</button><button id=next>next</button></div>"
        "<table id=rows class=rows><thead></thead><tbody></tbody></table></section>"
    )


def _usd(value: str | None) -> str:
    return "-" if value is None else f"${float(value):.6f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}header p{margin:0;color:#555}
.notes,.small{color:#666;font-size:12px}.sentences li{margin:2px 0}
table{border-collapse:collapse;font-size:13px}td,th{padding:4px 8px;border-bottom:1px solid #e5e5e5;text-align:right}
td:first-child,th:first-child{text-align:left}.matrix td{text-align:center}
.chart svg{max-width:100%;height:auto}.controls{display:flex;gap:8px;align-items:center;margin-bottom:8px}
.rows td{text-align:left;vertical-align:top;max-width:320px;overflow-wrap:anywhere}.rows tr.focus{background:#fff6d5}
.confusions{display:flex;flex-wrap:wrap;gap:4px 32px}h3{font-size:14px;margin:8px 0 4px}
.matrix td.diag{background:#e3f1e7;font-weight:600}.recommendation{font-size:15px;margin:4px 0 10px}
.rows .input{color:#444;white-space:pre-wrap}.rows .input b{color:#222}
.bad{color:#b03a2e}.good{color:#1e7d44}.score{font-weight:600}#search{flex:1}
"""

SCRIPT = r"""
(function(){
  var data = JSON.parse(document.getElementById('data').textContent);
  var models = data.models, rows = data.rows, page = 0, size = 50, shown = rows;
  var filter = document.getElementById('filter'), search = document.getElementById('search');
  var body = document.querySelector('#rows tbody'), head = document.querySelector('#rows thead');
  function cell(tr, text, cls){ var td = document.createElement('td'); td.textContent = text == null ? '' : text; if (cls) td.className = cls; tr.appendChild(td); return td; }
  var hr = document.createElement('tr'); ['id', 'input', 'reference'].concat(models).forEach(function(m){ var th = document.createElement('th'); th.textContent = m; hr.appendChild(th); }); head.appendChild(hr);
  function scores(r){ return models.map(function(m){ var a = r.m[m]; return a ? a[2] : null; }); }
  function keep(r){
    var v = filter.value, s = scores(r);
    if (v === 'failed' && !models.some(function(m){ return r.m[m] && !r.m[m][0]; })) return false;
    if (v === 'disagree' && new Set(s.map(String)).size < 2) return false;
    if (v.indexOf('wrong:') === 0) { var i = +v.slice(6); if (!(s[i] === 0 && s.some(function(x){ return x === 1; }))) return false; }
    var q = search.value.toLowerCase();
    if (q && !(r.id.toLowerCase().indexOf(q) >= 0 || (r.ref || '').toLowerCase().indexOf(q) >= 0 ||
        (r.in || []).some(function(p){ return p[1].toLowerCase().indexOf(q) >= 0; }) ||
        models.some(function(m){ return r.m[m] && (r.m[m][1] || '').toLowerCase().indexOf(q) >= 0; }))) return false;
    return true;
  }
  function draw(){
    body.textContent = '';
    var focus = decodeURIComponent((location.hash.match(/row=([^&]*)/) || [])[1] || '');
    shown.slice(page * size, page * size + size).forEach(function(r){
      var tr = document.createElement('tr'); tr.id = 'row-' + r.id; if (r.id === focus) tr.className = 'focus';
      var link = cell(tr, ''); var a = document.createElement('a'); a.href = '#row=' + encodeURIComponent(r.id); a.textContent = r.id; link.appendChild(a);
      var input = cell(tr, '', 'input');
      (r.in || []).forEach(function(p, k){ if (k) input.appendChild(document.createElement('br')); var b = document.createElement('b'); b.textContent = p[0] + ': '; input.appendChild(b); input.appendChild(document.createTextNode(p[1])); });
      cell(tr, r.ref);
      models.forEach(function(m){
        var x = r.m[m]; if (!x) { cell(tr, ''); return; }
        var td = cell(tr, x[1], x[0] ? '' : 'bad');
        if (data.scored && x[2] != null) { var b = document.createElement('div'); b.className = 'score ' + (x[2] >= 1 ? 'good' : 'bad'); b.textContent = 'score ' + x[2]; td.appendChild(b); }
      });
      body.appendChild(tr);
    });
    document.getElementById('count').textContent = shown.length + ' rows, page ' + (page + 1) + ' of ' + Math.max(1, Math.ceil(shown.length / size));
    document.body.dataset.shown = String(shown.length);
  }
  function apply(){ shown = rows.filter(keep); page = 0; draw(); }
  function fromHash(){
    var f = (location.hash.match(/filter=([^&]*)/) || [])[1]; if (f) filter.value = decodeURIComponent(f);
    var q = (location.hash.match(/q=([^&]*)/) || [])[1]; if (q) search.value = decodeURIComponent(q);
    shown = rows.filter(keep);
    var focus = decodeURIComponent((location.hash.match(/row=([^&]*)/) || [])[1] || '');
    var at = shown.findIndex(function(r){ return r.id === focus; }); page = at >= 0 ? Math.floor(at / size) : 0;
    draw();
  }
  filter.onchange = apply; search.oninput = apply;
  document.getElementById('prev').onclick = function(){ if (page > 0) { page--; draw(); } };
  document.getElementById('next').onclick = function(){ if ((page + 1) * size < shown.length) { page++; draw(); } };
  window.addEventListener('hashchange', fromHash);
  fromHash();
  document.body.dataset.ready = '1';
})();
"""
