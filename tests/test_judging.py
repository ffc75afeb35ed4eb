"""judging.py: the job a judge runs is derived from the judged job's spec."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from batchrunner.judging import INHERITED, judge_overrides, judge_spec
from batchrunner.spec import REQUEST_SHAPING_KEYS, load_spec


def test_a_judge_of_an_image_job_is_asked_in_text(write_spec: Callable[..., Path]) -> None:
    """The judged job's images:, files: and audio: do not follow into the judge's requests: its prompt is the
    rubric, in text, and sends no media (and pays for none)."""
    rubric = "Ticket: {text}\nAnswer: {answer}\nGrade it."
    metric = {"judge": {"model": "openai/gpt-4o", "rubric": rubric, "scale": 5}}
    spec = load_spec(write_spec(images=["subject"], files=["text"], evaluate={"metric": metric}))
    assert spec.prompt_template().media_kinds == {"image", "file"}
    assert spec.evaluate is not None
    judged = judge_spec(spec, spec.evaluate.judges()[0])
    assert (judged.images, judged.files, judged.audio) == ([], [], [])
    assert judged.prompt_template().media_kinds == set()


async def test_a_judge_grades_each_sample_once_and_each_answer_keeps_its_own_grade(
    write_spec: Callable[..., Path], tickets_csv: Path
) -> None:
    """With samples: 3, 5 rows give 15 answers and exactly 15 paid grades, one per answer, each kept under its
    answer (a score on every output row), and a rerun asks for none again."""
    import polars as pl

    from batchrunner.runner import RunSettings, run_job
    from batchrunner.sandbox import Sandbox, SandboxConfig

    rubric = "Ticket: {text}\nAnswer: {answer}\nGrade it."
    metric = {"judge": {"model": "openai/gpt-4o", "rubric": rubric, "scale": 5}}
    async with Sandbox(SandboxConfig(record_bodies=True)) as sandbox:
        spec_path = write_spec(samples=3, dedupe=False, evaluate={"metric": metric}, api={"base_url": sandbox.base_url})
        spec = load_spec(spec_path)
        first = await run_job(spec, RunSettings(limit=5))
        graded = [body for body in sandbox.stats.bodies if body["model"] == "openai/gpt-4o"]
        again = await run_job(spec, RunSettings(limit=5))
    assert sandbox.stats.by_model["openai/gpt-4o-mini"] == 15
    assert len(graded) == 15, "one grade per answer, not one per answer and sample of the judge"
    assert sandbox.stats.by_model["openai/gpt-4o"] == 15, "a rerun asks for no grade again"
    assert first.report.judging is not None and first.report.judging.ok == 15
    assert again.report.judging is not None and again.report.judging.done == 0
    with sqlite3.connect(spec.checkpoint_path()) as db:
        kept = db.execute("SELECT row_id FROM results WHERE requested_model = 'openai/gpt-4o' AND status = 'ok'")
        assert len({row_id for (row_id,) in kept}) == 15, "each answer's grade is kept under its own key"
    output = pl.read_parquet(spec.output)
    assert output.height == 15 and output["score"].null_count() == 0, "every answer has its grade"


def test_every_key_that_shapes_a_request_is_decided_for_a_judge(write_spec: Callable[..., Path]) -> None:
    """A judge's job sets every request-shaping key of the spec, or names it as kept from the job (INHERITED):
    a key added to spec.REQUEST_SHAPING_KEYS cannot reach the grades unexamined."""
    spec = load_spec(write_spec(evaluate={"metric": {"judge": {"model": "openai/gpt-4o", "rubric": "{answer}"}}}))
    assert spec.evaluate is not None
    overrides = judge_overrides(spec.evaluate.judges()[0])
    assert set(overrides) | INHERITED >= REQUEST_SHAPING_KEYS
    assert not INHERITED & set(overrides)
