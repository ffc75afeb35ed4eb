"""keylog.py: the keys pending() computed, read back by the output in input order, only while they hold."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchrunner.dataset import ROW_INDEX, Row
from batchrunner.keylog import KeyLog, keys_frame
from batchrunner.request import RowRequest
from batchrunner.runner import run_job
from batchrunner.sandbox import Sandbox
from batchrunner.spec import load_spec


def requests_for(indexes: range, models: int = 2) -> list[RowRequest]:
    return [
        RowRequest(Row(i, f"r{i}", {}), position, f"m/{position}", "prompt", f"fp{i}-{position}")
        for i in indexes
        for position in range(models)
    ]


def test_the_cursor_gives_each_run_of_rows_its_keys_whatever_the_part_boundaries(tmp_path: Path) -> None:
    """Keys recorded in parts of 7 rows are taken back in runs of 5 rows: every pair once, in order, each run
    holding exactly its rows' pairs (every model of a row together)."""
    source = tmp_path / "in.csv"
    source.write_text("x\n")
    log = KeyLog(tmp_path / "out.parquet", source, first_row=0, rows=21)
    for first in range(0, 21, 7):
        log.record(keys_frame(requests_for(range(first, first + 7))), 7)
    assert log.covers(0) and not log.covers(3)
    cursor = log.cursor()
    taken = [cursor.upto(last) for last in range(4, 21, 5)] + [cursor.upto(20)]
    assert [frame[ROW_INDEX].to_list() for frame in taken[:2]] == [
        [0, 0, 1, 1, 2, 2, 3, 3, 4, 4],
        [5, 5, 6, 6, 7, 7, 8, 8, 9, 9],
    ]
    assert pl.concat(taken)["fingerprint"].to_list() == [f"fp{i}-{p}" for i in range(21) for p in range(2)]
    log.close()
    assert not log.folder.exists()


def test_a_log_that_misses_rows_or_whose_input_changed_is_not_used(tmp_path: Path) -> None:
    """A log of fewer rows than it is for (the run stopped reading), or of an input modified since, covers nothing."""
    source = tmp_path / "in.csv"
    source.write_text("x\n")
    short = KeyLog(tmp_path / "out.parquet", source, first_row=0, rows=10)
    short.record(keys_frame(requests_for(range(6))), 6)
    assert not short.covers(0)
    whole = KeyLog(tmp_path / "out.parquet", source, first_row=0, rows=6)
    whole.record(keys_frame(requests_for(range(6))), 6)
    assert whole.covers(0)
    source.write_text("x\ny\n")
    assert not whole.covers(0)


async def test_a_run_renders_each_row_once_and_its_output_is_the_one_export_writes(
    write_spec: Callable[..., Path], rendered_rows: list[str]
) -> None:
    """A run renders and fingerprints each row once (to find what is left), and its output, joined by the
    logged keys, is what `export` writes from the checkpoint by rendering every row again."""
    from batchrunner.offline import export_job

    async with Sandbox() as sandbox:
        spec = load_spec(
            write_spec(models=["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"], api={"base_url": sandbox.base_url})
        )
        outcome = await run_job(spec)
    assert sorted(rendered_rows) == sorted(f"T-{i}" for i in range(12)), "each row rendered once"
    assert outcome.output_rows == 24
    written = pl.read_parquet(spec.output)
    export_job(spec)
    assert written.equals(pl.read_parquet(spec.output))
    assert not [p for p in spec.output.parent.iterdir() if ".keys." in p.name], "the log's parts are removed"


async def test_a_key_log_the_disk_cannot_take_never_stops_the_run(
    write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing the log's parts fails (a full disk): the run goes on, and its output, its keys computed again,
    holds every row."""
    write = pl.DataFrame.write_parquet

    def full_disk(self: pl.DataFrame, path: Any, *args: Any, **kwargs: Any) -> None:
        if ".keys." in str(path):
            raise OSError(28, "No space left on device")
        write(self, path, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", full_disk)
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        outcome = await run_job(spec)
    assert outcome.report.stop is None and outcome.output_rows == 12 and sandbox.stats.requests == 12
