"""`batchrunner status`: told from the checkpoint's record of the last complete run when it still holds, without
reading the input or importing polars, and saying exactly what reading the input says."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import modules_loaded

from batchrunner import offline
from batchrunner.cli import main


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def said(result: Result) -> tuple[int, str, str]:
    """The exit code, stdout and stderr, log lines without their time."""
    return result.exit_code, result.stdout, re.sub(r"(?m)^\d{4}-\d\d-\d\d [\d:,]+ ", "", result.stderr)


def append_rows(tickets: Path) -> None:
    with tickets.open("a") as handle:
        handle.write("T-12,subject 12,ticket text number 12\nT-13,subject 13,ticket text number 13\n")


def edit_a_row(tickets: Path) -> None:
    tickets.write_text(tickets.read_text().replace("ticket text number 3", "ticket text number 3 (edited)"))


LOOSE_SCHEMA = {  # additionalProperties not false: `prepare` warns of it on every command that checks the job
    "type": "json_schema",
    "json_schema": {
        "name": "topic",
        "strict": True,
        "schema": {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]},
    },
}

STATES: dict[str, tuple[list[str], Callable[[Path], None] | None, bool]] = {
    # state: the run's options, what is done to the input after it, whether the record still holds
    "complete": ([], None, True),
    "rows appended": ([], append_rows, False),
    "input changed": ([], edit_a_row, False),
    "no record (a --limit run)": (["--limit", "5"], None, False),
}


@pytest.mark.parametrize("state", list(STATES))
def test_status_from_the_record_says_what_reading_the_input_says(
    write_spec: Callable[..., Path], tickets_csv: Path, monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    """For each state of the checkpoint, `status` and `status --json` give the same text, JSON and exit code
    whether the record answers or the input is read, and the record answers only while it holds."""
    options, change, holds = STATES[state]
    spec_path = str(write_spec(response_format=LOOSE_SCHEMA))
    assert invoke("run", spec_path, "--sandbox", *options).exit_code == 0
    if change is not None:
        change(tickets_csv)
    read = offline._counted
    reads: list[str] = []

    def counted(spec: object, server: str) -> object:
        reads.append(server)
        return read(spec, server)  # type: ignore[arg-type]

    monkeypatch.setattr(offline, "_counted", counted)
    told = [invoke("status", spec_path, "--sandbox", *flag) for flag in ([], ["--json"])]
    assert (reads == []) == holds, "the record answered" if reads == [] else "the input was read"
    monkeypatch.setattr(offline, "_counted_unread", lambda spec, server: None)  # always read the input
    read_through = [invoke("status", spec_path, "--sandbox", *flag) for flag in ([], ["--json"])]
    for fast, slow in zip(told, read_through, strict=True):
        assert said(fast) == said(slow)
    assert "openai/gpt-4o-mini: " in told[0].stdout and "additionalProperties: false" in told[0].stderr


def test_status_of_a_complete_job_imports_no_polars(write_spec: Callable[..., Path]) -> None:
    """`status` of a job whose last complete run's record holds, in a fresh process, imports neither polars nor
    the modules that read the input or the answers, and counts every pair answered."""
    spec_path = write_spec()
    assert invoke("run", str(spec_path), "--sandbox").exit_code == 0
    unwanted = ["polars", "batchrunner.dataset", "batchrunner.output", "batchrunner.records", "batchrunner.request"]
    printed, loaded = modules_loaded(["status", str(spec_path), "--sandbox"], unwanted)
    assert "12 ok, 0 failed, 0 pending" in printed
    assert loaded == [], printed
