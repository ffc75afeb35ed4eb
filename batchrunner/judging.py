"""The `judge` metric: another model grades each answer with the rubric the user wrote.

A grade is a request like any other: it goes through the same executor, row policy, rate
limit, retries, budget and checkpoint as the job's own requests. Each answer, a (row, model,
sample), becomes one item to grade, asked once whatever the job's `samples`, and known in the
checkpoint as `<row id>\\x1f<requested model>` (`...\\x1f<sample>` for samples after the first)
under the judge model, with a fingerprint of the rubric rendered over the answer: a rerun
never pays for a grade twice, and a changed rubric or answer is graded again. Grades are
read back into the output's score column when it is built (output.results()), by the same key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import polars as pl

from batchrunner.dataset import ROW_INDEX, Row
from batchrunner.keylog import SAMPLE
from batchrunner.request import RequestBuilder
from batchrunner.spec import JobSpec, MetricSettings
from batchrunner.urls import Location

SEPARATOR = "\x1f"  # between the row id and the answering model in a grade's checkpoint id
ANSWER, REFERENCE = "answer", "reference"
JUDGE_SYSTEM = (
    "You grade answers. Follow the rubric, then reply with JSON only: "
    '{{"grade": <an integer from 1 to SCALE>, "reason": "<at most one sentence>"}}.'
)  # a template like any system prompt: literal braces doubled


# What of the job's request a grade keeps: its provider routing (a data policy, an order, ignored
# providers bind the grades as they bind the answers); image_detail shapes no grade, which sends no image.
# Every other key that shapes a request (spec.REQUEST_SHAPING_KEYS) is set by judge_spec: test_judging
# checks that a new one is decided here.
INHERITED = frozenset({"provider", "image_detail"})


def judge_spec(spec: JobSpec, rule: MetricSettings) -> JobSpec:
    """The job a judge runs: its model, the rubric as the prompt, a grade as a structured answer."""
    return spec.model_copy(update=judge_overrides(rule))


def judge_overrides(rule: MetricSettings) -> dict[str, Any]:
    """The spec keys a judge's job sets (judge_spec), whatever the job's own."""
    judge = rule.judge
    assert judge is not None, "judge_spec takes a judge metric"
    schema = {
        "type": "object",
        "properties": {
            "grade": {"type": "integer", "minimum": 1, "maximum": judge.scale},
            "reason": {"type": "string"},
        },
        "required": ["grade", "reason"],
        "additionalProperties": False,
    }
    return {
        "models": [judge.model],
        "fallbacks": [],
        "server_fallbacks": False,
        "system": JUDGE_SYSTEM.replace("SCALE", str(judge.scale)),
        "prompt": judge.rubric,
        "messages": None,
        "images": [],  # a grade is asked of the answer and the rubric's columns, in text
        "files": [],
        "audio": [],
        "endpoint": "chat",
        "params": {"temperature": 0, "max_tokens": 200},
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "grade", "strict": True, "schema": schema},
        },
        "evaluate": None,
        "cache_system_prompt": False,
        "samples": 1,  # one grade per answer: the answers' samples are items of their own
    }


class Items:
    """The answers to grade, shaped as an input (pending.py reads it like a Dataset)."""

    def __init__(self, rows: list[Row], path: Location) -> None:
        self._rows = rows
        self.path = path
        self.rows = len(rows)

    def batches(self, *, limit: int | None = None, batch_size: int = 8192, start: int = 0) -> Iterator[list[Row]]:
        rows = self._rows if limit is None else self._rows[:limit]
        for first in range(start, len(rows), batch_size):
            yield rows[first : first + batch_size]


def items(spec: JobSpec, frames: Iterator[pl.DataFrame], input_columns: list[str]) -> Items:
    """One item per answered (row, model) pair of the output frames (with ROW_INDEX): the input row's
    values, the answer (the structured field, if `evaluate.field` says) and the reference."""
    evaluate = spec.evaluate
    assert evaluate is not None
    answer_column = spec.answer_column()
    rows: list[Row] = []
    for frame in frames:
        for record in frame.filter(pl.col("status") == "ok").iter_rows(named=True):
            row_id = str(record[spec.id_column]) if spec.id_column else str(record[ROW_INDEX])
            values: dict[str, Any] = {column: record.get(column) for column in input_columns}
            values[ANSWER] = record.get(answer_column)
            values[REFERENCE] = record.get(evaluate.reference) if evaluate.reference else None
            rows.append(Row(len(rows), item_id(row_id, record["requested_model"], record.get(SAMPLE) or 0), values))
    return Items(rows, spec.input)


def item_id(row_id: str, requested_model: str, sample: int) -> str:
    """The checkpoint's row id of one answer's grade. Sample 0 keeps the id a single answer's grade always had."""
    item = f"{row_id}{SEPARATOR}{requested_model}"
    return f"{item}{SEPARATOR}{sample}" if sample else item


def grade_keys(
    frame: pl.DataFrame, spec: JobSpec, rule: MetricSettings, server: str, input_columns: list[str]
) -> list[tuple[str, str, str] | None]:
    """For each row of an output frame (with ROW_INDEX), the checkpoint key its grade has for the rubric
    and the answer as they are now; None for a row that was not answered (nothing to grade)."""
    requests = RequestBuilder(judge_spec(spec, rule), server=server)
    keys = {
        request.row.id: request.key
        for batch in items(spec, iter([frame]), input_columns).batches()
        for request in requests.for_rows(batch)
    }
    found: list[tuple[str, str, str] | None] = []
    samples = frame[SAMPLE].to_list() if SAMPLE in frame.columns else [0] * frame.height
    for (row_id, model), sample in zip(
        frame.select(spec.id_column or ROW_INDEX, "requested_model").iter_rows(), samples, strict=True
    ):
        found.append(keys.get(item_id(str(row_id), model, sample)))
    return found


def score_of(parsed: str | None, scale: int) -> float | None:
    """A grade's score: (grade - 1) / (scale - 1), from the judge's parsed answer; None without one."""
    if not parsed:
        return None
    grade = json.loads(parsed).get("grade")
    if not isinstance(grade, int) or not 1 <= grade <= scale:
        return None
    return (grade - 1) / (scale - 1)
