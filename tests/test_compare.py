"""Runs compared (`report --baseline`): the pure comparison, snapshots of complete evaluation runs, and the
command against run:N, a date, another job and an output file."""

from __future__ import annotations

import json
import os
import shutil
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from conftest import cli_here

from batchrunner.compare import compare, to_markdown

ROOT = Path(__file__).resolve().parent.parent


def frame(scores: list[float], served: list[str], providers: list[str] | None = None) -> pl.DataFrame:
    n = len(scores)
    return pl.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "requested_model": ["a/m"] * n,
            "status": ["ok"] * n,
            "score": scores,
            "model": served,
            "provider": providers or ["P"] * n,
            "cost_usd": [Decimal("0.001")] * n,
            "latency_s": [0.5] * n,
        }
    )


def test_a_known_change_and_a_moved_model() -> None:
    """10 rows all right before, 8 right now: -20 points on 10 paired rows, the 2 flipped rows named; 3 rows
    served by another model now, and within the run two served models: both said."""
    before = frame([1.0] * 10, ["a/m-v1"] * 10)
    after = frame([1.0] * 8 + [0.0] * 2, ["a/m-v1"] * 7 + ["a/m-v2"] * 3)
    result = compare(after, before, id_column="id", score_column="score", after_label="now", before_label="run:1")
    (model,) = result.models
    assert model.rows == 10 and model.change is not None and model.change.mean == pytest.approx(-0.2)
    assert (model.score_before, model.score_after) == (1.0, 0.8)
    assert (model.now_wrong, model.now_right_count) == (["r8", "r9"], 0)
    assert model.served_moved == 3 and model.served_after == ["a/m-v1", "a/m-v2"]
    assert any("another model served the answer" in note for note in result.notes)
    assert any("served by a/m-v1, a/m-v2" in note for note in result.notes)
    text = to_markdown(result)
    assert "| a/m | 10 | 100.0% | 80.0% |" in text and "2 rows now wrong (r8, r9)" in text


def test_only_rows_both_runs_answered_are_paired() -> None:
    """A row the baseline lacks is left out of the pairing (and a model the baseline lacks is not compared)."""
    before = frame([1.0, 0.0], ["x", "x"])
    after = pl.concat(
        [frame([1.0, 1.0, 0.0], ["x"] * 3), frame([1.0], ["y"]).with_columns(requested_model=pl.lit("b/n"))]
    )
    result = compare(after, before, id_column="id", score_column="score", after_label="now", before_label="b")
    assert [m.model for m in result.models] == ["a/m"]
    assert result.models[0].rows == 2 and result.models[0].now_right == ["r1"]


@pytest.mark.slow  # a few seconds of runs in their own processes: the long set (CI's second step)
def test_report_baseline_against_a_recorded_run_a_date_and_an_output_file(tmp_path: Path) -> None:
    """A complete evaluation run is recorded (status lists it); `report --baseline run:1` with run 1 edited to
    say two rows were right and served by another model reports exactly that; a date and an earlier output file
    name a baseline too; an unknown run is exit 2, naming the runs there are."""
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    job = str(tmp_path / "jobs" / "ticket_eval.yaml")
    env = {**os.environ, "OPENROUTER_API_KEY": ""}
    spec_text = (tmp_path / "jobs" / "ticket_eval.yaml").read_text().replace("concurrency: 32", "concurrency: 8")
    (tmp_path / "jobs" / "ticket_eval.yaml").write_text(spec_text)
    tickets = (
        tmp_path / "sample_data" / "tickets.csv"
    )  # 60 rows: a complete run of them is recorded (a --limit's is not)
    tickets.write_text("".join(tickets.read_text().splitlines(keepends=True)[:61]))
    assert cli_here("run", job, "--sandbox", env=env).returncode in (0, 1)
    status = json.loads(cli_here("status", job, "--sandbox", "--json", env=env).stdout)
    assert [r["run"] for r in status["recorded_runs"]] == [1]
    (runs,) = list((tmp_path / "out").glob("*.runs"))
    (snapshot,) = list(runs.glob("1-*.parquet"))
    kept = pl.read_parquet(snapshot)
    model = kept["requested_model"][0]
    wrong = kept.filter((pl.col("requested_model") == model) & (pl.col("score") == 0)).head(2)
    assert wrong.height == 2, "the sandbox's models are not perfect: some rows are wrong"
    flipped = pl.col("__batchrunner_row").is_in(wrong["__batchrunner_row"].to_list()) & (
        pl.col("requested_model") == model
    )
    edited = kept.with_columns(
        score=pl.when(flipped).then(1.0).otherwise(pl.col("score")),
        model=pl.when(flipped).then(pl.lit("old/model")).otherwise(pl.col("model")),
    )
    edited.write_parquet(snapshot)
    done = cli_here("report", job, "--sandbox", "--json", "--baseline", "run:1", env=env)
    assert done.returncode == 0, done.stderr
    compared = json.loads(done.stdout)
    changed = next(m for m in compared["models"] if m["model"] == model)
    assert changed["now_wrong_count"] == 2 and changed["now_right_count"] == 0 and changed["served_moved"] == 2
    assert all(m["now_wrong_count"] == 0 for m in compared["models"] if m["model"] != model)
    finished = status["recorded_runs"][0]["finished_at"][:10]
    by_date = cli_here("report", job, "--sandbox", "--baseline", finished, env=env)
    assert by_date.returncode == 0 and "## now against run:1" in by_date.stdout
    output = next((tmp_path / "out").glob("ticket_eval*.csv"), None) or next((tmp_path / "out").glob("*.parquet"))
    same = json.loads(cli_here("report", job, "--sandbox", "--json", "--baseline", str(output), env=env).stdout)
    assert all(m["now_wrong_count"] == m["now_right_count"] == 0 for m in same["models"])
    other = json.loads(cli_here("report", job, "--sandbox", "--json", "--baseline", job, env=env).stdout)
    assert other["before"].startswith("ticket-eval (") and all(m["change"]["mean"] == 0 for m in other["models"])
    unknown = cli_here("report", job, "--sandbox", "--baseline", "run:9", env=env)
    assert unknown.returncode == 2 and "run:9: no such run" in unknown.stderr and "run:1" in unknown.stderr


def test_a_baseline_file_that_is_not_an_output_is_refused_naming_what_it_lacks(tmp_path: Path) -> None:
    """`report --baseline sample_data/tickets.csv` (the input, not an output): before, polars' ColumnNotFoundError
    traceback ('unable to find column "requested_model"'). Now exit 2 naming the file and what it lacks; a file
    that cannot be read at all is refused the same way."""
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    job = str(tmp_path / "jobs" / "ticket_eval.yaml")
    env = {**os.environ, "OPENROUTER_API_KEY": ""}
    assert cli_here("run", job, "--sandbox", "--limit", "10", env=env).returncode in (0, 1)
    tickets = str(tmp_path / "sample_data" / "tickets.csv")
    refused = cli_here("report", job, "--sandbox", "--baseline", tickets, env=env)
    assert refused.returncode == 2, refused.stderr
    assert f"--baseline: {tickets}: not an output batchrunner wrote (no requested_model" in refused.stderr
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    unreadable = cli_here("report", job, "--sandbox", "--baseline", str(broken), env=env)
    assert unreadable.returncode == 2 and f"--baseline: {broken}: cannot read it" in unreadable.stderr
    quick = str(tmp_path / "jobs" / "quickstart.yaml")  # an output of a job that scores nothing
    assert cli_here("run", quick, "--sandbox", "--limit", "10", env=env).returncode == 0
    unscored = cli_here("report", job, "--sandbox", "--baseline", str(tmp_path / "out" / "quickstart.csv"), env=env)
    assert unscored.returncode == 2 and "has no score column to compare" in unscored.stderr, unscored.stderr
