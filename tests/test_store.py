"""The checkpoint store: migrations, durable commits, lookups, and run records."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchrunner.errors import RunHalted, SpecError
from batchrunner.records import MONEY_COLUMNS, RESULT_SCHEMA, STORED_EXTRAS, STORED_SCHEMA, Bill, RowResult
from batchrunner.store import MIGRATIONS, Store, fetched_schema


def result(row: int, status: str = "ok", fingerprint: str = "fp", cost: str = "0.000123") -> RowResult:
    return RowResult(
        row,
        f"id{row}",
        0,
        "a/b",
        status,
        model="a/b",
        response=f"r{row}",
        cost_usd=Decimal(cost),
        attempts=2,
        fingerprint=fingerprint,
    )  # type: ignore[arg-type]  # status is a plain str here, a Literal in RowResult


def test_migrations_apply_once_and_newer_schemas_are_refused(tmp_path: Path) -> None:
    """Opening a new store applies every migration; reopening applies none; a newer schema is refused."""
    path = tmp_path / "c.sqlite"
    Store.open(path).close()
    Store.open(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(SpecError, match=r"newer batchrunner .* upgrade batchrunner"):
        Store.open(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "folder", "symlink"])
def test_an_unusable_checkpoint_is_a_spec_error_naming_the_fix(tmp_path: Path, damage: str) -> None:
    """Garbage, a truncated file, a folder and a planted symlink are refused with the file and the fix."""
    path = tmp_path / "c.sqlite"
    if damage == "garbage":
        path.write_bytes(b"this is not sqlite at all" * 100)
    elif damage == "truncated":
        Store.open(path).close()
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "folder":
        path.mkdir()
    else:
        target = tmp_path / "precious.txt"
        target.write_text("keep me")
        path.symlink_to(target)
    with pytest.raises(SpecError, match=r"checkpoint: .*c\.sqlite"):
        Store.open(path).close()
    if damage == "symlink":
        assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_results_round_trip_exactly(tmp_path: Path) -> None:
    """A flushed result comes back with every column, cost as the exact Decimal."""
    store = Store.open(tmp_path / "c.sqlite")
    store.add(result(1))
    store.flush()
    again = Store.open(tmp_path / "c.sqlite")
    assert again.answered(["id1", "id2"]) == {("id1", "a/b", "fp")}
    fetched = again.fetch(["id1", "id2"])
    assert fetched.columns == ["fingerprint", "row_id", *STORED_SCHEMA], "named columns, in one order"
    values = fetched.row(0, named=True)
    assert Decimal(values["cost_usd"]) == Decimal("0.000123") and values["response"] == "r1" and values["attempts"] == 2


def test_a_retried_row_replaces_its_failure(tmp_path: Path) -> None:
    """A row that failed and then succeeded for the same request keeps only the success."""
    store = Store.open(tmp_path / "c.sqlite")
    store.add(result(1, "failed"))
    store.flush()
    store.add(result(1, "ok"))
    store.flush()
    assert store.fetch(["id1"])["status"].to_list() == ["ok"]
    assert store.unfinished(["id1"]) == {}


def test_answers_for_other_fingerprints_are_kept(tmp_path: Path) -> None:
    """Answers to an earlier version of the request stay, so reverting an edit costs nothing."""
    store = Store.open(tmp_path / "c.sqlite")
    store.add(result(1, fingerprint="old"))
    store.add(result(1, fingerprint="new"))
    store.flush()
    assert sorted(store.fetch(["id1"])["fingerprint"].to_list()) == ["new", "old"]


async def test_flusher_commits_while_the_run_goes(tmp_path: Path) -> None:
    """Answers become visible to another connection within the flush interval, not at the end."""
    store = Store.open(tmp_path / "c.sqlite")
    flusher = asyncio.create_task(store.flush_every(0.01))
    store.add(result(1))
    reader = sqlite3.connect(tmp_path / "c.sqlite")
    for _ in range(200):
        await asyncio.sleep(0.01)
        if reader.execute("SELECT count(*) FROM results").fetchone()[0] == 1:
            break
    flusher.cancel()
    assert reader.execute("SELECT count(*) FROM results").fetchone()[0] == 1
    reader.close()


def test_runs_record_outcome_and_cost(tmp_path: Path) -> None:
    """Each run is recorded with its outcome and exact cost."""
    store = Store.open(tmp_path / "c.sqlite")
    for cost in ("0.1", "0.2"):
        store.begin_run()
        store.end_run("finished", ok=1, failed=0, cost_usd=Decimal(cost))
    assert [r["outcome"] for r in store.runs()] == ["finished", "finished"]
    assert [r["cost_usd"] for r in store.runs()] == ["0.1", "0.2"]


def test_spent_is_read_from_the_answers_even_when_no_run_ended(tmp_path: Path) -> None:
    """spent_usd sums the stored answers (ok, failed and unfinished), so a killed run's spending shows."""
    store = Store.open(tmp_path / "c.sqlite")
    store.begin_run()  # never ended: killed
    for i, (status, cost) in enumerate([("ok", "0.1"), ("failed", "0.02"), ("pending", "0.003")]):
        store.add(RowResult(i, str(i), 0, "m", status, cost_usd=Decimal(cost), fingerprint="f"))  # type: ignore[arg-type]  # status: str for a Literal
    store.flush()
    assert store.spent_usd() == Decimal("0.123")
    unfinished = store.unfinished(["0", "1", "2"])
    assert {key[0]: (status, bill.cost_usd) for key, (status, bill) in unfinished.items()} == {
        "1": ("failed", Decimal("0.02")),
        "2": ("pending", Decimal("0.003")),
    }
    assert store.answered(["0", "1", "2"]) == {("0", "m", "f")}


def test_an_older_checkpoint_is_migrated_keeping_its_answers(tmp_path: Path) -> None:
    """A checkpoint written at schema 1 opens at the current schema with its answers intact."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    MIGRATIONS[0](db)
    db.execute("PRAGMA user_version=1")
    db.execute(
        "INSERT INTO results (row_id, requested_model, fingerprint, row_index, model_position, answered_at, status, response, cost_usd, attempts)"
        " VALUES ('id1', 'a/b', 'fp', 0, 0, '2026-01-01', 'ok', 'old answer', '0.5', 1)"
    )
    db.execute("COMMIT")
    db.close()
    store = Store.open(path)
    values = store.fetch(["id1"]).row(0, named=True)
    assert values["response"] == "old answer" and values["parsed"] is None and values["cost_source"] is None
    assert values["billed_prompt_tokens"] == values["prompt_tokens"], "migration 4 gave old rows their bill"
    store.add(result(2))
    store.flush()
    assert store.answered(["id2"]) == {("id2", "a/b", "fp")}


async def test_a_commit_longer_than_the_interval_is_followed_by_the_next_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a commit takes the interval or longer (long answers), the flusher starts the next one at once instead of
    idling another interval while the backlog grows; a quick commit is still followed by the interval's wait."""
    store = Store.open(tmp_path / "c.sqlite")
    commits: list[tuple[float, float]] = []

    def flush(slow: float = 0.15) -> int:
        started = time.monotonic()
        time.sleep(slow if len(commits) == 0 else 0)
        commits.append((started, time.monotonic()))
        return 0

    monkeypatch.setattr(store, "flush", flush)
    flusher = asyncio.create_task(store.flush_every(0.15))
    while len(commits) < 3:
        await asyncio.sleep(0.01)
    flusher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flusher
    (_, slow_end), (quick_start, _), (next_start, _) = commits[:3]
    assert quick_start - slow_end < 0.08, "after a slow commit, the next began at once"
    assert next_start - quick_start > 0.1, "after a quick one, the interval is kept"
    store.close()


async def test_a_full_disk_keeps_answers_buffered_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit that fails (disk full) keeps the answers in the buffer, tells the run, and succeeds once it can."""
    store = Store.open(tmp_path / "c.sqlite")
    real = store._db
    failing = True

    class FullDisk:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def executemany(self, *args: object) -> object:
            if failing:
                raise sqlite3.OperationalError("database or disk is full")
            return real.executemany(*args)

    monkeypatch.setattr(store, "_db", FullDisk())
    errors: list[sqlite3.Error] = []
    flusher = asyncio.create_task(store.flush_every(0.01, errors.append))
    store.add(result(1))
    while not errors:
        await asyncio.sleep(0.01)
    assert store.unsaved == 1 and "disk is full" in str(errors[0])
    failing = False
    while store.unsaved:
        await asyncio.sleep(0.01)
    flusher.cancel()
    assert store.answered(["id1"]) == {("id1", "a/b", "fp")}


def test_a_checkpoint_that_fails_a_query_mid_run_stops_the_run_naming_it(tmp_path: Path) -> None:
    """The queries a run makes as it reads its rows turn a SQLite failure into a RunHalted naming the checkpoint and
    the fix (a sentence and exit 3), not an error blamed on the input or a traceback."""
    store = Store.open(tmp_path / "c.sqlite")
    store._reader.close()  # the connection fails from here on, as a disk error would make it
    for query in (
        lambda: store.answered(["a"]),
        lambda: store.unfinished(["a"]),
        lambda: store.answers_to([("m", "f")]),
    ):
        with pytest.raises(RunHalted, match=r"cannot read the checkpoint .*c\.sqlite .*check the disk, then rerun"):
            query()


def _legacy_checkpoint(path: Path) -> None:
    """A checkpoint as batchrunner wrote it before checkpoints recorded their job: migrations 1-8, one paid answer."""
    db = sqlite3.connect(path, isolation_level=None)
    for number, migration in enumerate(MIGRATIONS[:8], start=1):
        migration(db)
        db.execute(f"PRAGMA user_version={number}")
    db.execute(
        "INSERT INTO results (row_id, requested_model, fingerprint, row_index, model_position, answered_at, "
        "status, cost_usd) VALUES ('id1', 'a/b', 'fp', 1, 0, '2026-01-01T00:00:00+00:00', 'ok', '0.5')"
    )
    db.close()


def test_a_checkpoint_is_claimed_by_its_first_job_and_refused_to_another(tmp_path: Path) -> None:
    """The first job to open a checkpoint owns it; another job is refused naming both jobs and the fix."""
    path = tmp_path / "c.sqlite"
    Store.open(path, job="triage").close()
    Store.open(path, job="triage").close()
    with pytest.raises(SpecError) as refused:
        Store.open(path, job="labels")
    message = str(refused.value)
    assert "'triage'" in message and "'labels'" in message and str(path) in message and "`checkpoint:`" in message


def test_a_checkpoint_from_before_owners_is_adopted_with_its_answers(tmp_path: Path) -> None:
    """A checkpoint written before jobs were recorded is adopted by the first job that opens it, answers kept."""
    path = tmp_path / "c.sqlite"
    _legacy_checkpoint(path)
    with Store.open(path, job="triage") as store:
        assert store.answered(["id1"]) == {("id1", "a/b", "fp")}
        assert store.spent_usd() == Decimal("0.5")
    with pytest.raises(SpecError, match="'triage'"):
        Store.open(path, job="labels")


def test_fresh_keeps_the_owner(tmp_path: Path) -> None:
    """Deleting a job's answers (--fresh) leaves the checkpoint its job's: another job is still refused."""
    path = tmp_path / "c.sqlite"
    with Store.open(path, job="triage") as store:
        store.delete_all()
    with pytest.raises(SpecError, match="'triage'"):
        Store.open(path, job="labels")


@pytest.mark.parametrize("already", [(), ("service_tier",), ("upstream_cost_usd", "service_tier")])
def test_migration_11_adds_the_byok_and_tier_columns_only_where_missing(
    tmp_path: Path, already: tuple[str, ...]
) -> None:
    """A checkpoint of schema 10 gains upstream_cost_usd and service_tier, its answers kept; a column another
    migration already added (a branch merged with its own number 11) is left as it is, not added twice."""
    path = tmp_path / "c.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    for number, migration in enumerate(MIGRATIONS[:10], start=1):
        migration(db)
        db.execute(f"PRAGMA user_version={number}")
    for column in already:
        db.execute(f"ALTER TABLE results ADD COLUMN {column} TEXT")
    db.execute(
        "INSERT INTO results (row_id, requested_model, fingerprint, row_index, model_position, answered_at, "
        "status, cost_usd) VALUES ('id1', 'a/b', 'fp', 1, 0, '2026-01-01T00:00:00+00:00', 'failed', '0.5')"
    )
    db.close()
    with Store.open(path) as store:
        assert store.unfinished(["id1"]) == {("id1", "a/b", "fp"): ("failed", Bill(Decimal("0.5"), {"reported"}))}
        store.add(
            RowResult(0, "id2", 0, "a/b", "pending", fingerprint="fp", upstream_cost_usd=Decimal("0.25"), attempts=1)
        )
        store.flush()
        assert store.unfinished(["id2"])[("id2", "a/b", "fp")][1].upstream_usd == Decimal("0.25")
    columns = [row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(results)")]
    assert columns.count("upstream_cost_usd") == columns.count("service_tier") == 1


def every_column(row: int, **fields: Any) -> RowResult:
    """A result with a value of its own in every stored column, made from the schema: a column added to
    RESULT_SCHEMA (or STORED_EXTRAS) is in it with no edit here."""
    values: dict[str, Any] = {}
    for number, (name, dtype) in enumerate({**RESULT_SCHEMA, **STORED_EXTRAS}.items(), start=1):
        if name in MONEY_COLUMNS:
            values[name] = Decimal(number) / 1000 + row
        elif dtype == pl.Int64():
            values[name] = 10 * number + row
        elif dtype == pl.Float64():
            values[name] = number + row + 0.25
        else:
            values[name] = f"{name}-{row}"
    values["status"] = "ok"
    return RowResult(row_index=row, row_id=f"id{row}", model_position=row, fingerprint=f"fp{row}", **values | fields)


def test_every_stored_column_is_written_and_read_back_by_name(tmp_path: Path) -> None:
    """Each STORED_SCHEMA column, whatever the schema holds, goes into the checkpoint and comes back under its own name,
    and RowResult.from_row rebuilds the very result from what fetch returns."""
    result = every_column(1)
    with Store.open(tmp_path / "c.sqlite") as store:
        store.add(result)
    with Store.open(tmp_path / "c.sqlite") as again:
        fetched = again.fetch(["id1"]).row(0, named=True)
    assert fetched == {name: value for name, value in result.to_row().items() if name in fetched}
    assert set(fetched) == {"fingerprint", "row_id", *STORED_SCHEMA}
    assert RowResult.from_row({**fetched, "row_index": 1, "model_position": 1}) == result


def test_the_spill_file_keeps_every_column_by_name(tmp_path: Path) -> None:
    """Answers a full disk left are spilled as JSON objects by column name, every stored column in them, and the next
    open merges them whole."""
    result = every_column(2)
    store = Store.open(tmp_path / "c.sqlite")
    store.begin_run()
    store.add(result)
    store._spill(sqlite3.OperationalError("database or disk is full"))
    store.close()
    (line,) = store.spill_path.read_text().splitlines()
    spilled = json.loads(line)
    assert spilled == {**result.to_row(), "run_id": store.run_id, "answered_at": spilled["answered_at"], "server": ""}
    with Store.open(tmp_path / "c.sqlite") as again:
        assert not again.spill_path.exists()
        fetched = again.fetch(["id2"]).row(0, named=True)
    assert RowResult.from_row({**fetched, "row_index": 2, "model_position": 2}) == result


def test_answers_to_reads_a_stored_answer_whole_committed_or_not(tmp_path: Path) -> None:
    """What dedupe copies is the whole answer by name, from the buffer before a commit and from the table after."""
    result = every_column(3, deduped_from=None)
    request = (result.requested_model, result.fingerprint)
    with Store.open(tmp_path / "c.sqlite") as store:
        store.add(result)
        assert RowResult.from_row(store.answers_to([request])[request]) == result, "buffered"
        store.flush()
        assert RowResult.from_row(store.answers_to([request])[request]) == result, "committed"


# Spill lines as versions before named records wrote them (positional lists), one per layout they ever had:
# row_id, fingerprint, row_index, model_position, run_id, answered_at, server, then the result columns of the day.
_OLD = ["id1", "fp", 1, 0, 3, "2026-01-01T00:00:00+00:00", ""]
_ANSWER = ["a/b", "a/b", "ok", "answer", None, "stop", 10, 2, 1, 0, 12, 3]  # model .. billed_completion_tokens
_PARSED_AND_TOOL_CALLS = ['{"x": 1}', '[{"id": "call-1"}]']  # the last two columns of every layout
_SPILLED_BY_EARLIER_VERSIONS = {
    "migration 4": [*_OLD, *_ANSWER, "0.5", "reported", 0.75, 2, "gen-1", "prov"],
    "migration 6": [*_OLD, *_ANSWER, "0.5", "reported", 0.75, 2, "gen-1", "prov", "id0"],
    "migration 7": [*_OLD, *_ANSWER, "0.5", "reported", 0.75, 0.25, 2, "gen-1", "prov", "id0"],
    "migration 11": [*_OLD, *_ANSWER, "0.5", "0.4", "reported", 0.75, 0.25, 2, "gen-1", "prov", "flex", "id0"],
}


@pytest.mark.parametrize("version", list(_SPILLED_BY_EARLIER_VERSIONS))
def test_a_spill_file_of_an_earlier_version_is_merged_column_by_column(tmp_path: Path, version: str) -> None:
    """A positional spill line of any earlier layout lands in the right columns (the columns it did not have yet are
    NULL); before, any layout but the newest was dropped without a word, answers paid for and lost."""
    path = tmp_path / "c.sqlite"
    Store.open(path).close()
    spill = path.with_name(path.name + ".unsaved.jsonl")
    spill.write_text(json.dumps([*_SPILLED_BY_EARLIER_VERSIONS[version], *_PARSED_AND_TOOL_CALLS]) + "\n")
    with Store.open(path) as store:
        assert not spill.exists()
        fetched = store.fetch(["id1"]).row(0, named=True)
        assert store.unfinished(["id1"]) == {} and store.answered(["id1"]) == {("id1", "a/b", "fp")}
    assert {name: fetched[name] for name in ("response", "finish_reason", "cached_tokens", "billed_prompt_tokens")} == {
        "response": "answer",
        "finish_reason": "stop",
        "cached_tokens": 1,
        "billed_prompt_tokens": 12,
    }
    assert (fetched["cost_usd"], fetched["cost_source"], fetched["latency_s"], fetched["attempts"]) == (
        "0.5",
        "reported",
        0.75,
        2,
    )
    assert [fetched["generation_id"], fetched["provider"], fetched["parsed"], fetched["tool_calls"]] == [
        "gen-1",
        "prov",
        *_PARSED_AND_TOOL_CALLS,
    ]
    later = {
        "deduped_from": "id0" if version != "migration 4" else None,
        "ttft_s": 0.25 if version in ("migration 7", "migration 11") else None,
        "upstream_cost_usd": "0.4" if version == "migration 11" else None,
        "service_tier": "flex" if version == "migration 11" else None,
    }
    assert {name: fetched[name] for name in later} == later


def test_a_spill_line_of_no_known_shape_is_skipped_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A line that is neither a record by name nor a known positional layout is skipped with a warning naming it;
    the other lines are merged."""
    path = tmp_path / "c.sqlite"
    Store.open(path).close()
    good = {**every_column(4).to_row(), "run_id": None, "answered_at": "2026-01-01T00:00:00+00:00", "server": ""}
    path.with_name(path.name + ".unsaved.jsonl").write_text(f"{json.dumps(good)}\n[1, 2, 3]\n")
    with caplog.at_level(logging.WARNING, logger="batchrunner"), Store.open(path) as store:
        assert store.fetch(["id4"]).height == 1
    assert "line 2 is not an answer this batchrunner can read" in caplog.text


WRITER = """
import sys
from pathlib import Path
from batchrunner.records import RowResult
from batchrunner.store import Store
store = Store.open(Path(sys.argv[1]))
text = "answer " * 9000  # ~64 KB: a commit of a few of these takes long enough to be killed in
for batch in range(1000):
    for i in range(8):
        store.add(RowResult(i, f"b{batch}-{i}", 0, "a/b", "ok", response=f"{batch}-{i} {text}", fingerprint="fp"))
    store.flush()
    print(batch, flush=True)  # every answer of this batch is committed
"""


@pytest.mark.parametrize("after", [1, 3, 6])
def test_a_writer_killed_mid_commit_keeps_every_committed_answer(tmp_path: Path, after: int) -> None:
    """kill -9 of a process committing long answers, at a moment of its commits: every answer a returned commit
    holds is there, whole, and the checkpoint opens intact (the commit cut off is whole or absent)."""
    path = tmp_path / "c.sqlite"
    with subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True) as writer:
        assert writer.stdout is not None
        committed = -1
        while committed < after:
            committed = int(writer.stdout.readline())
        os.kill(writer.pid, signal.SIGKILL)  # mid-commit of batch `committed + 1`, or just before or after it
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = dict(db.execute("SELECT row_id, response FROM results").fetchall())
    for batch in range(committed + 1):
        for i in range(8):
            assert stored[f"b{batch}-{i}"].startswith(f"{batch}-{i} answer ") and len(stored[f"b{batch}-{i}"]) > 60_000
    partial = {row_id.split("-")[0] for row_id in stored} - {f"b{batch}" for batch in range(committed + 1)}
    assert len(partial) <= 1 and all(sum(r.startswith(b + "-") for r in stored) == 8 for b in partial)


def test_a_read_during_a_long_commit_does_not_wait_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The queries a run makes (answered, unfinished, fetch, answers_to, meta, the spending) answer at once while
    the flush thread is mid-commit, from the last commit, not waiting for the one in progress."""
    store = Store.open(tmp_path / "c.sqlite")
    store.add(result(1))
    store.flush()
    real, inserted, release = store._db, threading.Event(), threading.Event()

    class SlowCommit:  # a commit held open between its inserts and its COMMIT for as long as the test says
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def executemany(self, *args: Any) -> object:
            done = real.executemany(*args)
            inserted.set()
            release.wait(5)
            return done

    monkeypatch.setattr(store, "_db", SlowCommit())
    store.add(result(2))
    flusher = threading.Thread(target=store.flush)
    flusher.start()
    assert inserted.wait(5)
    started = time.monotonic()
    assert store.answered(["id1", "id2"]) == {("id1", "a/b", "fp")}
    assert store.unfinished(["id1", "id2"]) == {}
    assert store.fetch(["id1", "id2"])["row_id"].to_list() == ["id1"]
    assert set(store.answers_to([("a/b", "fp")])) == {("a/b", "fp")}
    assert store.meta("anything") is None and store.spent_usd() == Decimal("0.000123")
    waited = time.monotonic() - started
    release.set()
    flusher.join()
    assert waited < 1, f"the reads waited {waited:.1f} s for the commit"
    assert store.answered(["id1", "id2"]) == {("id1", "a/b", "fp"), ("id2", "a/b", "fp")}
    store.close()


def test_a_new_checkpoint_has_large_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    """A new checkpoint is made with PAGE_SIZE pages (a long answer in few pages); one made with SQLite's default
    4 KB pages keeps them and its answers, and takes new ones."""
    from batchrunner.store import PAGE_SIZE

    new, old = tmp_path / "new.sqlite", tmp_path / "old.sqlite"
    Store.open(new).close()
    _legacy_checkpoint(old)
    with Store.open(old) as store:
        store.add(result(2))
    with contextlib.closing(sqlite3.connect(new)) as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE > 4096
    with contextlib.closing(sqlite3.connect(old)) as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == 4096
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with Store.open(old) as store:
        assert store.answered(["id1", "id2"]) == {("id1", "a/b", "fp"), ("id2", "a/b", "fp")}


def test_fetch_as_columns_returns_every_answer_as_stored(tmp_path: Path) -> None:
    """fetch() read as columns (ADBC) gives the frame sqlite3 reads row by row: long answers (ASCII, non-ASCII, a
    NUL inside), empty and missing ones, money text and numbers, byte for byte; and a column whose first
    thousands of values are NULL (an error column of answered rows) keeps its type when text follows (ADBC's
    SQLite driver types a column by the first values it reads)."""
    texts = ["ok " * 22_000, "é漢🙂 " * 9_000, "a\x00b", "", None]
    store = Store.open(tmp_path / "c.sqlite")
    for row in range(60):
        status = "failed" if row % 11 == 3 else "pending" if row % 13 == 5 else "ok"
        answer = dataclasses.replace(
            result(row, status, cost=f"0.{row:012d}"), response=texts[row % len(texts)], latency_s=row / 7
        )
        store.add(answer)
    for row in range(60, 3060):  # thousands of rows with no error, then failed ones with an error's text
        store.add(result(row) if row < 3000 else dataclasses.replace(result(row, "failed"), error=f"HTTP 400 ({row})"))
    store.flush()
    ids = [f"id{row}" for row in range(3062)]
    got = store.fetch(ids)
    with contextlib.closing(sqlite3.connect(tmp_path / "c.sqlite")) as db:
        names = list(fetched_schema())
        rows = db.execute(f"SELECT {', '.join(names)} FROM results WHERE status != 'pending'").fetchall()
    whole = pl.DataFrame(rows, schema=fetched_schema(), orient="row")
    assert got.schema == whole.schema and got.height == whole.height == 3055  # 5 of the first 60 are unfinished
    late = got.filter(pl.col("row_id").is_in([f"id{row}" for row in range(3000, 3060)]))
    assert late.height == 60 and late["error"].null_count() == 0
    assert got.sort("row_id").equals(whole.sort("row_id"), null_equal=True)
    by_id = dict(zip(got["row_id"], got["response"], strict=True))
    assert all(by_id[f"id{row}"] == texts[row % len(texts)] for row in range(60) if f"id{row}" in by_id)
    assert store.fetch([]).schema == whole.schema and store.fetch(["nobody"]).height == 0


def test_a_checkpoint_whose_path_has_uri_characters_is_read_as_columns(tmp_path: Path) -> None:
    """fetch() opens the checkpoint again by URI (read-only): a path with ?, #, % and spaces is still that file,
    and closing leaves no WAL behind (the columnar reader is closed before the writer folds it in)."""
    folder = tmp_path / "we?ird #dir% 'é"
    folder.mkdir()
    store = Store.open(folder / "c?#%.sqlite")
    store.add(result(1))
    store.flush()
    assert store.fetch(["id1"]).select("row_id", "response").rows() == [("id1", "r1")]
    store.close()
    assert sorted(path.name for path in folder.iterdir()) == ["c?#%.sqlite"]


def test_rows_out_of_order_from_sqlite_stop_the_read_rather_than_lose_an_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row that types the columns for ADBC is dropped as the first: should SQLite ever return it elsewhere (it
    promises no order without ORDER BY), the read stops naming the checkpoint instead of dropping an answer."""
    import batchrunner.store as store_module

    store = Store.open(tmp_path / "c.sqlite")
    store.add(result(1))
    store.add(result(2))
    store.flush()
    assert sorted(store.fetch(["id1", "id2"])["row_id"]) == ["id1", "id2"]
    typed = store_module._typed_select

    def typing_row_last(schema: Any, where: str) -> str:
        head, tail = typed(schema, where).split(" UNION ALL ")
        return f"{tail} UNION ALL {head}"

    monkeypatch.setattr(store_module, "_typed_select", typing_row_last)
    with pytest.raises(RunHalted, match="came out of order"):
        store.fetch(["id1", "id2"])
    store.close()
