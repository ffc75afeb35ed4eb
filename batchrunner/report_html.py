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
from typing import Any

import polars as pl

from batchrunner import jsontext
from batchrunner.evaluation import ModelFigures, Report, score_text

MAX_ROWS = 5000
ANSWER_CHARS = 160
WIDTH, ROW_HEIGHT = 640, 34
COLOURS = ["#3b6fb6", "#d0743c", "#3c9d5d", "#9b59b6", "#c0392b", "#16a085", "#7f8c8d", "#b7950b"]


def render(
    report: Report,
    data: pl.DataFrame,
    *,
    id_column: str,
    reference: str | None,
    answer_column: str,
    by: str | None = None,
) -> str:
    """The whole page. `data` is the output (one row per input row and model), with `id_column`."""
    models = [m.model for m in report.models]
    colour = {model: COLOURS[i % len(COLOURS)] for i, model in enumerate(models)}
    rows, total_rows = _explorer_rows(data, models, id_column, reference, answer_column, report.score_column)
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
        _chart(f"Score by {by}", _slices(data, models, colour, by, report.score_column))
        if by and report.score_column
        else "",
        _chart("Failed rows by kind of error", _errors(report, colour)),
        _explorer(models),
    ]
    data_json = jsontext.dumps(
        payload, ensure_ascii=False
    )  # JSON.parse reads it: strict.replace("<", "\\u003c").replace("\u2028", "\\u2028")
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
    data: pl.DataFrame, models: list[str], id_column: str, reference: str | None, answer: str, score: str | None
) -> tuple[list[dict[str, Any]], int]:
    """One entry per input row: its id, reference and each model's answer, score and status; the rows the
    explorer is most for (failures, disagreements) first when there are more than MAX_ROWS."""
    if data.is_empty():
        return [], 0
    by_row: dict[Any, dict[str, Any]] = {}
    columns = [id_column, "requested_model", "status", "error", answer, *([reference] if reference else [])]
    columns += [score] if score else []
    for record in data.select(list(dict.fromkeys(columns))).iter_rows(named=True):
        entry = by_row.setdefault(
            record[id_column],
            {"id": str(record[id_column]), "ref": _cut(record.get(reference)) if reference else None, "m": {}},
        )
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
    return f"<section><h2>Models</h2><table class=figures><tr>{header}</tr>{''.join(body)}</table></section>"


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


def _svg(height: int, body: str) -> str:
    return f"<svg viewBox='0 0 {WIDTH} {height}' width={WIDTH} height={height} role=img>{body}</svg>"


def _label(x: float, y: float, text: str, anchor: str = "start", size: int = 12) -> str:
    return f"<text x={x:.1f} y={y:.1f} font-size={size} text-anchor={anchor}>{html.escape(text)}</text>"


def _dot_interval(report: Report, colour: dict[str, str]) -> str:
    models = sorted((m for m in report.models if m.score is not None), key=lambda m: -m.score.mean)  # type: ignore[union-attr]  # filtered just before
    if not models:
        return ""
    left, right = 230, WIDTH - 170  # room on the right for the figures
    high = max(1.0, *(m.score.high for m in models if m.score))
    low = min(0.0, *(m.score.low for m in models if m.score))

    def x(value: float) -> float:
        return left + (value - low) / (high - low) * (right - left)

    parts = [_axis(x, low, high, len(models) * ROW_HEIGHT + 10)]
    for i, m in enumerate(models):
        assert m.score is not None
        y = 20 + i * ROW_HEIGHT
        parts.append(_label(left - 10, y + 4, m.model, "end"))
        parts.append(
            f"<line x1={x(m.score.low):.1f} x2={x(m.score.high):.1f} y1={y} y2={y} stroke={colour[m.model]} stroke-width=3 />"
        )
        parts.append(f"<circle class=dot cx={x(m.score.mean):.1f} cy={y} r=6 fill={colour[m.model]} />")
        parts.append(_label(WIDTH - 4, y + 4, score_text(m), "end", 11))
    return _svg(len(models) * ROW_HEIGHT + 40, "".join(parts))


def _axis(x: Any, low: float, high: float, y: float) -> str:
    ticks = [low + (high - low) * k / 4 for k in range(5)]
    marks = "".join(
        f"<line x1={x(t):.1f} x2={x(t):.1f} y1=5 y2={y} stroke=#ddd />" + _label(x(t), y + 14, f"{t:g}", "middle", 10)
        for t in ticks
    )
    return marks


def _cost_score(report: Report, colour: dict[str, str]) -> str:
    points = [
        (float(m.cost_per_1k_rows_usd or 0), m.score.mean, m.model)
        for m in report.models
        if m.score is not None and m.cost_per_1k_rows_usd is not None
    ]
    if not points:
        return ""
    height, left, bottom = 300, 60, 260
    most_cost = max(p[0] for p in points) or 1.0
    scores = [p[1] for p in points]
    low, high = min(0.0, min(scores)), max(1.0, max(scores))

    def x(cost: float) -> float:  # a square-root scale: cheap models do not all sit on the axis
        return left + math.sqrt(cost / most_cost) * (WIDTH - left - 160)

    def y(score: float) -> float:
        return bottom - (score - low) / (high - low) * (bottom - 20)

    frontier = sorted(
        p for p in points if not any((o[0] <= p[0] and o[1] > p[1]) or (o[0] < p[0] and o[1] >= p[1]) for o in points)
    )
    line = " ".join(f"{x(c):.1f},{y(s):.1f}" for c, s, _ in frontier)
    parts = [
        f"<line x1={left} x2={WIDTH - 20} y1={bottom} y2={bottom} stroke=#999 />",
        f"<line x1={left} x2={left} y1=10 y2={bottom} stroke=#999 />",
        _label((WIDTH + left) / 2, bottom + 30, "cost per 1,000 rows (USD, square-root scale)", "middle", 11),
        _label(14, 20, "score", size=11),
        *(_label(left - 6, y(t) + 4, f"{t:.2f}", "end", 10) for t in (low, (low + high) / 2, high)),
        f"<polyline class=frontier points='{line}' fill=none stroke=#888 stroke-dasharray='4 3' />",
    ]
    on_frontier = {p[2] for p in frontier}
    for cost, score, model in points:
        ring = " stroke=#000 stroke-width=2" if model in on_frontier else ""
        parts.append(f"<circle class=dot cx={x(cost):.1f} cy={y(score):.1f} r=7 fill={colour[model]}{ring} />")
        parts.append(_label(x(cost) + 10, y(score) + 4, f"{model} (${cost:.4f})", size=11))
    return _svg(height, "".join(parts))


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
    left, right = 230, WIDTH - 20
    most = max(q[-1] for q in quantiles.values()) or 1.0

    def x(value: float) -> float:
        return left + value / most * (right - left)

    parts = [_axis(x, 0.0, most, len(quantiles) * ROW_HEIGHT + 10)]
    for i, (model, (p5, p25, p50, p75, p95)) in enumerate(quantiles.items()):
        y = 20 + i * ROW_HEIGHT
        parts.append(_label(left - 10, y + 4, model, "end"))
        parts.append(f"<line x1={x(p5):.1f} x2={x(p95):.1f} y1={y} y2={y} stroke={colour[model]} />")
        parts.append(
            f"<rect x={x(p25):.1f} y={y - 8} width={max(1.0, x(p75) - x(p25)):.1f} height=16 fill={colour[model]} opacity=0.5 />"
        )
        parts.append(f"<line x1={x(p50):.1f} x2={x(p50):.1f} y1={y - 9} y2={y + 9} stroke=#000 stroke-width=2 />")
        parts.append(_label(right, y + 4, f"p50 {p50:.2f} s", "end", 10))
    return _svg(len(quantiles) * ROW_HEIGHT + 40, "".join(parts))


def _slices(data: pl.DataFrame, models: list[str], colour: dict[str, str], by: str | None, score: str | None) -> str:
    if data.is_empty() or by is None or score is None or by not in data.columns:
        return ""
    means = data.group_by(by, "requested_model").agg(pl.col(score).mean().alias("mean")).sort(by)
    slices = list(dict.fromkeys(str(v) for v in means[by].to_list()))[:20]
    table = {(str(row[by]), row["requested_model"]): row["mean"] for row in means.iter_rows(named=True)}
    group = len(models) * 14 + 12
    left = 160
    parts = []
    for i, value in enumerate(slices):
        y0 = 10 + i * group
        parts.append(_label(left - 10, y0 + group / 2, value, "end"))
        for j, model in enumerate(models):
            mean = table.get((value, model))
            if mean is None:
                continue
            width = mean * (WIDTH - left - 80)
            parts.append(f"<rect x={left} y={y0 + j * 14} width={width:.1f} height=12 fill={colour[model]} />")
            parts.append(_label(left + width + 4, y0 + j * 14 + 10, f"{mean:.2f}", size=10))
    legend = "".join(
        f"<rect x={left + k * 150} y={len(slices) * group + 16} width=10 height=10 fill={colour[m]} />"
        + _label(left + k * 150 + 14, len(slices) * group + 25, m[:22], size=10)
        for k, m in enumerate(models)
    )
    return _svg(len(slices) * group + 40, "".join(parts) + legend)


def _errors(report: Report, colour: dict[str, str]) -> str:
    models: list[ModelFigures] = [m for m in report.models if m.errors]
    if not models:
        return "<p class=small>No row failed.</p>"
    rows = [
        (m.model, kind, count) for m in models for kind, count in sorted(m.errors.items(), key=lambda kv: -kv[1])[:6]
    ]
    most = max(count for _, _, count in rows)
    left = 330
    parts = []
    for i, (model, kind, count) in enumerate(rows):
        y = 16 + i * 22
        parts.append(_label(left - 10, y + 4, f"{model}: {kind}"[:48], "end", 11))
        parts.append(
            f"<rect x={left} y={y - 8} width={count / most * (WIDTH - left - 60):.1f} height=14 fill={colour[model]} />"
        )
        parts.append(_label(left + count / most * (WIDTH - left - 60) + 4, y + 4, str(count), size=10))
    return _svg(len(rows) * 22 + 20, "".join(parts))


def _explorer(models: list[str]) -> str:
    options = "".join(
        f"<option value='wrong:{i}'>{html.escape(m)} wrong where another was right</option>"
        for i, m in enumerate(models)
    )
    return (
        "<section><h2>Rows</h2><div class=controls>"
        "<select id=filter><option value=all>all rows</option><option value=disagree>disagreements only</option>"
        f"<option value=failed>failures only</option>{options}</select>"
        "<input id=search type=search placeholder='search answers, references and ids'>"
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
.bad{color:#b03a2e}.good{color:#1e7d44}.score{font-weight:600}#search{flex:1}
"""

SCRIPT = r"""
(function(){
  var data = JSON.parse(document.getElementById('data').textContent);
  var models = data.models, rows = data.rows, page = 0, size = 50, shown = rows;
  var filter = document.getElementById('filter'), search = document.getElementById('search');
  var body = document.querySelector('#rows tbody'), head = document.querySelector('#rows thead');
  function cell(tr, text, cls){ var td = document.createElement('td'); td.textContent = text == null ? '' : text; if (cls) td.className = cls; tr.appendChild(td); return td; }
  var hr = document.createElement('tr'); ['id', 'reference'].concat(models).forEach(function(m){ var th = document.createElement('th'); th.textContent = m; hr.appendChild(th); }); head.appendChild(hr);
  function scores(r){ return models.map(function(m){ var a = r.m[m]; return a ? a[2] : null; }); }
  function keep(r){
    var v = filter.value, s = scores(r);
    if (v === 'failed' && !models.some(function(m){ return r.m[m] && !r.m[m][0]; })) return false;
    if (v === 'disagree' && new Set(s.map(String)).size < 2) return false;
    if (v.indexOf('wrong:') === 0) { var i = +v.slice(6); if (!(s[i] === 0 && s.some(function(x){ return x === 1; }))) return false; }
    var q = search.value.toLowerCase();
    if (q && !(r.id.toLowerCase().indexOf(q) >= 0 || (r.ref || '').toLowerCase().indexOf(q) >= 0 ||
        models.some(function(m){ return r.m[m] && (r.m[m][1] || '').toLowerCase().indexOf(q) >= 0; }))) return false;
    return true;
  }
  function draw(){
    body.textContent = '';
    var focus = decodeURIComponent((location.hash.match(/row=([^&]*)/) || [])[1] || '');
    shown.slice(page * size, page * size + size).forEach(function(r){
      var tr = document.createElement('tr'); tr.id = 'row-' + r.id; if (r.id === focus) tr.className = 'focus';
      var link = cell(tr, ''); var a = document.createElement('a'); a.href = '#row=' + encodeURIComponent(r.id); a.textContent = r.id; link.appendChild(a);
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
