"""One convention across every command (issue #26): the same spelling for the same thing, strict JSON, and
messages that fit the command that prints them.

The walk takes its commands from the click group, so a command added later is held to the same rules without
a line here (unless it takes an argument no command took before: then ARGUMENTS says what to give it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import polars as pl
import pytest
from click.testing import CliRunner, Result
from helpers.scripted import Scripted

from batchrunner.cli import main
from batchrunner.sandbox import Sandbox, SandboxConfig

COMMANDS = sorted(main.commands)
RETIRED = re.compile(r"--format\b|--out\b")  # the old spellings: hidden aliases now, never offered in --help


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def strict(text: str) -> Any:
    """`text` parsed as RFC 8259 JSON: Infinity, -Infinity and NaN (which Python writes and reads, and no
    other parser accepts) are an error."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _offers(command: click.Command, option: str) -> bool:
    """Whether `command`'s --help shows `option` (a hidden one, or an alias, does not count)."""
    return any(
        option in param.opts and not getattr(param, "hidden", False)
        for param in command.params
        if isinstance(param, click.Option)
    )


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_and_offers_no_retired_spelling(name: str) -> None:
    """Each command's --help works and shows neither --format nor --out (JSON is --json, a path --output)."""
    result = invoke(name, "--help")
    assert result.exit_code == 0, result.output
    assert not RETIRED.findall(result.stdout), f"`{name} --help` offers {RETIRED.findall(result.stdout)}"


@pytest.fixture
def answered_job(write_spec: Callable[..., Path], tmp_path: Path) -> Path:
    """A job run to its end on the sandbox (its checkpoint holds the sandbox's answers, ids and all)."""
    job = write_spec(evaluate={"reference": "subject", "metric": "exact"})
    result = invoke("run", str(job), "--sandbox")
    assert result.exit_code == 0, result.output
    return job


def _arguments(job: Path, tmp_path: Path) -> dict[str, str]:
    """What to give each positional argument a command takes, by its name."""
    output = pl.read_parquet(job.parent / "out" / "result.parquet")
    return {"job": str(job), "generation_id": output["generation_id"][0], "data": str(tmp_path / "tickets.csv")}


@pytest.mark.parametrize("name", [name for name in COMMANDS if _offers(main.commands[name], "--json")])
def test_every_json_output_is_strict_json(name: str, answered_job: Path, tmp_path: Path) -> None:
    """Each command that offers --json prints one strict JSON value on stdout (no Infinity, no NaN), against the
    sandbox: with --sandbox where the command takes it, after a job run on the sandbox."""
    command = main.commands[name]
    given = _arguments(answered_job, tmp_path)
    arguments = [param for param in command.params if isinstance(param, click.Argument)]
    missing = [param.name for param in arguments if param.name not in given]
    assert not missing, f"`{name}` takes {missing}: say in _arguments what the walk gives it"
    args = [given[str(param.name)] for param in arguments] + ["--json"]
    if _offers(command, "--sandbox"):
        args.append("--sandbox")
    result = invoke(name, *args)
    assert result.exit_code == 0, result.output
    assert strict(result.stdout) is not None


def test_the_retired_spellings_still_work(answered_job: Path, tmp_path: Path) -> None:
    """--out and --format, hidden, keep working for a release: init --out, report --format json --out,
    run --dry-run --format json; each writes what its new spelling does."""
    made = invoke("init", str(tmp_path / "tickets.csv"), "--out", str(tmp_path / "starter.yaml"))
    assert made.exit_code == 0, made.output
    assert (tmp_path / "starter.yaml").exists()
    old = invoke("report", str(answered_job), "--sandbox", "--format", "json", "--out", str(tmp_path / "old.json"))
    new = invoke("report", str(answered_job), "--sandbox", "--json", "--output", str(tmp_path / "new.json"))
    assert old.exit_code == new.exit_code == 0, old.output + new.output
    assert strict((tmp_path / "old.json").read_text()) == strict((tmp_path / "new.json").read_text())
    markdown = invoke("report", str(answered_job), "--sandbox", "--format", "md")
    assert markdown.stdout == invoke("report", str(answered_job), "--sandbox", "--markdown").stdout
    dry = invoke("run", str(answered_job), "--sandbox", "--dry-run", "--format", "json")
    assert strict(dry.stdout)["sent"] == 0


def test_run_dry_run_json_is_strict_json(answered_job: Path) -> None:
    """`run --dry-run --json` prints the requests and the estimate as one strict JSON object."""
    result = invoke("run", str(answered_job), "--sandbox", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    shown = strict(result.stdout)
    assert shown["sent"] == 0 and shown["estimate"]["rows"] == 0


def test_report_json_and_markdown_cannot_both_be_asked(answered_job: Path) -> None:
    """`report --json --markdown` is a usage error (exit 2), not one of them chosen silently."""
    assert invoke("report", str(answered_job), "--sandbox", "--json", "--markdown").exit_code == 2


def test_models_endpoints_of_a_bad_slug_speaks_of_no_job() -> None:
    """`models --endpoints x` names the bad slug, exit 2, without "the job was not started" (it has no job)."""
    result = invoke("models", "--sandbox", "--endpoints", "x")
    assert result.exit_code == 2
    assert "job" not in result.stderr
    assert "--endpoints: 'x' is not a model slug" in result.stderr


def test_generation_looks_up_an_answer_of_a_sandbox_run(answered_job: Path) -> None:
    """`generation --sandbox ID` shows what the sandbox kept of an answer of an earlier --sandbox run (its id is
    in the output): the built-in sandbox of that run has ended, and the id is still found."""
    output = pl.read_parquet(answered_job.parent / "out" / "result.parquet")
    generation_id = output["generation_id"][0]
    result = invoke("generation", generation_id, "--sandbox", "--json")
    assert result.exit_code == 0, result.output
    record = strict(result.stdout)
    assert record["id"] == generation_id and record["model"] == output["model"][0]
    assert record["tokens_completion"] == output["completion_tokens"][0]


def test_an_unknown_generation_is_the_users_input(sandbox_in_thread: Callable[[SandboxConfig], Sandbox]) -> None:
    """An id the server does not know is bad input: exit 2 saying no generation has that id, never "stopped
    before sending anything" (the lookup was sent) with exit 3; the same with --sandbox."""
    sandbox = sandbox_in_thread(SandboxConfig())
    env = {"OPENROUTER_BASE_URL": sandbox.base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    for result in (invoke("generation", "gen-nope", env=env), invoke("generation", "gen-nope", "--sandbox")):
        assert result.exit_code == 2, result.output
        assert "before sending" not in result.stderr and "job" not in result.stderr
        assert "no generation 'gen-nope'" in result.stderr


def test_estimate_against_a_server_without_a_rate_limit_or_prices(
    write_spec: Callable[..., Path], scripted_in_thread: Callable[..., Scripted]
) -> None:
    """Against a server with no /key (no rate limit to read) and no /models (no prices), `estimate --json` is
    strict JSON (rate_rps null, never Infinity), and the text says no rate limit is known and the cost is
    unknown, never "0 s at inf requests/s"."""
    server = scripted_in_thread()
    job = write_spec(api={"base_url": server.base_url})
    env = {"OPENROUTER_API_KEY": ""}
    as_json = invoke("estimate", str(job), "--json", env=env)
    assert as_json.exit_code == 0, as_json.output
    figures = strict(as_json.stdout)
    assert figures["rate_rps"] is None and figures["expected_duration_s"] is None
    text = invoke("estimate", str(job), env=env)
    assert text.exit_code == 0, text.output
    assert "inf" not in text.stdout and "0 s at" not in text.stdout
    assert "no rate limit known" in text.stdout


def test_dry_run_text_prints_newlines_and_an_unknown_cost(
    write_spec: Callable[..., Path], scripted_in_thread: Callable[..., Scripted]
) -> None:
    """The dry run's estimate line follows a blank line (never an escaped "\\x0a"), and against a server without
    prices it says the cost is unknown, never "expected None USD"."""
    server = scripted_in_thread()
    result = invoke(
        "run", str(write_spec(api={"base_url": server.base_url})), "--dry-run", env={"OPENROUTER_API_KEY": ""}
    )
    assert result.exit_code == 0, result.output
    assert "\\x0a" not in result.stdout and "\n\nestimate: 12 requests" in result.stdout
    estimate = result.stdout.splitlines()[-1]
    assert "None" not in estimate and "cost unknown (no prices" in estimate


def test_strict_json_writes_non_finite_numbers_as_null() -> None:
    """jsontext.dumps: inf, -inf and NaN, however deep, become null; the text is strict JSON."""
    from batchrunner.jsontext import dumps

    value = {"a": float("inf"), "b": [1.5, float("nan"), {"c": -float("inf")}], "d": (2, "x")}
    assert strict(dumps(value)) == {"a": None, "b": [1.5, None, {"c": None}], "d": [2, "x"]}


def test_json_log_lines_are_strict_json(capsys: pytest.CaptureFixture[str]) -> None:
    """--log-json's lines are strict JSON even when an event carries a non-finite number (a rate: inf)."""
    import logging

    from batchrunner import logs

    logs.configure(json_lines=True)
    logging.getLogger("batchrunner").info("rate", extra={"rate_rps": float("inf")})
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert strict(line)["rate_rps"] is None
