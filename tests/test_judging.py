"""judging.py: the job a judge runs is derived from the judged job's spec."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from batchrunner.judging import judge_spec
from batchrunner.spec import load_spec


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
