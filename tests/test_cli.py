"""The command line: exit codes and messages, as a user (or cron) sees them."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
import yaml
from click.testing import CliRunner, Result
from conftest import cli_here, modules_loaded, run_cli, run_started, run_until, signalled_at

from batchrunner.cli import main
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.store import COMMIT_INTERVAL_S

REPO = Path(__file__).resolve().parent.parent


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_sandbox_run_writes_the_output_and_summary(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """`run --sandbox` answers every row (exit 0), writes input columns plus results, prints the summary."""
    result = invoke("run", str(write_spec()), "--sandbox")
    assert result.exit_code == 0, result.output
    assert "SANDBOX" in result.stderr and "simulated" in result.stderr
    assert "rows: 12 ok, 0 failed, 0 pending" in result.stdout
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame.columns[:3] == ["ticket_id", "subject", "text"]
    assert {
        "model",
        "requested_model",
        "status",
        "response",
        "error",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "cost_usd",
        "latency_s",
        "attempts",
        "generation_id",
        "provider",
    } <= set(frame.columns)
    assert frame["status"].to_list() == ["ok"] * 12
    assert frame["cost_usd"].dtype == pl.Decimal(38, 12)


def test_limit_and_output_override(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """--limit runs the first N rows; --output writes elsewhere, in that file's format."""
    target = tmp_path / "other.jsonl"
    result = invoke("run", str(write_spec()), "--sandbox", "--limit", "5", "--output", str(target))
    assert result.exit_code == 0, result.output
    assert pl.read_ndjson(target)["ticket_id"].to_list() == [f"T-{i}" for i in range(5)]


def test_failed_rows_exit_1(
    write_spec: Callable[..., Path], tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """Rows that fail are in the output with status failed, and the exit code is 1."""
    sandbox = sandbox_in_thread(SandboxConfig(faults={"hostile_error": 1.0}))
    env = {"OPENROUTER_BASE_URL": sandbox.base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    result = invoke("run", str(write_spec(output="out/r.csv")), env=env)
    assert result.exit_code == 1
    frame = pl.read_csv(tmp_path / "out" / "r.csv")
    assert frame["status"].unique().to_list() == ["failed"]
    assert frame["error"][0].startswith("HTTP 400")


def test_a_model_the_server_does_not_list_is_refused_with_suggestions(write_spec: Callable[..., Path]) -> None:
    """Against OpenRouter (here the sandbox) a model missing from GET /models is exit 2, naming the field and
    the closest slugs, before any completion; with a budget or without."""
    result = invoke("run", str(write_spec(models=["openai/gpt-4o-mni"])), "--sandbox")
    assert result.exit_code == 2, result.output
    assert "models[0]: 'openai/gpt-4o-mni' is not a model the server lists; did you mean 'openai/gpt-4o-mini'" in (
        result.stderr
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"prompt": "Ticket {ticket}: {text}"}, "placeholder {ticket} names no input column"),
        ({"modles": ["a/b"]}, "did you mean 'models'"),
        ({"concurrency": "many"}, "concurrency"),
        ({"models": []}, "models"),
        ({"id_column": "nope"}, "id_column: 'nope' is not an input column"),
        ({"id_column": "subject", "input": "dupes.csv"}, "duplicate values"),
        ({"input": "missing.csv"}, "no such file"),
        ({"input": "garbage.parquet"}, "cannot read it as .parquet"),
        ({"params": {"max_tokns": 5}}, "did you mean 'max_tokens'"),
    ],
)
def test_bad_specs_and_inputs_exit_2_without_sending(
    write_spec: Callable[..., Path], tmp_path: Path, changes: dict[str, object], expected: str
) -> None:
    """Each bad spec or input is refused with exit 2, a message naming the field, and no traceback."""
    pl.DataFrame({"ticket_id": ["a", "b"], "subject": ["same", "same"], "text": ["x", "y"]}).write_csv(
        tmp_path / "dupes.csv"
    )
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    result = invoke("run", str(write_spec(**changes)), "--sandbox")
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert "Traceback" not in result.output
    assert "SANDBOX" not in result.stderr, "nothing should have started"


def test_malformed_yaml_exits_2(write_spec: Callable[..., Path]) -> None:
    """Malformed YAML is exit 2 with the line, not a traceback."""
    result = invoke("run", str(write_spec("name: x\nmodels: [a/b\n")), "--sandbox")
    assert result.exit_code == 2 and "malformed YAML" in result.stderr


def test_missing_key_for_openrouter_exits_2(write_spec: Callable[..., Path]) -> None:
    """Without a key, a job aimed at OpenRouter is refused before sending, saying which variable to set."""
    result = invoke("run", str(write_spec()), env={"OPENROUTER_API_KEY": "", "OPENROUTER_BASE_URL": ""})
    assert result.exit_code == 2
    assert "$OPENROUTER_API_KEY is not set" in result.stderr and "--sandbox" in result.stderr


def test_malformed_key_for_openrouter_exits_2(write_spec: Callable[..., Path]) -> None:
    """A key that is not sk-or-v1-... is caught before sending, and never printed."""
    result = invoke(
        "run", str(write_spec()), env={"OPENROUTER_API_KEY": "sk-proj-abc123secret", "OPENROUTER_BASE_URL": ""}
    )
    assert result.exit_code == 2 and "sk-or-v1-" in result.stderr
    assert "abc123secret" not in result.output


def test_rejected_key_exits_3_and_keeps_the_key_secret(
    write_spec: Callable[..., Path], sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """A rejected key stops the job at GET /key (exit 3) before any completion, says what to check, never shows the key."""
    sandbox = sandbox_in_thread(SandboxConfig(require_key=True, api_key="sk-or-v1-right"))
    env = {"OPENROUTER_BASE_URL": sandbox.base_url, "OPENROUTER_API_KEY": "sk-or-v1-wrong-secret"}
    result = invoke("run", str(write_spec()), env=env)
    assert result.exit_code == 3, result.output
    assert "stopped before sending anything" in result.stderr and "check that the API key is right" in result.stderr
    assert "sk-or-v1-" not in result.stderr, "OpenRouter's key format is not suggested for another server"
    assert "wrong-secret" not in result.output
    assert sandbox.stats.requests == 0


@pytest.mark.parametrize("module", ["batchrunner", "batchrunner.cli"])
def test_python_dash_m_runs_the_cli(module: str, write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """`python -m batchrunner` and `python -m batchrunner.cli` are the same command: a run works (with the helpers
    every command uses defined)."""
    args = ["run", str(write_spec()), "--sandbox"]
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "wrote 12 rows" in done.stdout
    assert pl.read_parquet(tmp_path / "out" / "result.parquet").height == 12


def test_sandbox_command_refuses_unknown_faults() -> None:
    """`batchrunner sandbox --fault` names the known fault kinds when given an unknown one."""
    result = CliRunner().invoke(main, ["sandbox", "--fault", "ratelimit=0.5"])
    assert result.exit_code == 2 and "known: rate_limit" in result.output


@pytest.mark.parametrize("probability", ["2", "-0.5", "nan"])
def test_sandbox_command_refuses_a_fault_probability_outside_0_to_1(probability: str) -> None:
    """`--fault rate_limit=2` is no probability: before, the sandbox served with it (every request faulted, or
    none for a negative one); now a usage error naming the range."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "batchrunner", "sandbox", "--port", "0", "--fault", f"rate_limit={probability}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"rate_limit={probability} was taken: the sandbox served with it")
    assert done.returncode == 2 and "a probability from 0 to 1" in done.stderr, done.stderr


def test_sandbox_command_on_a_port_in_use_says_so_without_a_traceback() -> None:
    """`batchrunner sandbox --port P` while P is taken (a sandbox already running): before, OSError's traceback;
    now exit 2, one sentence naming the port and the fix."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "batchrunner", "sandbox", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"127.0.0.1:{port} is in use" in done.stderr and "--port" in done.stderr


def test_free_daily_cap_exits_3_naming_the_reset(
    write_spec: Callable[..., Path],
    sandbox_in_thread: Callable[[SandboxConfig], Sandbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When free models hit their daily cap, the run writes what it has and exits 3 saying when the cap resets."""
    from batchrunner import limits

    monkeypatch.setattr(limits, "FREE_REQUESTS_PER_MINUTE", 60_000)
    sandbox = sandbox_in_thread(SandboxConfig(free_daily_cap=4))
    env = {"OPENROUTER_BASE_URL": sandbox.base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    result = invoke("run", str(write_spec(models="meta-llama/llama-3.3-70b-instruct:free", concurrency=1)), env=env)
    assert result.exit_code == 3, result.output
    assert "free-model daily cap" in result.stderr and "UTC" in result.stderr
    assert "rows: 4 ok, 0 failed, 8 pending" in result.stdout


def test_second_run_of_a_running_job_exits_3_naming_it(write_spec: Callable[..., Path]) -> None:
    """Cron safety: while a run holds the job's lock, another run exits 3 at once and names the holder."""
    from batchrunner.lock import job_lock
    from batchrunner.spec import load_spec

    spec_path = write_spec()
    checkpoint = load_spec(spec_path).checkpoint_path()
    with job_lock(checkpoint.with_name(checkpoint.name + ".lock")):
        result = invoke("run", str(spec_path), "--sandbox")
    assert result.exit_code == 3
    assert "already running" in result.stderr and f"pid {os.getpid()}" in result.stderr


def test_fresh_without_yes_is_refused_when_not_interactive(write_spec: Callable[..., Path]) -> None:
    """--fresh would delete paid-for answers: without a terminal to ask on, it needs --yes."""
    spec_path = write_spec()
    assert invoke("run", str(spec_path), "--sandbox").exit_code == 0
    result = invoke("run", str(spec_path), "--sandbox", "--fresh")
    assert result.exit_code == 2 and "--yes" in result.stderr
    again = invoke("run", str(spec_path), "--sandbox", "--fresh", "--yes")
    assert again.exit_code == 0 and "12 ok" in again.stdout


def test_status_and_export(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """status reports done and pending per model without sending; export rewrites the output from the checkpoint."""
    spec_path = write_spec()
    invoke("run", str(spec_path), "--sandbox", "--limit", "5")
    result = invoke("status", str(spec_path), "--json", "--sandbox")
    report = json.loads(result.stdout)
    assert report["models"] == {"openai/gpt-4o-mini": {"ok": 5, "failed": 0, "pending": 7}}
    assert report["runs"] == 1 and report["last_run"]["outcome"] == "finished"
    assert invoke("export", str(spec_path), "--sandbox", "--output", str(tmp_path / "copy.jsonl")).exit_code == 0
    assert pl.read_ndjson(tmp_path / "copy.jsonl").height == 5


@pytest.mark.parametrize("command", ["status", "export"])
def test_commands_that_read_files_import_only_what_they_need(write_spec: Callable[..., Path], command: str) -> None:
    """`status` and `export` in a fresh process load no HTTP client, no sandbox server and no jsonschema (the spec's request check
    is for commands that send): each costs start-up time a command that reads two files should not pay."""
    spec_path = write_spec()
    assert invoke("run", str(spec_path), "--sandbox").exit_code == 0
    unwanted = ["aiohttp", "jsonschema", "batchrunner.sandbox.server", "batchrunner.client"]
    printed, loaded = modules_loaded([command, str(spec_path), "--sandbox"], unwanted)
    assert "12" in printed and loaded == [], printed


def test_validate_leaves_no_folder_behind_and_run_still_writes_there(write_spec: Callable[..., Path]) -> None:
    """`validate` checks that the output can be written without leaving the folders it made for the check (a new
    user's `validate` left an empty out/ folder); `run` then makes them and writes its output there."""
    spec_path = write_spec(output="new/deeper/result.parquet")
    assert invoke("validate", str(spec_path), "--sandbox").exit_code == 0
    assert not (spec_path.parent / "new").exists()
    assert invoke("run", str(spec_path), "--sandbox").exit_code == 0
    assert pl.read_parquet(spec_path.parent / "new" / "deeper" / "result.parquet").height == 12


def test_a_run_against_a_server_imports_no_sandbox(
    write_spec: Callable[..., Path],
    sandbox_in_thread: Callable[[SandboxConfig], Sandbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run sent to a server (not --sandbox) imports neither the sandbox's server nor aiohttp's web server: start-up
    every real run paid for a type's sake (~25 ms)."""
    real = sandbox_in_thread(SandboxConfig())  # stands in for OpenRouter, in this process
    monkeypatch.setenv("OPENROUTER_BASE_URL", real.base_url)
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-v1-test")
    printed, loaded = modules_loaded(["run", str(write_spec())], ["batchrunner.sandbox.server", "aiohttp.web"])
    assert "12 ok" in printed and loaded == [], printed


def test_sandbox_answers_never_stand_in_for_real_ones(
    write_spec: Callable[..., Path], tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """After a --sandbox run, a real run sends every row again and its output holds only real answers;
    status tells the two apart."""
    spec_path = write_spec()
    assert invoke("run", str(spec_path), "--sandbox").exit_code == 0
    real = sandbox_in_thread(SandboxConfig())  # stands in for OpenRouter: a server that is not the sandbox
    env = {"OPENROUTER_BASE_URL": real.base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    result = invoke("run", str(spec_path), env=env)
    assert result.exit_code == 0, result.output
    assert real.stats.requests == 12, "no simulated answer was reused"
    assert "12 ok" in result.stdout
    status = invoke("status", str(spec_path), env=env)
    assert "12 ok, 0 failed, 0 pending" in status.stdout
    assert "also 12 answers from sandbox (simulated" in status.stdout
    real_cost = json.loads(invoke("status", str(spec_path), "--json", env=env).stdout)["cost_usd"]
    assert Decimal(real_cost) == real.stats.charged_usd, "simulated costs are not counted as spent"


def test_after_a_sandbox_run_export_and_status_point_at_the_sandbox_answers(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """After a --sandbox run, `export` without --sandbox (no answers for OpenRouter) refuses to replace the output
    holding the sandbox's answers (exit 2, naming the file and --sandbox), and `status` says whose the answers are
    and how to see them instead of "0 ok, 12 pending"; with --sandbox, or into a new file, export works."""
    spec_path = str(write_spec())
    assert invoke("run", spec_path, "--sandbox").exit_code == 0
    output = tmp_path / "out" / "result.parquet"
    before = output.read_bytes()
    status = invoke("status", spec_path)
    assert status.exit_code == 0, status.output
    assert "0 ok" not in status.stdout and "12 pending" not in status.stdout
    assert "no answers from openrouter yet: the checkpoint's 12 answers are the sandbox's (simulated)" in status.stdout
    assert f"batchrunner status {spec_path} --sandbox" in status.stdout
    refused = invoke("export", spec_path)
    assert refused.exit_code == 2, refused.output
    assert f"{output} holds 12 rows and this export has no answers from openrouter" in refused.stderr
    assert "--sandbox" in refused.stderr and output.read_bytes() == before, "the sandbox's output is left as it was"
    assert invoke("export", spec_path, "--sandbox").exit_code == 0
    assert pl.read_parquet(output).height == 12
    elsewhere = invoke("export", spec_path, "--output", str(tmp_path / "real.csv"))
    assert elsewhere.exit_code == 0 and "wrote 0 rows" in elsewhere.stdout
    assert "the checkpoint's 12 answers are the sandbox's" in elsewhere.stderr


@pytest.mark.parametrize(
    ("by_server", "server", "sentence", "how"),
    [
        ({"sandbox": 12}, "", "the checkpoint's 12 answers are the sandbox's (simulated)", "with --sandbox"),
        ({"": 5}, "sandbox", "the checkpoint's 5 answers are from openrouter (5)", "without --sandbox"),
        (
            {"http://127.0.0.1:8000/v1": 3},
            "",
            "the checkpoint's 3 answers are from http://127.0.0.1:8000/v1 (3)",
            "with api.base_url: http://127.0.0.1:8000/v1 in the spec",
        ),
        (
            {"http://x": 3, "sandbox": 2},
            "",
            "the checkpoint's 5 answers are from http://x (3) and sandbox (2)",
            "with --sandbox",
        ),
        ({"": 4, "sandbox": 0}, "", None, None),
    ],
)
def test_whose_answers_the_checkpoint_holds_and_how_to_see_them(
    by_server: dict[str, int], server: str, sentence: str | None, how: str | None
) -> None:
    """Answers from other servers than the one asked about are named with the option (or base URL) that shows them."""
    from batchrunner.offline import elsewhere

    found = elsewhere(by_server, server)
    assert (found and found.sentence, found and found.how()) == (sentence, how)


def test_log_json_emits_one_object_per_line(write_spec: Callable[..., Path]) -> None:
    """--log-json writes every log event on stderr as one JSON object."""
    result = invoke("run", str(write_spec()), "--sandbox", "--log-json")
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert events and all({"time", "level", "message"} <= set(e) for e in events)
    assert any("rate limit" in e["message"] for e in events)


@pytest.mark.slow  # a few seconds of runs in their own processes: the long set (CI's second step)
def test_kill_9_never_loses_or_repeats_more_than_was_in_flight(
    write_spec: Callable[..., Path], tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """kill -9 at random moments, each about a second into a run, then a final run: every row exactly once,
    and no kill re-sends more than was in flight plus one commit interval of answers (a commit interval ten
    times longer would lose every answer of the second)."""
    rows, concurrency, latency_s = 300, 8, 0.1
    pl.DataFrame(
        {"ticket_id": [f"T-{i}" for i in range(rows)], "subject": ["s"] * rows, "text": [f"t {i}" for i in range(rows)]}
    ).write_csv(tmp_path / "many.csv")
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=latency_s))
    spec_path = write_spec(input="many.csv", concurrency=concurrency)
    env = {**os.environ, "OPENROUTER_BASE_URL": sandbox.base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        seen = sandbox.stats.requests
        process = subprocess.Popen(
            [sys.executable, "-m", "batchrunner", "run", str(spec_path)],
            env=env,
            stderr=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while sandbox.stats.requests < seen + concurrency and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.8, 1.2))  # several commit intervals into the run
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    final = run_cli("run", str(spec_path), env=env)
    assert final.returncode == 0, final.stderr
    output = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert output.height == rows and output["ticket_id"].n_unique() == rows
    twice = sum(n - 1 for n in sandbox.stats.answered.values())
    answers_per_s = concurrency / latency_s
    per_kill = concurrency + answers_per_s * 2 * COMMIT_INTERVAL_S  # in flight, the interval, the commit itself
    assert kills == 3 and twice <= kills * per_kill, (twice, per_kill)


def test_estimate_json_and_models(write_spec: Callable[..., Path]) -> None:
    """estimate --json prints rows, expected and worst-case cost and duration; models lists prices per million."""
    result = invoke("estimate", str(write_spec()), "--sandbox", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == 12
    assert 0 < float(report["expected_cost_usd"]) <= float(report["max_cost_usd"])
    assert Decimal(report["expected_batch_cost_usd"]) == Decimal(report["expected_cost_usd"]) / 2, "batch beside live"
    assert report["expected_duration_s"] > 0
    listing = invoke("models", "--sandbox", "--search", "gpt-4o-mini")
    assert listing.exit_code == 0 and "openai/gpt-4o-mini" in listing.stdout and "0.15" in listing.stdout
    assert "anthropic" not in listing.stdout


def test_max_cost_stops_the_run_with_exit_3(write_spec: Callable[..., Path]) -> None:
    """--max-cost: the run stops dispatching at the budget and exits 3 saying what was spent (each request's
    worst case is ~$0.00065: three fit, twelve do not)."""
    result = invoke("run", str(write_spec(models=["openai/gpt-4o"])), "--sandbox", "--max-cost", "0.002")
    assert result.exit_code == 3
    assert "budget of $0.002 reached" in result.stderr and "pending" in result.stderr


@pytest.mark.parametrize("price", ["1e400", "1e999999999", "inf", "NaN", "-1"])
def test_a_price_that_is_not_a_number_of_dollars_leaves_the_model_unpriced(
    write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, price: str
) -> None:
    """A /models prompt price of 1e400 (or inf, NaN, -1, an exponent that overflows) makes the model unpriced with
    a warning naming it and the price: a budget then refuses it up front (exit 2), and a run without one goes on."""
    from batchrunner.sandbox import catalog

    listed = catalog.model_objects

    def hostile(created: int) -> list[dict[str, object]]:
        models = listed(created)
        for entry in models:
            if entry["id"] == "openai/gpt-4o-mini":
                entry["pricing"] = {**entry["pricing"], "prompt": price}
        return models

    monkeypatch.setattr(catalog, "model_objects", hostile)
    spec_path = str(write_spec())
    warning = f"openai/gpt-4o-mini is unpriced: its prompt price {price!r} is not a number of dollars from 0 to 1,000"
    budgeted = CliRunner().invoke(main, ["run", spec_path, "--sandbox", "--max-cost", "1"])
    assert budgeted.exit_code == 2, budgeted.output
    assert warning in budgeted.stderr and "a budget needs them" in budgeted.stderr
    unbudgeted = CliRunner().invoke(main, ["run", spec_path, "--sandbox"])
    assert unbudgeted.exit_code == 0, unbudgeted.output
    assert warning in unbudgeted.stderr and "12 ok" in unbudgeted.stdout


def test_schema_property_clashing_with_a_column_needs_a_prefix(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """A schema property named like an input column (text) is refused with exit 2 until output_prefix is set."""
    response_format = {
        "type": "json_schema",
        "json_schema": {
            "name": "x",
            "schema": {
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "required": ["text"],
                "additionalProperties": False,
            },
        },
    }
    refused = invoke("run", str(write_spec(response_format=response_format)), "--sandbox")
    assert refused.exit_code == 2 and "set output_prefix" in refused.stderr
    accepted = invoke("run", str(write_spec(response_format=response_format, output_prefix="label_")), "--sandbox")
    assert accepted.exit_code == 0, accepted.output
    assert "label_text" in pl.read_parquet(tmp_path / "out" / "result.parquet").columns


def test_broken_schema_exits_2(write_spec: Callable[..., Path]) -> None:
    """A response schema that is not valid JSON Schema is refused before any request."""
    broken = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    result = invoke("run", str(write_spec(response_format=broken)), "--sandbox")
    assert result.exit_code == 2 and "response_format.json_schema.schema" in result.stderr


def test_labeling_example_writes_columns_typed_by_its_schema(tmp_path: Path) -> None:
    """jobs/ticket_triage.yaml writes Parquet whose answer columns follow its JSON schema's types."""
    job = yaml.safe_load((REPO / "jobs" / "ticket_triage.yaml").read_text())
    job.update(input=str(REPO / "sample_data" / "tickets.csv"), output=str(tmp_path / "triage.parquet"))
    (tmp_path / "triage.yaml").write_text(yaml.safe_dump(job))
    target = tmp_path / "triage.parquet"
    result = invoke("run", str(tmp_path / "triage.yaml"), "--sandbox", "--limit", "25")
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(target)
    assert frame.schema["category"] == pl.Enum(["bug", "billing", "account", "feature_request", "question"])
    assert frame.schema["urgency"] == pl.Enum(["low", "medium", "high"])
    assert frame.schema["needs_human"] == pl.Boolean and frame.schema["summary"] == pl.String
    assert frame["category"].null_count() == 0


def sigterm_after(job: Path, sandbox: Sandbox, *, requests: int) -> tuple[subprocess.Popen[str], str, str, float]:
    """`batchrunner run job` in its own process against `sandbox`, sent SIGTERM once the sandbox has seen
    `requests` requests: the process, its stdout and stderr, and the seconds it took to exit after the signal."""
    process = run_started(job, sandbox, requests=requests)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
    return process, stdout, stderr, time.monotonic() - signalled


def test_sigterm_finishes_in_flight_writes_the_output_and_exits_3(
    write_spec: Callable[..., Path], tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """SIGTERM (a scheduler's stop) stops dispatch, lets requests in flight land, writes the output, exits 3."""
    rows = 200
    pl.DataFrame(
        {"ticket_id": [f"T-{i}" for i in range(rows)], "subject": ["s"] * rows, "text": [f"t {i}" for i in range(rows)]}
    ).write_csv(tmp_path / "many.csv")
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.1))
    process, stdout, stderr, _ = sigterm_after(write_spec(input="many.csv", concurrency=4), sandbox, requests=10)
    assert "rows:" in stdout
    assert process.returncode == 3, stderr
    assert "SIGTERM" in stderr and "pending" in stderr
    written = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert 0 < written.height < rows
    assert written.height == sandbox.stats.statuses[200], "every answer that came back is in the output"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_run_writes_its_output_finishes_the_output_and_exits_3(
    write_spec: Callable[..., Path], tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM or Ctrl-C while a run writes its output (no longer dispatching) lets the output be written in full,
    then exits 3 with the sentence, not 143 or a KeyboardInterrupt traceback."""
    done = signalled_at("batchrunner.output:_write_parts", [signum], "run", str(write_spec()), "--sandbox")
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and "rows: 12 ok, 0 failed, 0 pending" in done.stdout
    assert f"stopped early: {signum.name} while the output was being written (it was written in full)" in done.stderr
    assert "rerun the same command to continue" in done.stderr
    assert pl.read_parquet(tmp_path / "out" / "result.parquet").height == 12


def test_a_stop_before_the_run_dispatches_sends_nothing_and_exits_3(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """SIGTERM while a run is still reading its input (before its handlers of old were installed) stops it before
    the first request (start-up's questions to the server are not even asked): exit 3 and the sentence, not a kill."""
    done = signalled_at("batchrunner.runner:prepare", [signal.SIGTERM], "run", str(write_spec()), "--sandbox")
    assert done.returncode == 3, done.stderr
    assert "SIGTERM while the run was starting: nothing was sent; rerun the same command" in done.stderr


def test_a_second_stop_while_the_output_is_written_quits_at_once_with_a_sentence(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """A second SIGTERM quits at once, as a second Ctrl-C does: exit 3 and a sentence saying so, no output half-written."""
    signals = [signal.SIGTERM, signal.SIGTERM]
    done = signalled_at("batchrunner.output:_write_parts", signals, "run", str(write_spec()), "--sandbox")
    assert done.returncode == 3, done.stderr
    assert "SIGTERM again: quitting at once" in done.stderr and "rerun to continue" in done.stderr
    assert not (tmp_path / "out" / "result.parquet").exists()


def test_a_stop_during_export_exits_3_with_the_output_whole(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """SIGTERM while export builds the output leaves the old file as it was; while it replaces the file, lets the
    replacement finish: exit 3 with a sentence naming the file either way, never 143."""
    spec_path = str(write_spec())
    assert invoke("run", spec_path, "--sandbox").exit_code == 0
    output = tmp_path / "out" / "result.parquet"
    before = output.stat().st_ino
    building = signalled_at("batchrunner.output:_write_parts", [signal.SIGTERM], "export", spec_path, "--sandbox")
    assert building.returncode == 3, building.stderr
    assert f"SIGTERM before {output} was rewritten: it is as it was" in building.stderr
    assert "rerun the same command to write it" in building.stderr
    assert output.stat().st_ino == before
    replacing = signalled_at("batchrunner.output:_sink", [signal.SIGTERM], "export", spec_path, "--sandbox")
    assert replacing.returncode == 3, replacing.stderr
    assert f"stopped early: SIGTERM while {output} was being written (it was written in full: 12 rows)" in (
        replacing.stderr
    )
    assert output.stat().st_ino != before and pl.read_parquet(output).height == 12


def test_an_empty_input_writes_an_empty_output_with_all_columns(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """No rows: nothing is sent, exit 0, and the output still has the input and result columns."""
    pl.DataFrame(schema={"ticket_id": pl.String, "subject": pl.String, "text": pl.String}).write_csv(
        tmp_path / "empty.csv"
    )
    result = invoke("run", str(write_spec(input="empty.csv")), "--sandbox")
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame.height == 0 and {"ticket_id", "response", "cost_usd"} <= set(frame.columns)


def test_an_input_that_breaks_at_its_last_row_is_refused_before_anything_is_sent(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """A malformed line at the end of a 10,500-row CSV: exit 2 naming the input and the fix; no checkpoint, no request."""
    lines = ["ticket_id,subject,text", *[f"{i},s,text {i}" for i in range(10_500)], "oops,s,text,extra"]
    (tmp_path / "late.csv").write_text("\n".join(lines) + "\n")
    spec_path = write_spec(input="late.csv", id_column=None)
    result = invoke("run", str(spec_path), "--sandbox")
    assert result.exit_code == 2, result.output
    assert "late.csv" in result.stderr and "more fields than the header" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "result.checkpoint.sqlite").exists()


def test_an_output_that_cannot_be_written_is_refused_before_anything_is_sent(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """An output folder that is a file: exit 2 naming `output` before a request, not after every row was paid for."""
    (tmp_path / "blocked").write_text("a file where the output folder should be")
    spec_path = write_spec(output="blocked/result.parquet", checkpoint="result.checkpoint.sqlite")
    result = invoke("run", str(spec_path), "--sandbox")
    assert result.exit_code == 2, result.output
    assert "output" in result.stderr and "choose a folder you can write to" in result.stderr
    assert not (tmp_path / "result.checkpoint.sqlite").exists()


def test_nested_columns_reach_a_csv_output_as_json_text(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """A Parquet input with a list column and an array answer, written to .csv: JSON text, not a failure after paying."""
    pl.DataFrame({"id": ["a", "b"], "text": ["x", "y"], "tags": [["red", "blue"], []]}).write_parquet(
        tmp_path / "nested.parquet"
    )
    schema = {
        "type": "object",
        "properties": {"labels": {"type": "array", "items": {"type": "string"}}},
        "required": ["labels"],
        "additionalProperties": False,
    }
    spec_path = write_spec(
        input="nested.parquet",
        id_column="id",
        prompt="{text} {tags}",
        output="out/result.csv",
        response_format={"type": "json_schema", "json_schema": {"name": "t", "strict": True, "schema": schema}},
    )
    result = invoke("run", str(spec_path), "--sandbox")
    assert result.exit_code == 0, result.output
    frame = pl.read_csv(tmp_path / "out" / "result.csv")
    assert frame["tags"].to_list() == ['["red","blue"]', "[]"]
    assert all(isinstance(json.loads(v), list) for v in frame["labels"].to_list())


@pytest.mark.slow  # seconds of runs in their own processes: the long set (CI's second step)
def test_a_server_killed_mid_run_stops_the_run_with_exit_3(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """The sandbox in its own process is killed mid-run: the run stops within its unreachable timeout
    (plus the grace), exits 3 naming the cause, and leaves the unanswered rows pending, not failed."""
    rows = 3000
    pl.DataFrame(
        {"ticket_id": [f"T-{i}" for i in range(rows)], "subject": ["s"] * rows, "text": [f"t {i}" for i in range(rows)]}
    ).write_csv(tmp_path / "many.csv")
    server = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "sandbox", "--port", "0", "--latency", "0.05"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = server.stderr.readline() if server.stderr else ""
        base_url = ready.split(" at ")[1].split()[0]
        spec_path = write_spec(input="many.csv", concurrency=4, unreachable_timeout_s=1)
        env = {**os.environ, "OPENROUTER_BASE_URL": base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}
        checkpoint = tmp_path / "out" / "result.checkpoint.sqlite"
        run = run_until(spec_path, env, checkpoint.exists)
        time.sleep(0.5)
    finally:
        server.kill()
        server.wait()
        if server.stderr:
            server.stderr.close()
    killed_at = time.monotonic()
    _, stderr = run.communicate(timeout=90)
    assert run.returncode == 3, stderr
    assert time.monotonic() - killed_at < 30
    assert "unreachable for 1 s" in stderr and "Traceback" not in stderr
    output = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert 0 < output.height < rows
    assert output["status"].to_list() == ["ok"] * output.height, "no row failed because the server went away"


def test_hostile_error_text_cannot_drive_the_terminal_or_flood_the_log(
    write_spec: Callable[..., Path], sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """A server error carrying OSC 0/52, ESC[2J, CR/LF and 2 MB of text reaches stderr and stdout escaped and cut,
    even with -v logging every row."""
    sandbox = sandbox_in_thread(SandboxConfig(faults={"hostile_error": 1.0}))
    env = {"OPENROUTER_BASE_URL": sandbox.base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    result = invoke("run", str(write_spec()), "-v", env=env)
    assert result.exit_code == 1, result.output[-2000:]
    for stream in (result.stdout, result.stderr):
        assert "\x1b" not in stream and "\x07" not in stream and "\r" not in stream
        assert "\nFAKE LOG LINE" not in stream
    assert "\\x1b]52;c;" in result.stderr, "the escape is shown, not executed"
    assert len(result.stderr) < 200_000, "a 2 MB message is not logged in full for every row"


def test_any_openai_compatible_server_runs_the_job(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """Against a third-party OpenAI-compatible server (fakellm, in its own process; no /key, no /models, no
    usage.cost): its own parameters are sent with a warning, only concurrency limits the run, every row is
    answered with its tokens, and the cost is unknown (null in the output, 'unknown' in the summary and status)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "fakellm.yaml"
    config.write_text("version: 1\ndefaults:\n  fallback: deterministic_echo\nrules: []\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "fakellm.cli", "serve", "--port", str(port), "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as attempt:
                if attempt.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        spec_path = write_spec(
            models=["llama-3.2-1b"],
            params={"max_tokens": 20, "cache_prompt": True},
            api={"base_url": f"http://127.0.0.1:{port}/v1"},
        )
        result = invoke("run", str(spec_path), env={"OPENROUTER_API_KEY": ""})
        status = invoke("status", str(spec_path))
    finally:
        server.terminate()
        server.wait(10)
    assert result.exit_code == 0, result.output
    assert "params.cache_prompt: not an OpenRouter request parameter" in result.stderr
    assert "rate limit: none" in result.stderr and "only concurrency limits the run" in result.stderr
    assert "cost: unknown" in result.stdout
    output = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert output["status"].to_list() == ["ok"] * 12 and (output["prompt_tokens"] > 0).all()
    assert output["cost_usd"].null_count() == 12 and set(output["cost_source"]) == {"unknown"}
    assert "cost so far: unknown" in status.stdout


def test_endpoints_and_generation_lookups(sandbox_in_thread: Callable[[SandboxConfig], Sandbox]) -> None:
    """`models --endpoints` lists a model's providers with what each supports; `generation ID` prints what the
    server kept for one answer (the output's generation_id), with the key from the environment."""
    listing = invoke("models", "--sandbox", "--endpoints", "meta-llama/llama-3.3-70b-instruct")
    assert listing.exit_code == 0
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:3] == ["provider", "tag", "quant."]
    assert lines[1].startswith("DeepInfra") and "structured_outputs" in lines[1]
    assert lines[2].startswith("Together") and "structured_outputs" not in lines[2]
    assert invoke("models", "--endpoints", "not-a-slug").exit_code == 2

    sandbox = sandbox_in_thread(SandboxConfig())
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    request = urllib.request.Request(
        sandbox.base_url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    answer = json.loads(urllib.request.urlopen(request, timeout=10).read())
    env = {"OPENROUTER_BASE_URL": sandbox.base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    shown = invoke("generation", answer["id"], env=env)
    assert shown.exit_code == 0, shown.output
    assert f"id: {answer['id']}" in shown.stdout and "model: openai/gpt-4o-mini" in shown.stdout
    assert "tokens_prompt:" in shown.stdout and "total_cost:" in shown.stdout
    missing = invoke("generation", "gen-nope", env=env)
    # an id the server does not know is the user's input (exit 2), not a stop (tests/test_cli_convention.py)
    assert missing.exit_code == 2 and "has no generation 'gen-nope'" in missing.stderr


def test_sigterm_cancels_streams_in_flight_at_once(
    write_spec: Callable[..., Path], tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """A streamed answer can be stopped (which stops its billing): on SIGTERM the run cancels its streams at once
    instead of waiting up to 30 s for answers that take 20 s, and exits 3 with the rows pending. The cancelled
    streams may have been billed: each counts as an attempt at its worst case, in the checkpoint and `status`."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=20.0))
    job = write_spec(params={"max_tokens": 20, "stream": True}, concurrency=4)
    process, _, stderr, stopping_s = sigterm_after(job, sandbox, requests=4)
    assert process.returncode == 3, stderr
    assert stopping_s < 10, "the streams were cancelled, not waited for"
    assert "gave up on 4 requests still in flight" in stderr
    assert "\n12 rows are pending; rerun the same command" in stderr
    with sqlite3.connect(job.parent / "out" / "result.checkpoint.sqlite") as db:
        kept = db.execute("SELECT status, attempts, cost_source, cost_usd FROM results").fetchall()
    assert len(kept) == 4 and all(row[:3] == ("pending", 1, "estimated") and Decimal(row[3]) > 0 for row in kept)
    env = {**os.environ, "OPENROUTER_BASE_URL": sandbox.base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    status = json.loads(cli_here("status", str(job), "--json", env=env).stdout)
    assert Decimal(status["cost_usd"]) == sum(Decimal(row[3]) for row in kept)


@pytest.mark.slow  # seconds of runs in their own processes: the long set (CI's second step)
def test_sigterm_releases_rows_waiting_on_the_rate_limit_at_once(
    write_spec: Callable[..., Path], sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """Rows waiting for a rate-limit slot were never sent: a stop releases them at once (no 30 s grace, no
    'gave up on requests in flight'), and nothing goes out after the stop."""
    sandbox = sandbox_in_thread(SandboxConfig())
    job = write_spec(rate_limit={"requests_per_second": 1}, concurrency=6)
    process, _, stderr, stopping_s = sigterm_after(job, sandbox, requests=1)
    sent = sandbox.stats.requests
    assert process.returncode == 3, stderr
    assert stopping_s < 5 and "gave up on" not in stderr
    time.sleep(1.2)
    assert sandbox.stats.requests == sent <= 2


@pytest.mark.parametrize("where", ["spec", "environment"])
def test_a_password_in_the_base_url_is_refused_and_never_printed(write_spec: Callable[..., Path], where: str) -> None:
    """http://user:pass@proxy/... in api.base_url or $OPENROUTER_BASE_URL: exit 2 before anything is sent, saying
    how to send the credential instead; the password appears nowhere (it was printed, stored, then a traceback)."""
    url = "http://alice:s3cr3t-pw@127.0.0.1:9/api/v1"
    spec = write_spec(api={"base_url": url}) if where == "spec" else write_spec()
    env = {"OPENROUTER_API_KEY": "sk-or-v1-test", **({"OPENROUTER_BASE_URL": url} if where == "environment" else {})}
    for command in ("run", "status", "validate"):
        result = invoke(command, str(spec), env=env)
        assert result.exit_code == 2, (command, result.output)
        assert "carries a user name or password" in result.stderr and "Proxy-Authorization" in result.stderr
        assert "s3cr3t" not in result.output + result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_process_stopped_longer_than_timeout_s_pays_for_nothing_twice(
    write_spec: Callable[..., Path], tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """Ctrl-Z then `fg` (SIGSTOP, 3 s, SIGCONT) with 20 requests on the wire and timeout_s 1: the answers that
    came during the stop are answers; no request is sent twice (before: every one of them was, as a timeout)."""
    rows = 40
    pl.DataFrame(
        {"ticket_id": [f"T-{i}" for i in range(rows)], "subject": ["s"] * rows, "text": [f"t {i}" for i in range(rows)]}
    ).write_csv(tmp_path / "many.csv")
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.5))
    job = write_spec(input="many.csv", concurrency=20, timeout_s=1)
    process = run_started(job, sandbox, requests=20)
    process.send_signal(signal.SIGSTOP)
    time.sleep(3)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-2000:]
    assert sum(n - 1 for n in sandbox.stats.answered.values()) == 0 and sandbox.stats.requests == rows


def test_a_checkpoint_belongs_to_one_job(
    write_spec: Callable[..., Path], tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """Another job pointed at a job's checkpoint is refused by run, run --fresh --yes and status (exit 2, both
    named, the fix given) and buys nothing; the owner's answers survive, moving its spec, renaming its input and
    editing it keep the checkpoint its own, and a checkpoint from before owners were recorded is adopted."""
    server = sandbox_in_thread(SandboxConfig())
    env = {"OPENROUTER_BASE_URL": server.base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    owner = write_spec(checkpoint="shared.sqlite")
    assert invoke("run", str(owner), env=env).exit_code == 0
    paid = server.stats.charged_usd
    other = tmp_path / "other.yaml"
    other.write_text(owner.read_text().replace("name: test-job", "name: other-job").replace("out/result", "out/other"))
    for args in (["run", str(other)], ["run", str(other), "--fresh", "--yes"], ["status", str(other)]):
        refused = invoke(*args, env=env)
        assert refused.exit_code == 2, refused.output
        assert "'test-job'" in refused.stderr and "'other-job'" in refused.stderr and "checkpoint:" in refused.stderr
    assert server.stats.requests == 12, "the other job bought nothing"
    status = json.loads(invoke("status", str(owner), "--json", env=env).stdout)
    assert status["models"]["openai/gpt-4o-mini"]["ok"] == 12 and Decimal(status["cost_usd"]) == paid
    moved = tmp_path / "specs" / "job.yaml"  # moved, its input renamed, concurrency edited: the same job
    moved.parent.mkdir()
    (tmp_path / "tickets.csv").rename(tmp_path / "tickets-v2.csv")
    spec = yaml.safe_load(owner.read_text())
    spec.update(input="../tickets-v2.csv", output="../out/result.parquet", checkpoint="../shared.sqlite", concurrency=2)
    moved.write_text(yaml.safe_dump(spec))
    owner.unlink()
    again = invoke("run", str(moved), env=env)
    assert again.exit_code == 0, again.output
    assert server.stats.requests == 12, "its own answers were found"
    db = sqlite3.connect(tmp_path / "shared.sqlite")  # as written before checkpoints recorded their job (8)
    db.execute("DROP TABLE job")
    for column in ("reserved_usd", "cursor", "cost_usd", "server"):  # and what migration 10 added to batches
        db.execute(f"ALTER TABLE batches DROP COLUMN {column}")
    db.execute("PRAGMA user_version=8")
    db.commit()
    db.close()
    adopted = invoke("run", str(moved), env=env)
    assert adopted.exit_code == 0 and server.stats.requests == 12, adopted.output
    assert invoke("run", str(other), env=env).exit_code == 2, "adopted by the job that opened it"


def test_a_budget_refused_under_the_sandbox_names_the_sandbox(write_spec: Callable[..., Path]) -> None:
    """A budget with an unpriced model (the auto router) on --sandbox is refused naming the sandbox's /models, not
    openrouter.ai's, which the run never asked."""
    result = invoke("run", str(write_spec(models=["openrouter/auto"], budget_usd=1)), "--sandbox")
    assert result.exit_code == 2, result.output
    assert "budget_usd: no prices for openrouter/auto" in result.stderr and "openrouter.ai" not in result.stderr
    assert "at http://127.0.0.1:" in result.stderr.split("budget_usd:")[1]


def test_a_report_or_a_starter_spec_that_cannot_be_written_is_exit_2_not_a_traceback(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """`init --output`, `report --output`, `report --junit` and `export --output` into a folder no one can write
    (here /proc, which no file can be made in, root or not): before, FileNotFoundError's traceback; now exit 2
    naming the option."""
    spec = write_spec(evaluate={"reference": "text", "metric": "exact"})
    env = {**os.environ, "OPENROUTER_API_KEY": ""}
    assert cli_here("run", str(spec), "--sandbox", env=env).returncode in (0, 1)
    data = str(tmp_path / "tickets.csv")
    for args, option in [
        (("init", data, "--output", "/proc/job.yaml"), "--output"),
        (("report", str(spec), "--sandbox", "--output", "/proc/report.html"), "--output"),
        (("report", str(spec), "--sandbox", "--json", "--fail-under", "0", "--junit", "/proc/gates.xml"), "--junit"),
        (("export", str(spec), "--sandbox", "--output", "/proc/out.csv"), "error"),
    ]:
        done = cli_here(*args, env=env)
        assert done.returncode == 2, (args, done.stderr)
        assert f"{option}: cannot write /proc/" in done.stderr
