"""CI gates on the report: --fail-under, --strict, --model, --junit (gates.py and the report command)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from batchrunner.errors import SpecError
from batchrunner.evaluation import Interval, ModelFigures, Report
from batchrunner.gates import gates, junit_xml


def figures(model: str, score: Interval | None, scored: int = 100) -> ModelFigures:
    return ModelFigures(model, 100, 100, 0, scored, score, True, "0", None, None, None, None, 0, 0, 0, 0)


REPORT = Report(
    "eval",
    "score",
    [figures("a/x", Interval(0.90, 0.84, 0.95)), figures("b/y", Interval(0.80, 0.71, 0.87)), figures("c/z", None, 0)],
    [],
    [],
)

CASES = [  # (threshold, strict, models) -> the models that pass
    (0.85, False, None, ["a/x"]),
    (0.85, True, None, []),  # a/x's lower bound 0.84 is under
    (0.80, False, ["b/y"], ["b/y"]),  # at the threshold passes
    (0.80, True, ["a/x", "b/y"], ["a/x"]),
    (0.0, False, ["c/z"], []),  # no score at all never passes
]


@pytest.mark.parametrize(("threshold", "strict", "models", "passing"), CASES)
def test_gates(threshold: float, strict: bool, models: list[str] | None, passing: list[str]) -> None:
    """Which gated models pass: the score (or with strict its interval's lower bound) at or over the threshold."""
    verdicts = gates(REPORT, threshold, models=models, strict=strict)
    assert [gate.model for gate in verdicts] == (models or ["a/x", "b/y", "c/z"])
    assert [gate.model for gate in verdicts if gate.passed] == passing


@pytest.mark.parametrize(
    ("threshold", "models", "report", "where", "message"),
    [
        (1.5, None, REPORT, "--fail-under", "1.5 is not a score: give a number from 0 to 1"),
        (-0.1, None, REPORT, "--fail-under", "-0.1 is not a score: give a number from 0 to 1"),
        (0.5, ["d/w", "a/x", "e/v"], REPORT, "--model", "d/w, e/v: not in the report; it has a/x, b/y, c/z"),
        (
            0.5,
            None,
            Report("eval", None, [], [], []),
            "--fail-under",
            "the report has no score (no evaluate: metric): nothing to gate",
        ),
        (0.5, ["a/x"], Report("eval", "score", [], [], []), "--model", "a/x: not in the report; it has no model"),
    ],
)
def test_a_gate_that_cannot_be_judged_is_refused(
    threshold: float, models: list[str] | None, report: Report, where: str, message: str
) -> None:
    """A threshold that is not a score, a model the report lacks, a report without scores: SpecError (exit 2)
    naming the option and the fix."""
    with pytest.raises(SpecError) as refused:
        gates(report, threshold, models=models)
    (problem,) = refused.value.problems
    assert (problem.where, problem.message) == (where, message)


def test_a_report_of_no_model_is_not_a_passed_gate() -> None:
    """A report with a score column and no model (the job not run yet, or run only on the sandbox) has nothing to
    gate: SpecError (exit 2), not an empty list of verdicts that all() passes (before: exit 0)."""
    with pytest.raises(SpecError) as refused:
        gates(Report("eval", "score", [], [], []), 0.5)
    (problem,) = refused.value.problems
    assert problem.where == "--fail-under"
    assert problem.message == (
        "no model has answers in this report: nothing to gate; run the job first (a --sandbox run's answers are "
        "gated with --sandbox)"
    )


def test_the_ends_of_the_scale_are_thresholds() -> None:
    """0 and 1 are thresholds a gate takes (1: every row right)."""
    assert [g.passed for g in gates(REPORT, 1.0)] == [False, False, False]
    assert [g.passed for g in gates(REPORT, 0.0)] == [True, True, False]


def test_junit_has_a_case_per_model_and_a_failure_for_each_under() -> None:
    """The JUnit XML parses; one test case per gated model, <failure> on those under, the counts in the suite."""
    root = ET.fromstring(junit_xml("eval & co", gates(REPORT, 0.85)))
    suite = root.find("testsuite")
    assert suite is not None and suite.get("name") == "eval & co"
    assert (suite.get("tests"), suite.get("failures")) == ("3", "2")
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None]
    assert failed == ["b/y", "c/z"]


SENTENCES = [  # (threshold, strict, model) -> the sentence said on stderr and in the JUnit failure
    (0.85, False, "a/x", "a/x: its score, 0.9000 over 100 rows, clears 0.85"),
    (0.85, True, "a/x", "a/x: the lower bound of its 95% interval, 0.8400 over 100 rows, is under 0.85"),
    (0.85, False, "b/y", "b/y: its score, 0.8000 over 100 rows, is under 0.85"),
    (0.5, True, "c/z", "c/z: no score (no row has a reference, or none was answered): fails the gate"),
]


@pytest.mark.parametrize(("threshold", "strict", "model", "sentence"), SENTENCES)
def test_each_verdict_says_what_was_measured_against_what(
    threshold: float, strict: bool, model: str, sentence: str
) -> None:
    """A verdict's sentence names the model, what was measured (the score or its lower bound), over how many rows,
    and whether it clears the threshold; the JUnit failure carries the same sentence."""
    (gate,) = gates(REPORT, threshold, models=[model], strict=strict)
    assert gate.sentence() == sentence
    suite = ET.fromstring(junit_xml("eval", [gate])).find("testsuite")
    assert suite is not None
    case = suite.find("testcase")
    assert case is not None and case.get("classname") == "batchrunner.eval"
    failure = case.find("failure")
    assert (failure is None) == gate.passed
    if failure is not None:
        assert failure.get("message") == failure.text == sentence
    assert suite.get("errors") == "0"
