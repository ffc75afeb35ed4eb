"""The command line: exit codes and messages, as a user (or cron) sees them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner, Result

from batchrunner.cli import main
from batchrunner.sandbox import SandboxConfig

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


def test_failed_rows_exit_1(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """Rows that fail are in the output with status failed, and the exit code is 1."""
    result = invoke("run", str(write_spec(models=["no-such-model"], output="out/r.csv")), "--sandbox")
    assert result.exit_code == 1
    frame = pl.read_csv(tmp_path / "out" / "r.csv")
    assert frame["status"].unique().to_list() == ["failed"]
    assert frame["error"][0].startswith("HTTP 400")


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
    write_spec: Callable[..., Path], sandbox_in_thread: Callable[[SandboxConfig], object]
) -> None:
    """A rejected key stops the job at GET /key (exit 3) before any completion, says what to check, never shows the key."""
    sandbox = sandbox_in_thread(SandboxConfig(require_key=True, api_key="sk-or-v1-right"))
    env = {"OPENROUTER_BASE_URL": sandbox.base_url, "OPENROUTER_API_KEY": "sk-or-v1-wrong-secret"}  # type: ignore[attr-defined]
    result = invoke("run", str(write_spec()), env=env)
    assert result.exit_code == 3, result.output
    assert "stopped before sending anything" in result.stderr and "sk-or-v1-" in result.stderr
    assert "wrong-secret" not in result.output
    assert sandbox.stats.requests == 0  # type: ignore[attr-defined]


def test_python_dash_m_runs_the_cli() -> None:
    """`python -m batchrunner` is the same command."""
    completed = subprocess.run(
        [sys.executable, "-m", "batchrunner", "run", "--help"], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0 and "--sandbox" in completed.stdout


def test_sandbox_command_refuses_unknown_faults() -> None:
    """`batchrunner sandbox --fault` names the known fault kinds when given an unknown one."""
    result = CliRunner().invoke(main, ["sandbox", "--fault", "ratelimit=0.5"])
    assert result.exit_code == 2 and "known: rate_limit" in result.output


def test_free_daily_cap_exits_3_naming_the_reset(
    write_spec: Callable[..., Path],
    sandbox_in_thread: Callable[[SandboxConfig], object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When free models hit their daily cap, the run writes what it has and exits 3 saying when the cap resets."""
    from batchrunner import limits

    monkeypatch.setattr(limits, "FREE_REQUESTS_PER_MINUTE", 60_000)
    sandbox = sandbox_in_thread(SandboxConfig(free_daily_cap=4))
    env = {"OPENROUTER_BASE_URL": sandbox.base_url, "OPENROUTER_API_KEY": "sk-or-v1-test"}  # type: ignore[attr-defined]
    result = invoke("run", str(write_spec(models="meta-llama/llama-3.3-70b-instruct:free", concurrency=1)), env=env)
    assert result.exit_code == 3, result.output
    assert "free-model daily cap" in result.stderr and "UTC" in result.stderr
    assert "rows: 4 ok, 0 failed, 8 pending" in result.stdout
