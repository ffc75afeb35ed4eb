"""The evaluation report's figures: intervals, paired comparisons, and the same numbers in every format."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from batchrunner.cli import main
from batchrunner.evaluation import build, mcnemar_p, mean_interval, to_markdown, wilson

REPO = Path(__file__).resolve().parent.parent


def answers(rows: list[int], models: list[str], scores: list[float], **columns: list[Any]) -> pl.DataFrame:
    """Answers for `build`: each row's position, model (asked and answering) and score; every answer ok, $0.001,
    0.5 s, 10 + 5 tokens and one attempt, unless `columns` says otherwise (or adds columns)."""
    n = len(rows)
    made: dict[str, list[Any]] = {
        "row": rows,
        "requested_model": models,
        "model": models,
        "status": ["ok"] * n,
        "error": [None] * n,
        "score": scores,
        "cost_usd": ["0.001"] * n,
        "latency_s": [0.5] * n,
        "billed_prompt_tokens": [10] * n,
        "billed_completion_tokens": [5] * n,
        "attempts": [1] * n,
    }
    return pl.DataFrame({**made, **columns})


def test_wilson_interval_stays_in_bounds_and_matches_the_formula() -> None:
    """0 of 10 gives [0, 0.278] (not the collapsed 0 ± 0), and 50 of 100 is symmetric around 0.5."""
    none = wilson(0, 10)
    assert none.low == 0 and none.high == pytest.approx(0.2775, abs=1e-4)
    half = wilson(50, 100)
    assert (
        half.mean == 0.5
        and half.low == pytest.approx(0.4038, abs=1e-4)
        and half.high == pytest.approx(0.5962, abs=1e-4)
    )


def test_mcnemar_uses_only_discordant_rows() -> None:
    """Exact binomial below 25 discordant rows, chi-square with continuity correction above; no discord is p = 1."""
    assert mcnemar_p(0, 10) == pytest.approx(2 / 2**10)
    assert mcnemar_p(20, 10) == pytest.approx(math.erfc(math.sqrt((10 - 1) ** 2 / 30 / 2)))
    assert mcnemar_p(0, 0) == 1.0


def test_paired_differences_tell_real_gaps_from_noise() -> None:
    """Model a right on 90 of 100 rows and b on 60: a beats b; a and a copy of it cannot be told apart."""
    rows = 100
    a = [1.0] * 90 + [0.0] * 10
    b = [1.0] * 60 + [0.0] * 40
    frames = [answers(list(range(rows)) * 3, ["a"] * rows + ["b"] * rows + ["a2"] * rows, a + b + a[5:] + a[:5])]
    report = build("job", frames, id_column="row", score_column="score")
    by_pair = {(p.a, p.b): p for p in report.pairs}
    assert by_pair[("a", "b")].sentence.startswith("a beats b by 30 points")
    assert by_pair[("a", "b")].a_only_right == 30 and by_pair[("a", "b")].b_only_right == 0
    assert "cannot be told apart on these 100 rows" in by_pair[("a", "a2")].sentence
    assert mean_interval([1.0, 1.0]).low == 1.0


def test_paired_differences_use_only_the_rows_both_models_answered() -> None:
    """b never answered rows 7-9 and has no score for row 4: the pair is the 6 rows both scored, b's two
    failed rows among them counting as wrong, and its difference is over those rows only."""
    a = answers(list(range(10)), ["a"] * 10, [1.0] * 8 + [0.0] * 2)
    b = answers(
        list(range(7)),
        ["b"] * 7,
        [1.0, 0.0, 1.0, 0.0, None, 0.0, 0.0],  # type: ignore[list-item]
        status=["ok"] * 5 + ["failed"] * 2,
        error=[None] * 5 + ["provider error: boom"] * 2,
    )
    report = build("job", [a, b], id_column="row", score_column="score")
    [pair] = report.pairs
    assert pair.rows == 6
    assert pair.difference.mean == pytest.approx(4 / 6)  # rows 1, 3, 5, 6: a right, b wrong; 0 and 2: both right
    assert (pair.a_only_right, pair.b_only_right) == (4, 0)
    assert [(m.model, m.rows, m.failed, m.scored) for m in report.models] == [("a", 10, 0, 10), ("b", 7, 2, 6)]


def test_the_evaluation_example_reports_the_same_numbers_as_markdown_and_json(
    tmp_path: Path, write_spec: Callable[..., Path]
) -> None:
    """jobs/ticket_eval.yaml on the sandbox: every row scored, three models; `report --format md` shows
    exactly the accuracies and differences `--format json` gives; the run's summary shows each model's score."""
    spec = tmp_path / "ticket_eval.yaml"
    text = (REPO / "jobs" / "ticket_eval.yaml").read_text()
    spec.write_text(text.replace("../sample_data/", f"{REPO}/sample_data/").replace("../out/", "out/"))
    runner = CliRunner()
    run = runner.invoke(main, ["run", str(spec), "--sandbox"])
    assert run.exit_code == 0, run.output
    assert run.stdout.count("  score ") == 3
    output = pl.read_parquet(tmp_path / "out" / "ticket_eval.parquet")
    assert output.height == 900 and output["score"].null_count() == 0
    as_json = json.loads(runner.invoke(main, ["report", str(spec), "--sandbox", "--format", "json"]).stdout)
    as_md = runner.invoke(main, ["report", str(spec), "--sandbox", "--format", "md"]).stdout
    assert len(as_json["models"]) == 3
    for model in as_json["models"]:
        accuracy = output.filter(pl.col("requested_model") == model["model"])["score"].mean()
        assert model["score"]["mean"] == pytest.approx(accuracy)
        assert f"| {model['model']} | 300 | 300 | {100 * model['score']['mean']:.1f}% (" in as_md
    for pair in as_json["pairs"]:
        assert pair["sentence"] in as_md
    assert to_markdown(build("x", [], id_column="row", score_column=None)).startswith("# x")


def test_score_rescoring_after_an_edit_to_evaluate_sends_nothing(tmp_path: Path) -> None:
    """Changing the evaluate: block and running `score` rewrites the score columns from the checkpoint alone:
    no run is recorded and no request could be sent (there is no server to send it to)."""
    spec = tmp_path / "ticket_eval.yaml"
    text = (REPO / "jobs" / "ticket_eval.yaml").read_text()
    text = text.replace("../sample_data/", f"{REPO}/sample_data/").replace("../out/", "out/")
    spec.write_text(text)
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(spec), "--sandbox", "--limit", "20"]).exit_code == 0
    spec.write_text(text.replace("  metric: exact", "  metric: [exact, {name: loose, metric: contains}]"))
    scored = runner.invoke(main, ["score", str(spec), "--sandbox"])
    assert scored.exit_code == 0, scored.output
    output = pl.read_parquet(tmp_path / "out" / "ticket_eval.parquet")
    assert {"score_exact", "score_loose"} <= set(output.columns) and "score" not in output.columns
    assert (output["score_loose"] >= output["score_exact"]).all()
    status = json.loads(runner.invoke(main, ["status", str(spec), "--sandbox", "--json"]).stdout)
    assert status["runs"] == 1, "scoring is not a run"


def test_a_by_column_the_output_lacks_is_refused_naming_only_the_users_columns(tmp_path: Path) -> None:
    """report --by a column the output lacks (or batchrunner's own row-position column) is exit 2 listing the
    output's columns, without the internal one: before, it was listed as an input column, and could be charted."""
    spec = tmp_path / "ticket_eval.yaml"
    text = (REPO / "jobs" / "ticket_eval.yaml").read_text()
    spec.write_text(text.replace("../sample_data/", f"{REPO}/sample_data/").replace("../out/", "out/"))
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(spec), "--sandbox", "--limit", "5"]).exit_code == 0
    for by in ("tier", "__batchrunner_row"):
        refused = runner.invoke(main, ["report", str(spec), "--sandbox", "--by", by])
        assert refused.exit_code == 2, refused.output
        assert f"--by: {by!r} is not a column of the output; it has: ticket_id" in refused.output
        assert "__batchrunner_row," not in refused.output


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_html_report_renders_in_a_browser_and_its_filters_work(tmp_path: Path) -> None:
    """The example's HTML report in headless Chromium: no script errors, the charts drawn, and the row
    filters (disagreements, one model wrong where another was right, search, permalink) show the right rows."""
    spec = tmp_path / "ticket_eval.yaml"
    text = (REPO / "jobs" / "ticket_eval.yaml").read_text()
    spec.write_text(text.replace("../sample_data/", f"{REPO}/sample_data/").replace("../out/", "out/"))
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(spec), "--sandbox", "--limit", "60"]).exit_code == 0
    made = runner.invoke(main, ["report", str(spec), "--sandbox", "--by", "customer_tier"])
    assert made.exit_code == 0, made.output
    page = tmp_path / "out" / "ticket_eval.report.html"
    output = pl.read_parquet(tmp_path / "out" / "ticket_eval.parquet")
    by_row = output.group_by("ticket_id").agg(pl.col("score"), pl.col("requested_model"))
    disagree = sum(1 for scores in by_row["score"] if len(set(scores)) > 1)
    llama_wrong = output.pivot("requested_model", index="ticket_id", values="score")
    llama_only_wrong = llama_wrong.filter(
        (pl.col("meta-llama/llama-3.1-8b-instruct") == 0)
        & ((pl.col("anthropic/claude-3.5-haiku") == 1) | (pl.col("openai/gpt-4o-mini") == 1))
    ).height

    def dom(fragment: str) -> str:
        shown = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", f"{page.as_uri()}#{fragment}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return shown.stdout

    everything = dom("")
    assert 'data-ready="1"' in everything and "data-errors" not in everything
    assert everything.count("<svg") >= 4 and everything.count('class="dot"') >= 6, "the charts are drawn"
    assert 'data-shown="60"' in everything
    assert f'data-shown="{disagree}"' in dom("filter=disagree")
    assert f'data-shown="{llama_only_wrong}"' in dom("filter=wrong:2")
    assert 'data-shown="1"' in dom("q=T-10007")
    focused = dom("row=T-10042")
    assert 'id="row-T-10042" class="focus"' in focused, "a permalink opens the row's page, highlighted"
    laid_out = geometry(page)
    assert laid_out["texts"] > 40 and laid_out["svgs"] >= 4
    assert laid_out["overlaps"] == [] and laid_out["cut"] == [] and laid_out["negative"] == []
    assert sorted(laid_out["named"]) == sorted(output["requested_model"].unique().to_list())


CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu"]
GEOMETRY = r"""<script>(function(){
  var out = {overlaps: [], cut: [], negative: [], named: [], texts: 0, svgs: 0};
  document.querySelectorAll('section.chart svg').forEach(function(svg, k){
    out.svgs++;
    var box = svg.getBoundingClientRect(), texts = Array.prototype.slice.call(svg.querySelectorAll('text'));
    var rects = texts.map(function(t){ return t.getBoundingClientRect(); });
    texts.forEach(function(t, i){
      var r = rects[i], name = k + ': ' + t.textContent; out.texts++;
      if (r.width === 0 || r.left < box.left - 0.5 || r.right > box.right + 0.5 || r.top < box.top - 0.5 ||
          r.bottom > box.bottom + 0.5 || t.getComputedTextLength() > Math.max(r.width, r.height) + 1 || /…$/.test(t.textContent)) out.cut.push(name);
      for (var j = i + 1; j < texts.length; j++) {
        var o = rects[j], w = Math.min(r.right, o.right) - Math.max(r.left, o.left), h = Math.min(r.bottom, o.bottom) - Math.max(r.top, o.top);
        if (w > 0.5 && h > 0.5) out.overlaps.push(name + ' | ' + texts[j].textContent);
      }
      if (k === 0 && t.getAttribute('text-anchor') === 'end' && /\//.test(t.textContent)) out.named.push(t.textContent);
    });
  });
  document.querySelectorAll('table.figures td, .confusion td').forEach(function(td){
    if (/^[-\u2212]\s*\d/.test(td.textContent.trim())) out.negative.push(td.textContent);
  });
  document.body.setAttribute('data-geometry', JSON.stringify(out));
})();</script>"""


def geometry(page: Path) -> dict[str, Any]:
    """Lays `page` out in headless Chromium and measures each chart's text labels: pairs whose boxes overlap,
    labels outside their chart (cut) or ending in an ellipsis, the score chart's model names, and any negative count
    in the models table or a confusion matrix."""
    measured = page.with_name(page.stem + ".measured.html")
    measured.write_text(page.read_text().replace("</body>", GEOMETRY + "</body>"))
    shown = subprocess.run(
        [*CHROMIUM, "--window-size=1280,2000", "--dump-dom", measured.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = re.search(r'data-geometry="([^"]*)"', shown.stdout)
    assert found is not None, shown.stdout[-2000:]
    return dict(json.loads(html.unescape(found.group(1))))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_long_names_failures_and_dedupe_copies_lay_out_without_cut_or_overlapping_labels(tmp_path: Path) -> None:
    """A report with long model names, long error kinds, slices, close points on the cost chart and dedupe copies
    (0 attempts), measured in Chromium: no label overlaps another or leaves its chart, no count is negative."""
    from batchrunner.report_html import render

    n = 60
    models = [LONG, "anthropic/claude-3.5-haiku", "openai/gpt-4o-mini-2024-07-18", "x/tiny"]
    frame = answers(
        list(range(n)) * 4,
        [m for m in models for _ in range(n)],
        [float((i + k) % (k + 2) != 0) for k in range(4) for i in range(n)],
        status=(["ok"] * (n - 6) + ["failed"] * 6) * 4,
        error=([None] * (n - 6) + ["HTTP 502: the upstream provider returned an error page"] * 3 + ["timeout"] * 3) * 4,
        attempts=([1] * (n - 10) + [0] * 10) * 4,
        cost_usd=[c for c in ("0.0001", "0.00011", "0.002", "0.0000001") for _ in range(n)],
        latency_s=[0.015625 * (1 + i % 7) for i in range(4 * n)],
        tier=["a rather long customer tier name, longer than most", "pro", "free"] * (4 * n // 3),
        answer=["bug"] * 4 * n,
        expected=["bug", "billing"] * 2 * n,
    )
    figures = build(
        "long",
        frame,
        id_column="row",
        score_column="score",
        reference="expected",
        answer_column="answer",
        labels=["bug", "billing"],
    )
    page = tmp_path / "long.html"
    page.write_text(render(figures, frame, id_column="row", reference="expected", answer_column="answer", by="tier"))
    laid_out = geometry(page)
    assert laid_out["svgs"] == 5 and laid_out["texts"] > 60
    assert laid_out["overlaps"] == [] and laid_out["cut"] == [] and laid_out["negative"] == []
    assert sorted(laid_out["named"]) == sorted(models), "every model named in full in the score chart"


JUDGED = """
name: judged
input: {input}
id_column: ticket_id
output: out/judged.parquet
models: [openai/gpt-4o-mini, meta-llama/llama-3.1-8b-instruct]
prompt: "Summarise: {{text}}"
params: {{max_tokens: 60}}
evaluate:
  metric:
    - judge: {{model: openai/gpt-4o, rubric: "Ticket: {{text}}\\nSummary: {{answer}}\\nGrade the summary.", scale: 5}}
concurrency: 4
"""


async def test_a_judge_grades_every_answer_once_and_reports_its_cost_apart(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Each answer is graded by the judge model through the same machinery; the score is (grade - 1) / 4;
    the grades' cost is reported apart; a rerun asks no grade again; a stop half-way through the grading,
    then a rerun, pays for no grade twice."""
    from batchrunner.halt import StopReason
    from batchrunner.runner import run_job
    from batchrunner.sandbox import Sandbox, SandboxConfig
    from batchrunner.spec import load_spec

    rows = tmp_path / "rows.csv"
    pl.DataFrame({"ticket_id": [f"T-{i}" for i in range(30)], "text": [f"text {i}" for i in range(30)]}).write_csv(rows)
    spec_path = tmp_path / "judged.yaml"
    spec_path.write_text(JUDGED.format(input=rows.name))
    async with Sandbox(SandboxConfig(latency_s=0.01)) as sandbox:
        spec = load_spec(spec_path, overrides={"api": {"base_url": sandbox.base_url}})
        halted = {"done": False}

        def stop_while_grading(result: Any) -> None:
            if result.requested_model == "openai/gpt-4o" and not halted["done"]:
                halted["done"] = True
                raise_stop()

        first_halt: list[Any] = []

        def raise_stop() -> None:
            first_halt[0].stop(StopReason.INTERRUPTED, "SIGTERM")

        from batchrunner import runner as runner_module

        real_halt = runner_module.Halt

        class RecordingHalt(real_halt):  # type: ignore[misc,valid-type]  # a Halt the test can reach
            def __init__(self) -> None:
                super().__init__()
                first_halt.append(self)

        from batchrunner.store import Store

        real_add = Store.add

        def add(store: Store, result: Any) -> None:
            real_add(store, result)
            stop_while_grading(result)

        runner_module.Halt = RecordingHalt
        Store.add = add  # type: ignore[method-assign]  # the stop comes in the middle of the grading
        try:
            stopped = await run_job(spec)
        finally:
            runner_module.Halt = real_halt
            Store.add = real_add  # type: ignore[method-assign]
        assert stopped.report.stop is not None and stopped.report.judging is not None
        finished = await run_job(spec)
        again = await run_job(spec)
    grades_asked = sum(n for key, n in sandbox.stats.answered.items())
    assert max(sandbox.stats.answered.values()) == 1, "no answer and no grade was paid for twice"
    assert sandbox.stats.by_model["openai/gpt-4o"] == 60
    assert grades_asked == 60 + 60
    output = pl.read_parquet(spec.output)
    assert output["score"].null_count() == 0 and set(output["score"].to_list()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert finished.report.judging is not None and finished.report.judging.cost_usd > 0
    assert again.report.judging is not None and again.report.judging.done == 0, "a rerun grades nothing again"
    assert stopped.report.summary.by_model.keys() == {"openai/gpt-4o-mini", "meta-llama/llama-3.1-8b-instruct"}
    assert set(stopped.report.judging.by_model) == {"openai/gpt-4o"}, "grades are counted apart from answers"


@pytest.mark.slow
def test_the_html_report_shows_the_json_figures_and_stays_small_at_100k_rows() -> None:
    """The HTML shows the same accuracies, intervals and sentences as the JSON figures; with 100,000 rows
    and three models it embeds at most MAX_ROWS rows of the explorer, says so, and stays under 5 MB."""
    from batchrunner.report_html import MAX_ROWS, render

    rows, models = 100_000, ["a/one", "b/two", "c/three"]
    data = answers(
        list(range(rows)) * 3,
        [m for m in models for _ in range(rows)],
        [float(i % 3 != k) for k in range(3) for i in range(rows)],
        id=[f"R-{i}" for i in range(rows)] * 3,
        expected=["yes"] * rows * 3,
        status=(["ok"] * (rows - 50) + ["failed"] * 50) * 3,
        error=([None] * (rows - 50) + ["HTTP 502: down"] * 50) * 3,
        response=["x" * 400] * rows * 3,
        cost_usd=["0.0001"] * rows * 3,
        latency_s=[0.25] * rows * 3,
    )
    figures = build("big", data, id_column="row", score_column="score")
    page = render(figures, data, id_column="id", reference="expected", answer_column="response")
    assert len(page.encode()) < 5_000_000
    assert f"The row explorer holds {MAX_ROWS:,} of {rows:,} rows" in page
    as_json = figures.to_json()
    for model in as_json["models"]:
        mean, low, high = (model["score"][k] for k in ("mean", "low", "high"))
        assert f"{100 * mean:.1f}% ({100 * low:.1f} to {100 * high:.1f})" in page
    for pair in as_json["pairs"]:
        assert pair["sentence"] in page


def test_samples_are_averaged_per_row_before_intervals() -> None:
    """With samples, a row's score is the mean of its samples: n counts rows (not rows x samples), and a model
    right on 2 of 3 samples of every row scores 2/3 with a zero-width interval, not a binomial one over 3n."""
    rows, samples = 20, 3
    n = rows * samples
    frame = answers(
        [r for r in range(rows) for _ in range(samples)] * 2,
        ["a"] * n + ["b"] * n,
        [1.0, 1.0, 0.0] * rows + [1.0, 0.0, 0.0] * rows,
        sample=list(range(samples)) * rows * 2,
    )
    report = build("job", frame, id_column="row", score_column="score")
    a = report.models[0]
    assert a.scored == rows and a.score is not None and a.score.mean == pytest.approx(2 / 3)
    assert a.score.high - a.score.low == pytest.approx(0.0)
    assert report.pairs[0].rows == rows and report.pairs[0].difference.mean == pytest.approx(1 / 3)
    assert any("mean of its samples" in note for note in report.notes)


def test_retries_count_only_attempts_past_the_first_of_rows_that_were_sent() -> None:
    """Dedupe copies have 0 attempts: they count no retry (the count was attempts minus rows, negative here)."""
    frame = answers([0, 1, 2, 3], ["a"] * 4, [1.0, 1.0, 0.0, 1.0], attempts=[1, 3, 0, 0])
    report = build("job", frame, id_column="row", score_column="score")
    assert report.models[0].retries == 2
    assert report.to_json()["models"][0]["retries"] == 2
    assert "| 2 | 0 |" in to_markdown(report)


def test_an_enum_answer_with_a_reference_gets_a_confusion_matrix_in_json_and_markdown() -> None:
    """References are rows, answers columns; an answer outside the enum is (other), a failed row (no answer)."""
    from batchrunner.evaluation import enum_labels

    response_format = {
        "type": "json_schema",
        "json_schema": {"schema": {"properties": {"category": {"type": "string", "enum": ["bug", "billing"]}}}},
    }
    labels = enum_labels(response_format, "category")
    assert labels == ["bug", "billing"] and enum_labels(response_format, "urgency") is None
    frame = answers(
        [0, 1, 2, 3, 4],
        ["a"] * 5,
        [1.0, 0.0, 1.0, 0.0, 0.0],
        expected=["bug", "bug", "billing", "billing", "billing"],
        answer=["bug", "billing", " Billing", "refund", None],
        status=["ok"] * 4 + ["failed"],
    )
    report = build(
        "job", frame, id_column="row", score_column="score", reference="expected", answer_column="answer", labels=labels
    )
    matrix = report.to_json()["models"][0]["confusion"]
    assert matrix["references"] == ["bug", "billing"]
    assert matrix["answers"] == ["bug", "billing", "(other)", "(no answer)"]
    assert matrix["counts"] == [[1, 1, 0, 0], [0, 1, 1, 1]]
    markdown = to_markdown(report)
    assert "## Confusion matrix: a" in markdown and "| billing | 0 | 1 | 1 | 1 |" in markdown
    assert build("job", frame, id_column="row", score_column="score").models[0].confusion is None


def recommendation_for(scores: dict[str, tuple[int, str]], rows: int = 200) -> Any:
    """The recommendation of models given as name -> (rows right of `rows`, cost per row); right rows come first,
    so the models agree as much as their scores allow."""
    frames = [
        answers(list(range(rows)), [m] * rows, [1.0] * right + [0.0] * (rows - right), cost_usd=[cost] * rows)
        for m, (right, cost) in scores.items()
    ]
    return build("job", frames, id_column="row", score_column="score").recommendation


def test_the_recommendation_names_the_cheapest_model_not_significantly_worse_and_its_saving() -> None:
    """A cheap model 1 point behind the best is chosen, saving the cost difference per 1,000 rows; when every
    cheaper model is significantly worse, or the best is also the cheapest, it says "none" and why."""
    chosen = recommendation_for({"best": (180, "0.01"), "close": (178, "0.002"), "poor": (100, "0.0001")})
    assert chosen.model == "close" and chosen.best == "best" and chosen.saving_per_1k_rows_usd == "8.000000"
    assert chosen.sentence == (
        "cheapest model not significantly worse than the best (best): close, saving $8.00 per 1,000 rows"
    )
    worse = recommendation_for({"best": (180, "0.01"), "poor": (100, "0.0001")})
    assert worse.model is None and worse.sentence.endswith("none; every cheaper model is significantly worse")
    cheapest = recommendation_for({"best": (180, "0.0001"), "dear": (179, "0.01")})
    assert cheapest.model is None and "none; the best, best, is also the cheapest" in cheapest.sentence
    report = build("job", answers([0], ["a"], [1.0]), id_column="row", score_column="score")
    assert report.to_json()["recommendation"]["sentence"].endswith("is the only model scored")
    assert "**Recommendation**: " in to_markdown(report)
    assert build("job", answers([0], ["a"], [1.0]), id_column="row", score_column=None).recommendation is None


def test_slices_get_the_same_intervals_as_the_overall_scores() -> None:
    """Each (slice, model) has Wilson's interval over its rows: 9 of 10 right is 0.9 (0.596 to 0.982)."""
    from batchrunner.evaluation import by_slice

    frame = answers(list(range(20)), ["a"] * 20, [1.0] * 9 + [0.0] + [1.0] * 10, tier=["free"] * 10 + ["pro"] * 10)
    slices = {(s.value, s.model): s for s in by_slice(frame, "tier", "row", "score")}
    free = slices[("free", "a")]
    assert free.rows == 10 and free.score == wilson(9, 10)
    assert free.score.low == pytest.approx(0.596, abs=1e-3) and slices[("pro", "a")].score.mean == 1.0


def rendered(frame: pl.DataFrame, **options: Any) -> str:
    """The HTML report of `frame` (answers in `answer`, ids in `row`), with the figures build gives it."""
    from batchrunner.report_html import render

    figures = build(
        "job",
        frame,
        id_column="row",
        score_column="score",
        reference=options.pop("reference", None),
        answer_column="answer",
        labels=options.pop("labels", None),
    )
    return render(figures, frame, id_column="row", reference=None, answer_column="answer", **options)


LONG = "meta-llama/llama-3.1-8b-instruct-with-a-long-suffix"


def test_the_html_charts_have_round_ticks_with_units_and_full_model_names() -> None:
    """Latency ticks are 0, 0.2, ... ms (not 0.015625), cost ticks are in dollars, and every model name is written
    whole in each chart (the slice legend cut it at 22 characters)."""
    from batchrunner.report_html import nice_ticks

    assert nice_ticks(0, 0.078125) == [0.0, 0.02, 0.04, 0.06, 0.08]
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    n = 40
    frame = answers(
        list(range(n)) * 2,
        ["a"] * n + [LONG] * n,
        [1.0, 0.0] * n,
        answer=["x"] * 2 * n,
        latency_s=[0.0005, 0.0007] * n,
        cost_usd=["0.00001", "0.00008"] * n,
        tier=["free", "pro"] * n,
    )
    page = rendered(frame, by="tier")
    assert ">0.2 ms</text>" in page and "0.015625" not in page
    assert ">$0.02</text>" in page or ">$0.04</text>" in page
    assert page.count(f">{LONG}</text>") >= 3, "the score, latency and slice charts name the model in full"
    assert "anthropic/claude-3.5-h<" not in page and f"{LONG[:22]}<" not in page


def test_the_slice_bars_carry_their_95_percent_interval() -> None:
    """Each (slice, model) bar has a whisker from its interval's low to high end."""
    frame = answers(list(range(20)), ["a"] * 20, [1.0, 0.0] * 10, answer=["x"] * 20, tier=["free", "pro"] * 10)
    page = rendered(frame, by="tier")
    assert page.count("class=whisker") == 2 and "Score by tier, with its 95% interval" in page


def test_the_html_shows_retries_recommendation_and_confusion_matrix() -> None:
    """Dedupe copies give no negative retries; the recommendation and each model's confusion matrix are shown."""
    frame = answers(
        [0, 1, 2, 3] * 2,
        ["a"] * 4 + ["b"] * 4,
        [1.0, 1.0, 0.0, 1.0] * 2,
        attempts=[1, 1, 0, 0] * 2,
        answer=["bug", "billing", "bug", "bug"] * 2,
        expected=["bug", "billing", "billing", "bug"] * 2,
    )
    page = rendered(frame, reference="expected", labels=["bug", "billing"])
    assert "<td>-2</td>" not in page and "<td>0</td><td>0</td></tr>" in page
    assert "<strong>Recommendation</strong>: cheapest model not significantly worse than the best" in page
    assert page.count("<div class=confusion>") == 2 and "<td class=diag>2</td>" in page


def test_the_row_explorer_carries_each_rows_input_escaped_and_capped() -> None:
    """The input columns go into the explorer's data, cut to INPUT_CHARS in all, never able to end the script."""
    from batchrunner.report_html import INPUT_CHARS

    frame = answers([0, 1], ["a", "a"], [1.0, 0.0], answer=["x", "y"], text=["</script><b>hi", "z" * 2000])
    page = rendered(frame, inputs=["text"])
    data = json.loads(page.split("<script type=application/json id=data>")[1].split("</script>")[0])
    assert data["rows"][0]["in"] == [["text", "</script><b>hi"]]
    assert len(data["rows"][1]["in"][0][1]) == INPUT_CHARS and data["rows"][1]["in"][0][1].endswith("…")
    assert "'input'" in page, "the explorer has an input column"
