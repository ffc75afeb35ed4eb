"""Scoring answers against references: each metric, failed rows, and user functions that fail."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from batchrunner.scoring import Metric, ScoreError, score_rows

sys.path.insert(0, str(Path(__file__).parent))  # for helpers.graders, the python: metric's functions


@pytest.mark.parametrize(
    ("metric", "answer", "reference", "expected"),
    [
        (Metric("score", "exact"), "  Billing ", "billing", 1.0),
        (Metric("score", "exact", ignore_case=False), "Billing", "billing", 0.0),
        (Metric("score", "exact", normalize=True), "Café, s'il vous plaît!", "café sil vous plaît", 1.0),
        (Metric("score", "numeric", abs_tol=0.5), "about 42.4 kg", "42", 1.0),
        (Metric("score", "numeric", rel_tol=0.01), "1,010", 1000, 1.0),
        (Metric("score", "numeric"), "no number here", "3", 0.0),
        (Metric("score", "f1"), "the cat sat", "the cat sat down", pytest.approx(2 * 1.0 * 0.75 / 1.75)),
        (Metric("score", "f1"), ["red", "blue"], ["blue", "green"], 0.5),
        (Metric("score", "regex"), "Order #12345 shipped", r"#\d{5}", 1.0),
        (Metric("score", "contains"), "The answer is Paris.", "paris", 1.0),
        (Metric("score", "json_match"), {"a": 1, "b": 2, "extra": 3}, '{"a": 1, "b": 2}', 1.0),
        (Metric("score", "json_match"), {"a": 1}, {"a": 1, "b": 2}, 0.0),
        (Metric("score", "exact"), "x", None, None),
        (Metric("score", "exact"), "x", "  ", None),
    ],
)
def test_each_metric_scores_as_documented(metric: Metric, answer: object, reference: object, expected: object) -> None:
    """Every metric gives the documented score; no reference gives no score (None), not a zero."""
    assert metric.score(answer, reference, {}) == expected


def test_python_metrics_are_called_with_the_row_and_their_failures_are_that_rows_error() -> None:
    """A user function gets the row and the answer; one that raises or answers out of range marks the row's
    score as an error and never stops anything."""
    row = {"expected": "abcd"}
    assert Metric("s", "python", function="helpers.graders:same_length").score("ab", "abcd", row) == 0.5
    with pytest.raises(ScoreError, match="RuntimeError: grader bug"):
        Metric("s", "python", function="helpers.graders:explodes").score("ab", "abcd", row)
    with pytest.raises(ScoreError, match="return a number from 0 to 1"):
        Metric("s", "python", function="helpers.graders:out_of_range").score("ab", "abcd", row)


def test_failed_rows_score_zero_and_fields_come_from_the_parsed_answer() -> None:
    """A failed row is a wrong answer (0), a row without a reference has no score, and `field` reads the
    structured answer; a python metric's failure lands in score_error."""
    rows = [
        {"status": "ok", "response": "{}", "parsed": '{"category": "bug"}', "expected": "bug"},
        {"status": "failed", "response": None, "parsed": None, "expected": "bug"},
        {"status": "ok", "response": "{}", "parsed": '{"category": "bug"}', "expected": None},
    ]
    metrics = [Metric("score_exact", "exact"), Metric("score_custom", "python", function="helpers.graders:explodes")]
    scores = score_rows(rows, metrics, reference="expected", field="category", input_columns=["expected"])
    assert scores["score_exact"] == [1.0, 0.0, None]
    assert scores["score_custom"] == [None, 0.0, None]
    assert scores["score_error"][0] is not None and "grader bug" in scores["score_error"][0]
    assert scores["score_error"][1:] == [None, None]
