"""CI gates on the report: --fail-under, --strict, --model, --junit (gates.py and the report command)."""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import run_cli

from batchrunner.errors import SpecError
from batchrunner.evaluation import Interval, ModelFigures, Report
from batchrunner.gates import gates, junit_xml

ROOT = Path(__file__).resolve().parent.parent


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
    ("threshold", "models", "report", "named"),
    [
        (1.5, None, REPORT, "--fail-under"),
        (0.5, ["d/w"], REPORT, "d/w: not in the report"),
        (0.5, None, Report("eval", None, [], [], []), "no score"),
    ],
)
def test_a_gate_that_cannot_be_judged_is_refused(
    threshold: float, models: list[str] | None, report: Report, named: str
) -> None:
    """A threshold that is not a score, a model the report lacks, a report without scores: SpecError, exit 2."""
    with pytest.raises(SpecError, match=named):
        gates(report, threshold, models=models)


def test_junit_has_a_case_per_model_and_a_failure_for_each_under() -> None:
    """The JUnit XML parses; one test case per gated model, <failure> on those under, the counts in the suite."""
    root = ET.fromstring(junit_xml("eval & co", gates(REPORT, 0.85)))
    suite = root.find("testsuite")
    assert suite is not None and suite.get("name") == "eval & co"
    assert (suite.get("tests"), suite.get("failures")) == ("3", "2")
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None]
    assert failed == ["b/y", "c/z"]


def test_report_fail_under_exits_1_and_writes_junit(tmp_path: Path) -> None:
    """`report --fail-under` on a real evaluation: exit 0 when every model clears it, 1 when one does not, the
    verdicts on stderr and in the JUnit file; --strict is harder to clear than the score."""
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    job = str(tmp_path / "jobs" / "ticket_eval.yaml")
    env = {**os.environ, "OPENROUTER_API_KEY": ""}
    assert run_cli("run", job, "--sandbox", "--limit", "40", env=env).returncode in (0, 1)
    low = run_cli("report", job, "--sandbox", "--json", "--fail-under", "0.0", env=env)
    assert low.returncode == 0, low.stderr
    assert low.stderr.count("pass: ") >= 2
    junit = tmp_path / "gates.xml"
    high = run_cli("report", job, "--sandbox", "--json", "--fail-under", "1.0", "--junit", str(junit), env=env)
    assert high.returncode == 1 and "FAIL: " in high.stderr
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and int(suite.get("failures") or 0) >= 1
    scores = [line.split(", ")[1].split(" ")[0] for line in low.stderr.splitlines() if line.startswith("pass: ")]
    between = min(float(score) for score in scores) - 0.0001
    plain = run_cli("report", job, "--sandbox", "--json", "--fail-under", f"{between}", env=env)
    strict = run_cli("report", job, "--sandbox", "--json", "--fail-under", f"{between}", "--strict", env=env)
    assert (plain.returncode, strict.returncode) == (0, 1), (plain.stderr, strict.stderr)
    orphan = run_cli("report", job, "--sandbox", "--strict", env=env)
    assert orphan.returncode == 2 and "go with --fail-under" in orphan.stderr
