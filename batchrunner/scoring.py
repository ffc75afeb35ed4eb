"""Scoring answers against a reference: the metrics of an `evaluate:` block. Pure, no I/O.

Each metric turns (answer, reference, row) into a score in [0, 1], or None where the row
has no reference. A failed row scores 0 (it is a wrong answer, and the report says so). A
`python:` metric calls the user's function; if it raises, that row's score is an error
(None, with the error kept), never an exception that stops the run or the report.
"""

from __future__ import annotations

import collections
import importlib
import json
import math
import re
import string
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
METRICS = ("exact", "numeric", "f1", "regex", "contains", "json_match", "python")


@dataclass(frozen=True)
class Metric:
    """One scoring rule, as the spec's `evaluate:` block describes it."""

    name: str  # the score column is `score` (one metric) or `score_<name>`
    kind: str  # one of METRICS
    ignore_case: bool = True
    strip: bool = True
    normalize: bool = False  # unicode NFKC, and punctuation removed
    abs_tol: float = 0.0
    rel_tol: float = 0.0
    function: str | None = None  # python: "module:function"

    def score(self, answer: Any, reference: Any, row: Mapping[str, Any]) -> float | None:
        """The score of one answer; None when there is no reference to compare with."""
        if self.kind == "judge":  # graded by another model: judging.py reads the grade back
            return None
        if reference is None or (isinstance(reference, str) and not reference.strip() and self.kind != "python"):
            return None
        if answer is None:
            return 0.0
        if self.kind == "exact":
            return float(self._text(answer) == self._text(reference))
        if self.kind == "contains":
            return float(self._text(reference) in self._text(answer))
        if self.kind == "regex":
            flags = re.IGNORECASE if self.ignore_case else 0
            return float(re.search(str(reference), _as_text(answer), flags) is not None)
        if self.kind == "numeric":
            return _numeric(answer, reference, self.abs_tol, self.rel_tol)
        if self.kind == "f1":
            return self._f1(answer, reference)
        if self.kind == "json_match":
            return _json_match(answer, reference)
        if self.kind == "python":
            return _call(self.function or "", row, answer)
        raise ValueError(f"unknown metric {self.kind!r}")

    def _text(self, value: Any) -> str:
        text = _as_text(value)
        if self.normalize:
            text = unicodedata.normalize("NFKC", text)
            text = text.translate(str.maketrans("", "", string.punctuation))
            text = " ".join(text.split())
        if self.strip:
            text = text.strip()
        if self.ignore_case:
            text = text.casefold()
        return text

    def _f1(self, answer: Any, reference: Any) -> float:
        """Set F1 for lists, token F1 for text (SQuAD-style: tokens counted, not deduplicated)."""
        if isinstance(answer, list) or isinstance(reference, list):
            got_set = {self._text(v) for v in _as_list(answer)}
            want_set = {self._text(v) for v in _as_list(reference)}
            common, n_got, n_want = len(got_set & want_set), len(got_set), len(want_set)
        else:
            got, want = self._text(answer).split(), self._text(reference).split()
            common = sum((collections.Counter(got) & collections.Counter(want)).values())
            n_got, n_want = len(got), len(want)
        if not n_got and not n_want:
            return 1.0
        if common == 0:
            return 0.0
        precision, recall = common / n_got, common / n_want
        return 2 * precision * recall / (precision + recall)


class ScoreError(Exception):
    """A user's scoring function failed on one row: that row's score is an error, the run goes on."""


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return [part.strip() for part in value.split(",") if part.strip()]
        return parsed if isinstance(parsed, list) else [parsed]
    return [value]


def _number(value: Any) -> float | None:
    """A number: the value itself, or the first number written in a text ("about 42.5 kg" -> 42.5)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    match = NUMBER.search(str(value).replace(",", "") if isinstance(value, str) else str(value))
    return float(match.group()) if match else None


def _numeric(answer: Any, reference: Any, abs_tol: float, rel_tol: float) -> float:
    got, want = _number(answer), _number(reference)
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol))


def _json_match(answer: Any, reference: Any) -> float:
    """Every key of the reference object has the same value in the answer (extra answer keys are fine)."""

    def parsed(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value

    got, want = parsed(answer), parsed(reference)
    if not isinstance(want, dict):
        return float(got == want)
    if not isinstance(got, dict):
        return 0.0
    return float(all(key in got and got[key] == value for key, value in want.items()))


def load_function(target: str) -> Callable[..., Any]:
    """`module:function`, imported; ImportError or AttributeError says why it cannot be."""
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise ImportError(f"{target!r} is not `module:function`")
    function = getattr(importlib.import_module(module_name), function_name)
    if not callable(function):
        raise AttributeError(f"{target} is not a function")
    return function


def _call(target: str, row: Mapping[str, Any], answer: Any) -> float:
    try:
        value = load_function(target)(dict(row), answer)
    except Exception as exc:  # the user's code: any failure is that row's score error, never the run's
        raise ScoreError(f"{target} failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and 0 <= value <= 1 and not math.isnan(value):
        return float(value)
    raise ScoreError(f"{target} returned {value!r}; return a number from 0 to 1, or a bool")


def metrics_of(rules: list[Any], prefix: str = "") -> list[Metric]:
    """The spec's metric settings as Metrics, each named for its column: `score` when there is one,
    `score_<name>` (its name, else its kind) when there are several; after the output prefix."""
    metrics = []
    for rule in rules:
        name = rule.name or rule.kind
        metrics.append(
            Metric(
                name=prefix + ("score" if len(rules) == 1 else f"score_{name}"),
                kind=rule.kind,
                ignore_case=rule.ignore_case,
                strip=rule.strip,
                normalize=rule.normalize,
                abs_tol=rule.abs_tol,
                rel_tol=rule.rel_tol,
                function=rule.python,
            )
        )
    return metrics


def score_rows(
    rows: list[dict[str, Any]],
    metrics: list[Metric],
    *,
    reference: str | None,
    field: str | None,
    input_columns: list[str],
) -> dict[str, list[Any]]:
    """Every metric's score for each output row (status, response, parsed and the input columns in
    `rows`), plus `score_error` when a python metric failed on a row. A failed row scores 0."""
    scores: dict[str, list[Any]] = {metric.name: [] for metric in metrics}
    errors: list[str | None] = []
    for row in rows:
        answer: Any = row.get("response")
        if field is not None:
            parsed = json.loads(row["parsed"]) if row.get("parsed") else None
            answer = parsed.get(field) if isinstance(parsed, dict) else None
        failed = row.get("status") != "ok"
        inputs = {name: row.get(name) for name in input_columns}
        problems = []
        expected = row.get(reference) if reference else None
        for metric in metrics:
            value: float | None
            try:
                if metric.kind == "judge":
                    value = 0.0 if failed else None  # a grade is filled in from the checkpoint (judging.py)
                else:
                    value = 0.0 if failed and expected is not None else metric.score(answer, expected, inputs)
            except ScoreError as exc:
                value = None
                problems.append(str(exc))
            scores[metric.name].append(value)
        errors.append("; ".join(problems)[:500] or None)
    if any(metric.kind == "python" for metric in metrics):
        scores[error_column(metrics)] = errors
    return scores


def error_column(metrics: list[Metric]) -> str:
    """`score_error`, after the same prefix as the score columns."""
    return metrics[0].name[: metrics[0].name.index("score")] + "score_error"
