"""Gates for CI: does each model's score clear a threshold? Pure: figures in, verdicts and JUnit XML out.

`batchrunner report JOB --fail-under 0.85` exits 1 when a gated model's score is under the
threshold; with `--strict`, when its 95% interval's lower bound is (the score must be *known* to be
above it, not merely measured above it on this sample). `--model M` gates only the models named;
`--junit FILE` writes one JUnit test case per gated model, which CI systems (GitHub Actions test
reporters, GitLab, Jenkins) show as passed or failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from batchrunner.errors import Problem, SpecError
from batchrunner.evaluation import ModelFigures, Report


@dataclass(frozen=True)
class Gate:
    """One model's verdict against the threshold."""

    model: str
    threshold: float
    measured: float | None  # the score, or its interval's lower bound when strict; None: no score at all
    strict: bool
    rows: int  # rows scored

    @property
    def passed(self) -> bool:
        return self.measured is not None and self.measured >= self.threshold

    def sentence(self) -> str:
        what = "the lower bound of its 95% interval" if self.strict else "its score"
        if self.measured is None:
            return f"{self.model}: no score (no row has a reference, or none was answered): fails the gate"
        verb = "clears" if self.passed else "is under"
        return f"{self.model}: {what}, {self.measured:.4f} over {self.rows} rows, {verb} {self.threshold:g}"


def gates(report: Report, threshold: float, *, models: list[str] | None = None, strict: bool = False) -> list[Gate]:
    """A verdict for each gated model (all of them, else those named); SpecError for a name the report lacks."""
    if not 0 <= threshold <= 1:
        raise SpecError(Problem("--fail-under", f"{threshold:g} is not a score: give a number from 0 to 1"))
    figures = {figure.model: figure for figure in report.models}
    if report.score_column is None:
        raise SpecError(Problem("--fail-under", "the report has no score (no evaluate: metric): nothing to gate"))
    unknown = [model for model in models or [] if model not in figures]
    if unknown:
        raise SpecError(
            Problem("--model", f"{', '.join(unknown)}: not in the report; it has {', '.join(figures) or 'no model'}")
        )
    if not figures:  # no verdict at all would pass every gate: a gate must measure something
        raise SpecError(
            Problem(
                "--fail-under",
                "no model has answers in this report: nothing to gate; run the job first (a --sandbox run's "
                "answers are gated with --sandbox)",
            )
        )
    return [_gate(figures[name], threshold, strict) for name in (models or list(figures))]


def _gate(figure: ModelFigures, threshold: float, strict: bool) -> Gate:
    score = figure.score
    measured = None if score is None else (score.low if strict else score.mean)
    return Gate(figure.model, threshold, measured, strict, figure.scored)


def junit_xml(job: str, verdicts: list[Gate]) -> str:
    """The verdicts as a JUnit XML test suite: one test case per model, a <failure> for each under the threshold."""
    failures = sum(not gate.passed for gate in verdicts)
    cases = []
    for gate in verdicts:
        body = (
            "" if gate.passed else f"<failure message={quoteattr(gate.sentence())}>{escape(gate.sentence())}</failure>"
        )
        cases.append(
            f"    <testcase classname={quoteattr('batchrunner.' + job)} name={quoteattr(gate.model)}>{body}</testcase>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<testsuites><testsuite name={quoteattr(job)} tests="{len(verdicts)}" failures="{failures}" errors="0">\n'
        + "\n".join(cases)
        + "\n</testsuite></testsuites>\n"
    )
