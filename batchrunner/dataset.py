"""Reading the input dataset (CSV, Parquet, JSONL) in batches, through polars' lazy scans.

The whole input is never held as Python objects: rows are streamed in batches of dicts,
each tagged with its position (`ROW_INDEX`) and its id. Checks that can refuse a job
(a missing column, a duplicate id) run as lazy queries before anything is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import polars as pl

from batchrunner.errors import Problem, SpecError, first_line

ROW_INDEX = "__batchrunner_row"  # the row's 0-based position in the input


@dataclass(frozen=True)
class Row:
    index: int  # position in the input
    id: str  # the id_column's value as text, or the position
    values: dict[str, Any]


@dataclass
class Dataset:
    """An input file, opened lazily."""

    path: Path
    id_column: str | None
    frame: pl.LazyFrame  # the input with ROW_INDEX prepended
    columns: list[str]  # the input's own columns, in order

    @cached_property
    def rows(self) -> int:
        """How many rows the input has (a scan of the file, done once)."""
        return int(self.frame.select(pl.len()).collect().item())

    def chunks(self, *, limit: int | None = None, batch_size: int = 2048) -> Iterator[tuple[pl.DataFrame, list[Row]]]:
        """The input in order, `batch_size` rows at a time: each chunk as a frame and as Rows."""
        frame = self.frame if limit is None else self.frame.head(limit)
        for chunk in frame.collect_batches(chunk_size=batch_size):
            rows = []
            for values in chunk.iter_rows(named=True):
                index = values.pop(ROW_INDEX)
                row_id = index if self.id_column is None else values[self.id_column]
                rows.append(Row(index, str(row_id), values))
            yield chunk, rows

    def batches(self, *, limit: int | None = None, batch_size: int = 2048) -> Iterator[list[Row]]:
        """The rows in input order, `batch_size` at a time."""
        for _, rows in self.chunks(limit=limit, batch_size=batch_size):
            yield rows


def scan(path: Path) -> pl.LazyFrame:
    """A lazy scan of a CSV, Parquet or JSONL file, chosen by its extension."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pl.scan_csv(path, infer_schema_length=10_000)
    if suffix == ".parquet":
        return pl.scan_parquet(path)
    if suffix in (".jsonl", ".ndjson"):
        return pl.scan_ndjson(path, infer_schema_length=10_000)
    raise SpecError(Problem("input", f"unsupported input format {suffix!r}; use .csv, .parquet, .jsonl or .ndjson"))


def open_dataset(path: Path, *, id_column: str | None) -> Dataset:
    """Open `path` and check what the job needs of it; raise SpecError otherwise."""
    if not path.exists():
        raise SpecError(Problem("input", f"{path}: no such file; check `input` in the spec or pass --input"))
    try:
        frame = scan(path)
        columns = list(frame.collect_schema().names())
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise SpecError(Problem("input", f"{path}: cannot read it as {path.suffix} ({first_line(exc)})")) from None

    problems = []
    if ROW_INDEX in columns:
        problems.append(Problem("input", f"the column name {ROW_INDEX!r} is reserved; rename it"))
    if id_column is not None and id_column not in columns:
        problems.append(
            Problem("id_column", f"{id_column!r} is not an input column; the input has: {', '.join(columns)}")
        )
    if problems:
        raise SpecError(problems)

    if id_column is not None:
        _check_ids(frame, id_column)
    return Dataset(path, id_column, frame.with_row_index(ROW_INDEX), columns)


def _check_ids(frame: pl.LazyFrame, id_column: str) -> None:
    column = pl.col(id_column)
    nulls, duplicated = (
        frame.select(
            column.null_count().alias("nulls"),
            column.filter(column.is_duplicated()).unique(maintain_order=True).head(3).implode().alias("duplicated"),
        )
        .collect()
        .row(0)
    )
    if nulls:
        raise SpecError(Problem("id_column", f"{id_column!r} is empty in {nulls} row(s); every row needs an id"))
    if duplicated:
        shown = ", ".join(repr(v) for v in duplicated)
        raise SpecError(Problem("id_column", f"{id_column!r} has duplicate values ({shown}); ids must be unique"))
