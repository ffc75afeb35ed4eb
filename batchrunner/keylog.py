"""The checkpoint keys a run computed as it read its rows, kept for writing its output.

pending() renders and fingerprints every row (and hashes every file a row names) to find what
is left; the output then joins each input row with its stored answers by those same keys.
Computing them a second time for the output doubled the cost of a run's end, and read every
media file again. A KeyLog takes each batch's keys as pending() makes them and keeps them in
small Parquet parts in a folder beside the output; the output reads them back in input order.

A pair's key travels with it (RowRequest.key, then its RowResult, then its checkpoint record), but
the pairs earlier runs answered are skipped, never become results, and reach the output only
through this log: that is why it exists beside the carried keys.

The output uses the log only when it covers every row the output is made of (the run read its
input to the end) and the input is still the file it read (size, modification time, inode; an object's ETag and size);
otherwise the output renders the rows itself, as it always could.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl

from batchrunner.dataset import ROW_INDEX
from batchrunner.files import identity
from batchrunner.records import KEY_COLUMNS
from batchrunner.request import RowRequest
from batchrunner.urls import Location, ObjectURL

log = logging.getLogger("batchrunner")

MODEL_POSITION = "__batchrunner_model"
SAMPLE = "sample"  # an output column only when the spec asks each pair several times
KEYS_SCHEMA: dict[str, pl.DataType] = {
    ROW_INDEX: pl.UInt32(),
    MODEL_POSITION: pl.Int32(),
    SAMPLE: pl.Int64(),
    **dict.fromkeys(KEY_COLUMNS, pl.String()),
}


def folder_prefix(beside: Path | ObjectURL) -> str:
    """A key log's folder is named this and eight random characters (output.remove_leftovers finds a killed run's)."""
    return f".{beside.name}.keys."


def keys_frame(requests: Iterable[RowRequest]) -> pl.DataFrame:
    """Each pair's checkpoint key with its row position, model position and sample, as a frame to join on."""
    columns: dict[str, list[Any]] = {name: [] for name in KEYS_SCHEMA}
    for request in requests:
        columns[ROW_INDEX].append(request.row.index)
        columns[MODEL_POSITION].append(request.model_position)
        columns[SAMPLE].append(request.sample)
        columns["row_id"].append(request.row.id)
        columns["requested_model"].append(request.requested_model)
        columns["fingerprint"].append(request.fingerprint)
    return pl.DataFrame(columns, schema=KEYS_SCHEMA)


class KeyLog:
    """The keys of input rows `first_row` to `rows - 1`, as pending() makes them. Close it to remove its parts."""

    def __init__(self, beside: Location, source: Location, *, first_row: int, rows: int) -> None:
        if isinstance(beside, ObjectURL):  # kept locally, beside the checkpoint
            beside = beside.local()
        beside.parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=folder_prefix(beside), dir=beside.parent))
        self.source = source
        self.first_row = first_row
        self._read_as = identity(source)
        self._wanted = rows - first_row
        self._covered = 0
        self._parts: list[Path] = []
        self._broken = False

    def record(self, keys: pl.DataFrame, rows: int) -> None:
        """One batch of `rows` input rows, whose pairs' keys (answered or not; KEYS_SCHEMA) are `keys`, in input
        order.

        A part that cannot be written (a full disk) ends the log, never the run: the output then computes
        the keys itself."""
        if self._broken:
            return
        part = self.folder / f"{len(self._parts):08d}.parquet"
        try:
            keys.write_parquet(part)
        except (OSError, pl.exceptions.PolarsError) as exc:
            log.debug("the key log stops at row %d (%s); the output will compute keys itself", self._covered, exc)
            self._broken = True
            return
        self._parts.append(part)
        self._covered += rows

    def covers(self, first_row: int) -> bool:
        """Every row from input row `first_row` on was recorded (the log starts there), and the input is still
        the file they were read from."""
        return (
            not self._broken
            and first_row == self.first_row
            and self._covered == self._wanted
            and identity(self.source) == self._read_as
        )

    def cursor(self) -> KeyCursor:
        return KeyCursor(self._parts)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class KeyCursor:
    """The log's keys in input order, taken a run of rows at a time."""

    def __init__(self, parts: list[Path]) -> None:
        self._parts = iter(parts)
        self._buffer = pl.DataFrame(schema=KEYS_SCHEMA)

    def upto(self, last_row: int) -> pl.DataFrame:
        """The keys of the rows up to input row `last_row` not yet taken."""
        while self._buffer.is_empty() or self._buffer[ROW_INDEX][-1] <= last_row:
            part = next(self._parts, None)
            if part is None:
                break
            self._buffer = pl.concat([self._buffer, pl.read_parquet(part)])
        position = self._buffer[ROW_INDEX].search_sorted(last_row, side="right")
        taken, self._buffer = self._buffer.head(position), self._buffer.slice(position)
        return taken
