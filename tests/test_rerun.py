"""rerun.py: the rerun that knows without reading a row that none are left, or that only appended rows are new."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchrunner.offline import export_job
from batchrunner.request import RequestBuilder
from batchrunner.retries import RetryPolicy
from batchrunner.runner import RunSettings, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec


def no_rows_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a row was rendered")

    monkeypatch.setattr(RequestBuilder, "for_rows", refuse)


def write_tickets(path: Path, ids: range, *, edited: int | None = None) -> None:
    """The tickets fixture's rows with these ids, in the format `path` names; row `edited` with other text."""
    frame = pl.DataFrame(
        {
            "ticket_id": [f"T-{i}" for i in ids],
            "subject": [f"subject {i}" for i in ids],
            "text": [f"ticket text number {i}" + (" (edited)" if i == edited else "") for i in ids],
        }
    )
    {".csv": frame.write_csv, ".parquet": frame.write_parquet, ".jsonl": frame.write_ndjson}[path.suffix](path)


async def test_an_unchanged_complete_job_is_rerun_without_reading_a_row_or_rewriting_the_output(
    write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a run that left every pair answered, a rerun of the same input and spec renders no row, sends
    nothing and leaves the output file as it was; every pair counts as answered by earlier runs."""
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
        written = spec.output.stat().st_mtime_ns
        with monkeypatch.context() as patch:
            no_rows_read(patch)
            outcome = await run_job(spec)
    assert sandbox.stats.requests == 12 and outcome.report.resumed == 12 and outcome.report.pending == 0
    assert outcome.output_rows == 12 and spec.output.stat().st_mtime_ns == written


@pytest.mark.parametrize(
    ("source_name", "output"),
    [
        ("tickets.csv", "out/result.parquet"),
        ("tickets.parquet", "out/result.csv"),
        ("tickets.jsonl", "out/result.jsonl"),
    ],
)
async def test_rows_appended_are_the_only_rows_read_and_the_output_grows_by_their_answers(
    write_spec: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rendered_rows: list[str],
    source_name: str,
    output: str,
) -> None:
    """After a complete run, an input with rows added at its end (a CSV or JSONL appended to, a Parquet file
    rewritten with more rows): the rerun renders only the new rows, sends only them, and the output it extends
    is the output a full rewrite from the checkpoint gives; a third run reads nothing."""
    source = tmp_path / source_name
    write_tickets(source, range(12))
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(input=source_name, output=output, api={"base_url": sandbox.base_url}))
        await run_job(spec)
        if source.suffix == ".parquet":
            write_tickets(source, range(15))
        else:
            with source.open("a") as handle:
                handle.write(
                    "".join(
                        f"T-{i},subject {i},ticket text number {i}\n"
                        if source.suffix == ".csv"
                        else f'{{"ticket_id":"T-{i}","subject":"subject {i}","text":"ticket text number {i}"}}\n'
                        for i in range(12, 15)
                    )
                )
        rendered_rows.clear()
        outcome = await run_job(spec)
        assert set(rendered_rows) == {"T-12", "T-13", "T-14"}, "only the appended rows were read"
        assert sandbox.stats.requests == 15 and outcome.report.resumed == 12 and outcome.output_rows == 15
        extended = spec.output.read_bytes()
        with monkeypatch.context() as patch:
            no_rows_read(patch)
            third = await run_job(spec)
        assert third.report.resumed == 15 and sandbox.stats.requests == 15
    export_job(spec)  # the whole output, rebuilt from the checkpoint
    assert spec.output.read_bytes() == extended or pl.read_parquet(spec.output).equals(pl.read_parquet(extended))


@pytest.mark.parametrize("change", ["edited", "inserted", "removed"])
async def test_rows_appended_with_any_other_change_go_the_long_way(
    write_spec: Callable[..., Path], tmp_path: Path, change: str
) -> None:
    """Rows appended along with an edited row, a row inserted before the end, or a row removed: every row is
    read again, exactly what changed is sent, and the output holds every row."""
    source = tmp_path / "tickets.csv"
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
        ids = {"edited": range(14), "inserted": [*range(5), 99, *range(5, 14)], "removed": [*range(5), *range(6, 14)]}
        write_tickets(source, ids[change], edited=3 if change == "edited" else None)  # type: ignore[arg-type]
        outcome = await run_job(spec)
    sent = {"edited": 3, "inserted": 3, "removed": 2}[change]
    assert sandbox.stats.requests == 12 + sent and outcome.report.summary.done == sent
    assert pl.read_parquet(spec.output).height == len(ids[change])


@pytest.mark.parametrize("change", ["append", "touch", "prompt", "output deleted"])
async def test_any_change_goes_the_long_way(
    write_spec: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """An input appended to (or only touched), an edited prompt, or a deleted output: the rerun reads the rows
    again, sends exactly what changed, and writes the output."""
    source = tmp_path / "tickets.csv"
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
        if change == "append":
            with source.open("a") as handle:
                handle.write("T-new,s,a new ticket\n")
        elif change == "touch":
            source.touch()
        elif change == "prompt":
            spec = load_spec(write_spec(api={"base_url": sandbox.base_url}, prompt="Other {text}"))
        else:
            spec.output.unlink()
        outcome = await run_job(spec)
    sent = {"append": 1, "touch": 0, "prompt": 12, "output deleted": 0}[change]
    assert sandbox.stats.requests == 12 + sent and outcome.report.summary.done == sent
    assert pl.read_parquet(spec.output).height == (13 if change == "append" else 12)


async def test_a_run_that_left_failures_or_ran_a_limit_is_not_complete(
    write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed rows are asked again by the next run, and a --limit run says nothing of the rows it did not read."""
    async with Sandbox(SandboxConfig(faults={"hostile_error": 1.0})) as sandbox:  # a 400 for every request
        spec = load_spec(write_spec(retry={"max_attempts": 1}, api={"base_url": sandbox.base_url}))
        await run_job(spec, RunSettings(retry=RetryPolicy.immediate(max_attempts=1)))
        await run_job(spec, RunSettings(retry=RetryPolicy.immediate(max_attempts=1)))
    assert sandbox.stats.requests == 24, "the failed rows were asked again"
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(checkpoint="out/limited.sqlite", api={"base_url": sandbox.base_url}))
        await run_job(spec, RunSettings(limit=5))
        outcome = await run_job(spec)
    assert sandbox.stats.requests == 12 and outcome.report.resumed == 5


async def test_appended_lines_with_a_new_key_rewrite_the_output_with_the_new_column(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """A JSONL input appended with a line that has a key no earlier line had: the input's columns changed, so the
    output is rewritten whole (every row gets the new column) rather than extended."""
    source = tmp_path / "tickets.jsonl"
    write_tickets(source, range(12))
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(input=source.name, api={"base_url": sandbox.base_url}))
        await run_job(spec)
        with source.open("a") as handle:
            handle.write('{"ticket_id":"T-12","subject":"s","text":"new","priority":"high"}\n')
        outcome = await run_job(spec)
    output = pl.read_parquet(spec.output)
    assert sandbox.stats.requests == 13 and outcome.output_rows == 13
    assert output["priority"].to_list() == [None] * 12 + ["high"]


async def test_rows_appended_after_the_output_was_deleted_give_an_output_of_every_row(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Rows appended and the output deleted: only the new rows are sent, and the output written whole holds
    every row (the new rows' keys, kept from this run, cover only them: the old rows' are computed again)."""
    source = tmp_path / "tickets.csv"
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
        write_tickets(source, range(15))
        spec.output.unlink()
        outcome = await run_job(spec)
    assert sandbox.stats.requests == 15 and outcome.output_rows == 15
    assert pl.read_parquet(spec.output)["ticket_id"].to_list() == [f"T-{i}" for i in range(15)]


@pytest.mark.parametrize("record", ["{not json", '{"state": 1, "answered": [1, 2], "written": "x"}', "[]", "null"])
async def test_a_damaged_complete_run_record_means_the_long_way(write_spec: Callable[..., Path], record: str) -> None:
    """A checkpoint whose record of the last complete run is not what batchrunner writes (edited by hand, damaged):
    the rerun reads every row and sends nothing already answered, instead of failing."""
    from batchrunner.rerun import COMPLETE
    from batchrunner.store import Store

    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
        with Store.open(spec.checkpoint_path()) as store:
            store.set_meta(COMPLETE, record)
        outcome = await run_job(spec)
    assert sandbox.stats.requests == 12 and outcome.report.resumed == 12 and outcome.output_rows == 12


async def test_status_of_a_complete_job_reads_only_rows_appended_since(
    write_spec: Callable[..., Path], tmp_path: Path, rendered_rows: list[str]
) -> None:
    """`status` after a complete run renders no row (the checkpoint's record counts them), and after rows were
    appended renders only those, counting them pending."""
    from batchrunner.offline import job_status

    source = tmp_path / "tickets.csv"
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
    rendered_rows.clear()
    status = job_status(spec)
    assert status["models"] == {"openai/gpt-4o-mini": {"ok": 12, "failed": 0, "pending": 0}} and not rendered_rows
    write_tickets(source, range(15))
    status = job_status(spec)
    assert status["models"] == {"openai/gpt-4o-mini": {"ok": 12, "failed": 0, "pending": 3}}
    assert sorted(rendered_rows) == ["T-12", "T-13", "T-14"]


def killed_before_it_finished(checkpoint: Path, *, lost: list[str] = ()) -> None:  # type: ignore[assignment]
    """The checkpoint as a run killed after storing its answers (but not that it was complete) leaves it: without
    the record of a complete run, and without the answers to `lost` (never stored: on the wire at the kill)."""
    with contextlib.closing(sqlite3.connect(checkpoint)) as db:
        db.execute("DELETE FROM meta WHERE key = 'complete'")
        db.executemany("DELETE FROM results WHERE row_id = ?", [(row_id,) for row_id in lost])
        db.commit()


async def test_the_first_rerun_after_a_kill_renders_only_the_rows_left(
    write_spec: Callable[..., Path], rendered_rows: list[str]
) -> None:
    """A rerun of the job as a killed run left it (the same spec, server and input) takes that run's answers by
    position without rendering their rows: only the rows whose answers were lost are rendered and sent, and the
    output is the uninterrupted run's, two models a row."""
    async with Sandbox() as sandbox:
        spec = load_spec(
            write_spec(api={"base_url": sandbox.base_url}, models=["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"])
        )
        await run_job(spec)
        whole = pl.read_parquet(spec.output).drop("latency_s", "ttft_s")
        killed_before_it_finished(spec.checkpoint_path(), lost=["T-3", "T-7"])
        seen = rendered_rows
        seen.clear()  # from here on
        outcome = await run_job(spec)
    assert sorted(seen) == ["T-3", "T-7"] and sandbox.stats.requests == 24 + 4
    assert outcome.report.resumed == 20 and outcome.report.pending == 0
    again = pl.read_parquet(spec.output).drop("latency_s", "ttft_s")
    assert again.drop("response", "generation_id").equals(whole.drop("response", "generation_id"))


async def test_answers_of_a_run_of_the_job_in_another_state_are_not_taken_by_position(
    write_spec: Callable[..., Path], tmp_path: Path, rendered_rows: list[str]
) -> None:
    """After the input is edited (one row's text) the killed run's answers are no longer known by position: every
    row is rendered, the edited row is asked again, the others are found by their keys."""
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
        killed_before_it_finished(spec.checkpoint_path())
        write_tickets(tmp_path / "tickets.csv", range(12), edited=5)
        seen = rendered_rows
        seen.clear()  # from here on
        outcome = await run_job(spec)
    assert len(seen) == 12 and sandbox.stats.requests == 13 and outcome.report.resumed == 11


async def test_a_row_answered_under_another_id_at_its_position_is_rendered(
    write_spec: Callable[..., Path], rendered_rows: list[str]
) -> None:
    """An answer stored for another row id at a row's position (a checkpoint edited by hand, or a bug) does not
    count for the row there now: it is rendered and found or asked by its own key."""
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
        killed_before_it_finished(spec.checkpoint_path())
        with contextlib.closing(sqlite3.connect(spec.checkpoint_path())) as db:
            db.execute("UPDATE results SET row_id = 'T-99' WHERE row_id = 'T-4'")
            db.commit()
        seen = rendered_rows
        seen.clear()  # from here on
        await run_job(spec)
    assert seen == ["T-4"]  # (its request is the one answered: dedupe copies that answer, nothing is sent)
    assert pl.read_parquet(spec.output)["status"].to_list() == ["ok"] * 12


async def test_a_batch_mode_run_records_no_state(write_spec: Callable[..., Path]) -> None:
    """A batch-mode run may store answers whose keys an earlier run computed (a batch it collects), so the
    checkpoint records no state for it and a rerun takes none of its answers by position."""
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}, mode="batch"))
        await run_job(spec)
    with contextlib.closing(sqlite3.connect(spec.checkpoint_path())) as db:
        states = db.execute("SELECT state FROM runs").fetchall()
    assert states == [(None,)]


async def test_a_parquet_input_with_binary_ids_runs(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """A Parquet input whose id column is binary (UUIDs as 16 raw bytes, as Spark and pyarrow write them) runs as it
    did before runs recorded their state: the id as text is str() of its value, never polars' cast of the column
    (which fails on bytes that are not UTF-8); a rerun after a kill sends only what was lost."""
    ids = [bytes([0xFF, i]) * 8 for i in range(12)]
    pl.DataFrame({"uid": ids, "text": [f"ticket text number {i}" for i in range(12)]}).write_parquet(
        tmp_path / "tickets.parquet"
    )
    async with Sandbox() as sandbox:
        spec = load_spec(
            write_spec(
                api={"base_url": sandbox.base_url}, input="tickets.parquet", id_column="uid", prompt="Ticket: {text}"
            )
        )
        await run_job(spec)
        killed_before_it_finished(spec.checkpoint_path(), lost=[str(ids[3])])
        outcome = await run_job(spec)
    assert sandbox.stats.requests == 13 and outcome.report.resumed == 11
    assert pl.read_parquet(spec.output)["status"].to_list() == ["ok"] * 12


async def test_a_part_of_a_parquet_folder_rewritten_after_a_kill_is_asked_again(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """An input that is a folder of Parquet files (as Spark writes one): a part file rewritten in place leaves the
    folder's size, times and inode as they were, so the folder's stat is no identity of the rows in it. After a
    killed run, the edited row is asked again and the output holds the answer to its new text, not the old one."""
    folder = tmp_path / "tickets.parquet"
    folder.mkdir()
    write_tickets(folder / "part-0.parquet", range(12))
    async with Sandbox(SandboxConfig(record_bodies=True)) as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}, input="tickets.parquet"))
        await run_job(spec)
        killed_before_it_finished(spec.checkpoint_path())
        write_tickets(folder / "part-0.parquet", range(12), edited=5)
        await run_job(spec)
    asked = [body["messages"][-1]["content"] for body in sandbox.stats.bodies]
    assert len(asked) == 13 and asked[-1] == "Ticket T-5: ticket text number 5 (edited)"


@pytest.mark.slow  # `batchrunner run` in its own interpreter, killed, and run again: the long set
@pytest.mark.parametrize(
    ("changes", "repeat"),
    [({}, 400), ({"workers": 2}, 400), ({"prompt": "Ticket: {text}"}, 37)],
    ids=["live", "workers", "dedupe"],
)
def test_the_rerun_after_a_real_kill_9_asks_only_what_was_not_stored(
    write_spec: Callable[..., Path],
    tmp_path: Path,
    sandbox_in_thread: Callable[[SandboxConfig], Sandbox],
    changes: dict[str, Any],
    repeat: int,
) -> None:
    """`batchrunner run` killed with SIGKILL mid-run (two models a row; in worker processes; with rows asking the
    same thing, deduped): the rerun asks exactly the requests the checkpoint had no answer to, each once, and its
    output holds each row's own answers."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from batchrunner.sandbox.answers import text_answer

    models = ["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"]
    rows = 400
    texts = {f"T-{i}": f"ticket text number {i % repeat}" for i in range(rows)}
    pl.DataFrame({"ticket_id": list(texts), "subject": "s", "text": list(texts.values())}).write_csv(
        tmp_path / "tickets.csv"
    )
    template = changes.get("prompt", "Ticket {ticket_id}: {text}")
    prompt = {row_id: template.format(ticket_id=row_id, text=text) for row_id, text in texts.items()}
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=0.05, record_bodies=True))
    job = write_spec(api={"base_url": sandbox.base_url}, models=models, concurrency=8, **changes)
    env = {**os.environ, "OPENROUTER_API_KEY": "sk-or-v1-test"}
    run = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "run", str(job)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 60
    while len(sandbox.stats.bodies) < min(300, repeat) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.3)  # a commit or more of the answers
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    time.sleep(0.5)  # worker processes, orphaned, end with their parent
    spec = load_spec(job)
    with contextlib.closing(sqlite3.connect(spec.checkpoint_path())) as db:
        stored = set(db.execute("SELECT row_id, requested_model FROM results WHERE status = 'ok'").fetchall())
        states = [state for (state,) in db.execute("SELECT state FROM runs")]
    assert 0 < len(stored) < rows * 2 and len(states) == 1 and states[0] is not None
    answered = {(prompt[row_id], model) for row_id, model in stored}
    before = len(sandbox.stats.bodies)
    done = subprocess.run(
        [sys.executable, "-m", "batchrunner", "run", str(job)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    asked = [(body["messages"][-1]["content"], body["model"]) for body in sandbox.stats.bodies[before:]]
    assert len(asked) == len(set(asked))  # nothing asked twice in the rerun
    assert set(asked) == {(text, model) for text in set(prompt.values()) for model in models} - answered
    with contextlib.closing(sqlite3.connect(spec.checkpoint_path())) as db:
        assert [state for (state,) in db.execute("SELECT state FROM runs")] == states * 2  # taken by position
    output = pl.read_parquet(spec.output)
    assert output.height == rows * 2 and output["status"].to_list() == ["ok"] * rows * 2
    for row in output.iter_rows(named=True):
        assert row["response"] == text_answer(row["model"], prompt[row["ticket_id"]])


async def test_status_after_a_kill_counts_as_reading_every_row_does_without_rendering_them(
    write_spec: Callable[..., Path], rendered_rows: list[str]
) -> None:
    """`status` of a job a killed run left takes that run's answers by position, as the rerun would: the counts
    are those of reading and rendering every row (the answers lost are pending), and only the rows lost are
    rendered."""
    from batchrunner.offline import job_status

    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec)
    killed_before_it_finished(spec.checkpoint_path(), lost=["T-2"])
    seen = rendered_rows
    seen.clear()  # from here on
    fast = job_status(spec)
    assert seen == ["T-2"]
    with contextlib.closing(sqlite3.connect(spec.checkpoint_path())) as db:
        db.execute("UPDATE runs SET state = NULL")
        db.commit()
    slow = job_status(spec)
    assert len(seen) == 1 + 12 and fast == slow
    assert fast["models"]["openai/gpt-4o-mini"]["ok"] == 11 and fast["models"]["openai/gpt-4o-mini"]["pending"] == 1


@pytest.mark.parametrize(
    ("part", "answered"),
    [
        (RunSettings(limit=5), [f"T-{i}" for i in range(5)]),
        (RunSettings(ids=frozenset({"T-3", "T-8"})), ["T-3", "T-8"]),
        (RunSettings(where="ticket_id IN ('T-1', 'T-10')"), ["T-1", "T-10"]),
    ],
    ids=["limit", "ids", "where"],
)
async def test_a_run_of_part_of_the_job_is_taken_by_position_by_the_whole_run_after_it(
    write_spec: Callable[..., Path], rendered_rows: list[str], part: RunSettings, answered: list[str]
) -> None:
    """A run of a part of the job (--limit, --ids, --where) records the job's state too: its rows keep their places
    in the input, so the whole run after it renders and sends only the other rows."""
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec, part)
        assert sandbox.stats.requests == len(answered)
        rendered_rows.clear()
        outcome = await run_job(spec)
    assert sorted(rendered_rows) == sorted(f"T-{i}" for i in range(12) if f"T-{i}" not in answered)
    assert sandbox.stats.requests == 12 and outcome.report.resumed == len(answered)
    assert pl.read_parquet(spec.output)["status"].to_list() == ["ok"] * 12


async def test_a_first_run_asks_the_checkpoint_for_no_answers_by_position(
    write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no earlier run in the job's state nothing can be taken by position, so a first run makes no such
    query (nor loads the columnar reader for it, before its first request); the next run does."""
    from batchrunner.store import Store

    asked: list[int] = []
    settled = Store.settled

    def counted(self: Store, state: str, first_row: int, last_row: int) -> Any:
        asked.append(first_row)
        return settled(self, state, first_row, last_row)

    monkeypatch.setattr(Store, "settled", counted)
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        await run_job(spec, RunSettings(limit=5))
        assert asked == []
        await run_job(spec)
    assert asked and sandbox.stats.requests == 12
