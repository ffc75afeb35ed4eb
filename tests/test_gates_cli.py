"""The report's CI gate through the command line: exit codes, verdicts on stderr, JUnit XML, --strict."""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from conftest import Ran, cli_here

ROOT = Path(__file__).resolve().parent.parent


def test_report_fail_under_exits_1_and_writes_junit(tmp_path: Path) -> None:
    """`report --fail-under` on a real evaluation: exit 0 when every model clears it, 1 when one does not, the
    verdicts on stderr and in the JUnit file; --strict is harder to clear than the score."""
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    job = str(tmp_path / "jobs" / "ticket_eval.yaml")
    env = {**os.environ, "OPENROUTER_API_KEY": ""}
    assert cli_here("run", job, "--sandbox", "--limit", "40", env=env).returncode in (0, 1)

    def report(*args: str, env: dict[str, str]) -> Ran:
        return cli_here("report", *args, env=env)

    low = report(job, "--sandbox", "--json", "--fail-under", "0.0", env=env)
    assert low.returncode == 0, low.stderr
    assert low.stderr.count("pass: ") >= 2
    junit = tmp_path / "gates.xml"
    high = report(job, "--sandbox", "--json", "--fail-under", "1.0", "--junit", str(junit), env=env)
    assert high.returncode == 1 and "FAIL: " in high.stderr
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and int(suite.get("failures") or 0) >= 1
    scores = [line.split(", ")[1].split(" ")[0] for line in low.stderr.splitlines() if line.startswith("pass: ")]
    between = min(float(score) for score in scores) - 0.0001
    plain = report(job, "--sandbox", "--json", "--fail-under", f"{between}", env=env)
    strict = report(job, "--sandbox", "--json", "--fail-under", f"{between}", "--strict", env=env)
    assert (plain.returncode, strict.returncode) == (0, 1), (plain.stderr, strict.stderr)
    orphan = report(job, "--sandbox", "--strict", env=env)
    assert orphan.returncode == 2 and "go with --fail-under" in orphan.stderr


def test_a_gate_over_a_report_of_no_model_is_refused(tmp_path: Path) -> None:
    """README's CI gate copied after a --sandbox run: `report --fail-under` without --sandbox reads the real
    answers, of which there are none. Before: an empty report and exit 0, a gate passed with nothing measured.
    Now exit 2, saying there is nothing to gate and how the sandbox's answers are gated."""
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    job = str(tmp_path / "jobs" / "ticket_eval.yaml")
    env = {**os.environ, "OPENROUTER_API_KEY": ""}
    assert cli_here("run", job, "--sandbox", "--limit", "20", env=env).returncode in (0, 1)
    gated = cli_here("report", job, "--markdown", "--fail-under", "0.85", "--strict", env=env)
    assert gated.returncode == 2, gated.stderr
    assert "--fail-under: no model has answers in this report: nothing to gate" in gated.stderr
    assert "--sandbox" in gated.stderr
