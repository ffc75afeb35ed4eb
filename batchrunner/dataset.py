"""Reading the input dataset (CSV, Parquet, JSONL) in batches, through polars' lazy scans.

The whole input is never held as Python objects: rows are streamed in batches of dicts,
each tagged with its position (`ROW_INDEX`) and its id. Checks that can refuse a job
(a missing column, a duplicate id, a row that cannot be read) run as one lazy pass over
the whole file before anything is sent.

CSV and JSONL cells are read as text, as written: `02134` stays `02134`, a `1` stays `1`
when a `2.5` is appended below it, and nothing decided by inferring types from the first
rows can fail at row 12,001. What the user wrote is what the model sees and what the
checkpoint key is made of. Parquet files carry their own types and are read as they are.

The input may be an object (or a glob of objects) in S3: polars' own scans read it, streamed as a local file
is, with the spec's storage options; objectstore.py asks first whether it is there and readable, so a missing
bucket, object or credential is a SpecError naming the fix, not a traceback half-way through a scan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl
from polars.io.plugins import register_io_source

from batchrunner import objectstore
from batchrunner.errors import Problem, SpecError, first_line
from batchrunner.urls import Location, ObjectURL

ROW_INDEX = "__batchrunner_row"  # the row's 0-based position in the input


@dataclass(frozen=True)
class Row:
    index: int  # position in the input
    id: str  # the id_column's value as text, or the position
    values: dict[str, Any]


@dataclass
class Dataset:
    """An input file, opened lazily."""

    path: Location
    id_column: str | None
    frame: pl.LazyFrame  # the input with ROW_INDEX prepended (only the selected rows after `only`)
    columns: list[str]  # the input's own columns, in order

    rows: int  # how many rows the input has (counted by the checking pass)
    digest: str = ""  # of every row's content with its position (see digests), from the checking pass
    # a Parquet input's longest row, in bytes (the checking pass): how long its windows are (_window_rows)
    row_bytes: int | None = None
    whole: pl.LazyFrame | None = None  # after `only`: the whole input, read in windows with `selection` applied
    checked_rows: int | None = None  # the whole input's rows as the checking pass counted them (None: `rows`)
    selection: pl.Expr | None = None

    def chunks(
        self, *, limit: int | None = None, batch_size: int = 2048, start: int = 0
    ) -> Iterator[tuple[pl.DataFrame, list[Row]]]:
        """The input in order from row `start` (of the selected rows, after `only`) to row `limit`,
        `batch_size` rows at a time: each chunk as a frame and as Rows.

        Memory is a window of rows, whatever the input's size: see `_windows`."""
        for chunk in self.frames(limit=limit, batch_size=batch_size, start=start):
            yield chunk, self.rows_of(chunk)

    def rows_of(self, chunk: pl.DataFrame) -> list[Row]:
        """A chunk of `frames` as Rows."""
        rows = []
        for row_id, values in zip(self.ids_of(chunk).to_list(), chunk.iter_rows(named=True), strict=True):
            rows.append(Row(values.pop(ROW_INDEX), row_id, values))
        return rows

    def ids_of(self, chunk: pl.DataFrame) -> pl.Series:
        """The ids of a chunk's rows, as text: the id column's value as str() writes it (a text column as it is),
        or the row's position. Not polars' cast: it writes some types otherwise (a datetime, a boolean) and fails
        on others (bytes that are not UTF-8, as UUIDs are stored)."""
        column = chunk[ROW_INDEX] if self.id_column is None else chunk[self.id_column]
        if column.dtype == pl.String and not column.has_nulls():
            return column
        return pl.Series([str(value) for value in column.to_list()], dtype=pl.String)

    @property
    def checked_input_rows(self) -> int:
        """The whole input's rows as the checking pass counted them (`rows`, until `only` selects some)."""
        return self.rows if self.checked_rows is None else self.checked_rows

    def frames(self, *, limit: int | None = None, batch_size: int = 2048, start: int = 0) -> Iterator[pl.DataFrame]:
        """The chunks of `chunks` as frames alone (with ROW_INDEX): for a reader that needs no Row objects (the
        output, whose keys come from the run's KeyLog), which cost more than the reading itself."""
        whole = self.frame if self.whole is None else self.whole
        skip = start if self.selection is None else 0  # a selection's rows are counted after it is applied
        windows = _windows(whole, self.path, skip=skip, window_rows=_window_rows(batch_size, self.row_bytes))
        windows = _as_checked(windows, [ROW_INDEX, *self.columns], self.checked_input_rows, skip=skip)
        if self.selection is not None:
            selection = self.selection
            windows = (window.filter(selection) for window in windows)
        yield from _rebatched(_between(windows, skip, start, limit), batch_size)

    def only(self, where: pl.Expr, rows: int) -> Dataset:
        """The rows `where` selects (run --where, --ids), each keeping its place in the input (ROW_INDEX): what a
        sliced run reads, while its output is still made of every row."""
        whole = self.frame if self.whole is None else self.whole
        selection = where if self.selection is None else self.selection & where
        return dataclasses.replace(
            self,
            frame=whole.filter(selection),
            rows=rows,
            whole=whole,
            selection=selection,
            checked_rows=self.checked_input_rows,
        )

    def batches(self, *, limit: int | None = None, batch_size: int = 2048, start: int = 0) -> Iterator[list[Row]]:
        """The rows in input order from row `start`, `batch_size` at a time."""
        for _, rows in self.chunks(limit=limit, batch_size=batch_size, start=start):
            yield rows

    def digests(self, *counts: int) -> list[str]:
        """For each n, a digest of the first n rows' content with their positions, in one pass: equal digests
        mean the same rows in the same places, whatever the file's format or bytes. 128 bits of polars' row
        hash (four seeds, 32 bits each, summed), so digests compare only within one polars version."""
        sums = [sum_expression.filter(pl.col(ROW_INDEX) < count) for count in counts for sum_expression in _HASHES]
        try:
            found = (
                self.frame.select(expression.sum().alias(f"d{number}") for number, expression in enumerate(sums))
                .collect()
                .row(0)
            )
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise _unreadable(self.path, exc) from None
        return [_digest_text(found[4 * n : 4 * n + 4]) for n in range(len(counts))]


_HASHES = [pl.struct(pl.all()).hash(seed=seed) % (1 << 32) for seed in range(4)]  # a row's digest, in four parts


def _digest_text(sums: tuple[Any, ...]) -> str:
    return "-".join(f"{value:x}" for value in sums)


WINDOW_ROWS = 16_384  # rows of a Parquet input decoded at a time at least (16 MB at 1 KB a row)
WINDOW_BYTES = 16 << 20  # ... and as many more as fit in this at the input's longest row (_window_rows)
MAX_WINDOW_ROWS = 1 << 20


def _windows(frame: pl.LazyFrame, path: Location, *, skip: int, window_rows: int) -> Iterator[pl.DataFrame]:
    """The rows of `frame` from row `skip`, a bounded number at a time.

    A Parquet input is read one slice at a time (`slice` reaches the scan, which decodes only the row groups it
    covers): polars' own batched reading (`collect_batches`) decodes ahead of a slow reader, and a run reads
    slowly, so it held the whole input (measured: 274 MB at 300,000 rows of 1 KB, against 89 MB read by slices;
    pola-rs/polars#28569). A CSV file is read in blocks of whole records (_csv_frames), parsed by polars one
    block at a time. JSONL inputs have no row groups to seek to and polars' reader of them holds no more than
    its batches: they are read by `collect_batches`."""
    suffix = path.suffix.lower()
    if suffix == ".csv" and _in_blocks(path):
        yield from _skipped(_indexed(_csv_frames(path)), skip)
        return
    if suffix != ".parquet":
        source = frame.slice(skip) if skip else frame
        yield from source.collect_batches(chunk_size=window_rows)
        return
    offset = skip
    while True:
        window = frame.slice(offset, window_rows).collect()
        if window.height:
            yield window
        if window.height < window_rows:
            return
        offset += window_rows


def _as_checked(
    windows: Iterator[pl.DataFrame], columns: list[str], rows: int, *, skip: int = 0
) -> Iterator[pl.DataFrame]:
    """`windows` as the checking pass saw the input: its columns and its `rows` rows. The file changed under the
    run if a window has other columns (a CSV is read again with its own header) or the rows end early (it was
    emptied or cut short): refused, a polars error as a scan's would be. Rows past `rows` (appended since) were
    not checked (a duplicate or empty id would go out): they are left for the next run, which checks them.
    `skip`: the rows before the first window, not read."""
    seen = skip
    for window in windows:
        if window.columns != columns:
            raise pl.exceptions.ColumnNotFoundError(
                f"the input's columns changed since it was checked (now: {', '.join(window.columns[1:])})"
            )
        if window.height and window[ROW_INDEX][-1] >= rows:  # positions are the input's own, from 0
            window = window.filter(pl.col(ROW_INDEX) < rows)
            if window.height:
                yield window
            return
        if window.height:
            seen = window[ROW_INDEX][-1] + 1
        yield window
    if seen < rows:
        raise pl.exceptions.NoDataError(
            f"the input has fewer rows than when it was checked ({rows:,}; it ends after {seen:,}): it changed "
            "under the run"
        )


def _window_rows(batch_size: int, row_bytes: int | None) -> int:
    """How many rows of a Parquet input are decoded at a time: at least WINDOW_ROWS (and a batch), and as many
    more as WINDOW_BYTES holds of the input's longest row. A slice decodes every row group it touches whole, so
    short rows in 16,384-row windows decoded each of polars' default 262,144-row groups sixteen times (1M rows:
    4 s of an 11 s rerun). The longest row, not the first window's: rows short at first and long later made a
    guess from the first window hold 58 MB where 16 MB was meant (found by a hostile review)."""
    rows = max(batch_size, WINDOW_ROWS)
    if row_bytes is None:
        return rows
    return max(rows, min(MAX_WINDOW_ROWS, WINDOW_BYTES // max(row_bytes, 1)))


CSV_BLOCK_BYTES = 8 << 20  # a CSV input is parsed this many bytes of whole records at a time


def _in_blocks(path: Location) -> bool:
    """Whether a CSV input is read by batchrunner's block reader (one local file, or one object in S3, GCS or
    Azure) rather than by polars' scan, which holds the whole file in memory as it reads (measured: 338 MB of
    anonymous memory for 300,000 rows of 1 KB, against 131 MB in blocks). A glob of files (whose order is
    polars') and hf:// (no stream to read) stay polars'."""
    if isinstance(path, ObjectURL):
        return not path.has_glob and objectstore.asked(path)
    return not any(char in str(path) for char in "*?[")


def polars_source(frames: Callable[[], Iterator[pl.DataFrame]], schema: pl.Schema) -> pl.LazyFrame:
    """A LazyFrame that polars reads from `frames()` as they come (register_io_source), with the projection, the
    filter and the row cap polars pushes to a source applied to each: what polars' own scans would read, one
    bounded frame at a time (its scans decode ahead of their reader)."""

    def read(
        with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, _batch: int | None
    ) -> Iterator[pl.DataFrame]:
        left = n_rows
        for frame in frames():
            if with_columns is not None:
                frame = frame.select(with_columns)
            if predicate is not None:
                frame = frame.filter(predicate)
            if left is not None:
                frame = frame.head(left)
                left -= frame.height
            yield frame
            if left is not None and left <= 0:
                return

    return register_io_source(read, schema=schema, is_pure=True)


def _csv_frames(path: Location) -> Iterator[pl.DataFrame]:
    """A CSV input's rows, CSV_BLOCK_BYTES of whole records at a time, each block parsed by polars with the
    header before it (every cell as text, as scan() reads a CSV)."""
    for header, block in _csv_blocks(path):
        yield pl.read_csv(io.BytesIO(header + block), infer_schema=False)


CSV_RECORD_BYTES = 64 << 20  # a CSV record longer than this is refused: a quote left open, not a prompt


def _csv_blocks(path: Location, *, header_only: bool = False) -> Iterator[tuple[bytes, bytes]]:
    """The header record and blocks of whole records after it. A record ends at a newline outside quotes: the
    quotes before it are even in number (RFC 4180 doubles a quote inside a quoted field), so a newline inside a
    quoted field is never a cut. A record longer than a block waits for the next read, which alone is searched
    for its end (the quotes before it counted as they came): a quote left open near the start of a large file
    would otherwise search the whole rest of it again at every read (measured: 10 s and 1.4 GB for 92 MB).
    A record longer than CSV_RECORD_BYTES is refused, naming its line, rather than held whole: polars' scan
    refused such a file too, without holding it."""
    with contextlib.closing(objectstore.body(path)) if isinstance(path, ObjectURL) else path.open("rb") as handle:
        header: bytes | None = None
        carry, carried_quotes, line = b"", 0, 1  # line: the number of the line `carry` starts on
        while True:
            read = handle.read(CSV_BLOCK_BYTES)
            data = carry + read
            end = _records_end(data, len(carry), carried_quotes) if read else len(data)
            if end <= 0:
                if not read:
                    return
                if len(data) > CSV_RECORD_BYTES:
                    raise SpecError(
                        Problem(
                            "input",
                            f"{path}: the record starting on line {line} runs on for more than "
                            f"{CSV_RECORD_BYTES >> 20} MB without ending: a quote left open? A quoted field ends "
                            'at its closing quote, and a quote inside one is written twice ("")',
                        )
                    )
                carry, carried_quotes = data, carried_quotes + read.count(b'"')
                continue
            block, carry = data[:end], data[end:]
            carried_quotes = carry.count(b'"')
            line += block.count(b"\n")
            if header is None:
                block = block.removeprefix(BOM)
                if read and _blank_lines_end(block) == len(block):
                    carry, carried_quotes, line = data, carried_quotes, 1
                    continue  # only the blank lines polars skips before a header: the header is yet to come
                first = _first_record_end(block, _blank_lines_end(block))
                header, block = block[:first], block[first:]
                if header_only:
                    yield header, b""
                    return
            if block:
                yield header, block
            if not read:
                return


def _csv_header(path: Location) -> bytes:
    """A CSV input's header record, read alone, without the blank lines before it (polars skips them before a
    header, but reads them as rows when told the file has none)."""
    first = next(_csv_blocks(path, header_only=True), (b"", b""))[0]
    return first[_blank_lines_end(first) :]


def _records_end(data: bytes, start: int = 0, quotes: int = 0) -> int:
    """Where the last whole record of `data` ends (after its newline): 0 when no newline of `data` from `start`
    is outside quotes. `data` starts at a record's start, and holds `quotes` quotes before `start`."""
    newline = data.rfind(b"\n", start)
    quotes += data.count(b'"', start, newline) if newline >= 0 else 0
    while newline >= start:
        if quotes % 2 == 0:
            return newline + 1
        before = data.rfind(b"\n", start, newline)
        quotes -= data.count(b'"', max(before + 1, start), newline)
        newline = before
    return 0


BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, which polars drops from the start of a CSV


def _blank_lines_end(data: bytes) -> int:
    """Where the empty lines (`\\n` or `\\r\\n`, nothing else) at the start of `data` end: polars skips them
    before a CSV's header, so the header is the first record after them (a cut after them alone would make a
    blank line the header of every block)."""
    at = 0
    while True:
        if data.startswith(b"\n", at):
            at += 1
        elif data.startswith(b"\r\n", at):
            at += 2
        else:
            return at


def _first_record_end(data: bytes, at: int = 0) -> int:
    """Where the first record of `data` from `at` (the header, after the blank lines before it) ends: after its
    first newline outside quotes."""
    quotes = 0
    while (newline := data.find(b"\n", at)) >= 0:
        quotes += data.count(b'"', at, newline)
        at = newline + 1
        if quotes % 2 == 0:
            return at
    return len(data)


def _indexed(frames: Iterator[pl.DataFrame]) -> Iterator[pl.DataFrame]:
    """Each frame with ROW_INDEX, counted across frames (as with_row_index numbers a whole input)."""
    offset = 0
    for frame in frames:
        yield frame.with_row_index(ROW_INDEX, offset=offset)
        offset += frame.height


def _skipped(frames: Iterator[pl.DataFrame], rows: int) -> Iterator[pl.DataFrame]:
    """`frames` without their first `rows` rows."""
    for frame in frames:
        if rows >= frame.height:
            rows -= frame.height
            continue
        yield frame.slice(rows) if rows else frame
        rows = 0


def _between(windows: Iterator[pl.DataFrame], place: int, start: int, limit: int | None) -> Iterator[pl.DataFrame]:
    """The rows of `windows` at places `start` to `limit`, the first window's first row being at `place`."""
    for window in windows:
        low = max(start - place, 0)
        high = window.height if limit is None else min(window.height, limit - place)
        place += window.height
        if high > low:
            yield window.slice(low, high - low)
        if limit is not None and place >= limit:
            return


def _rebatched(frames: Iterator[pl.DataFrame], rows: int) -> Iterator[pl.DataFrame]:
    """`frames` cut and joined into frames of `rows` rows each (the last may have fewer)."""
    held: list[pl.DataFrame] = []
    count = 0
    for frame in frames:
        held.append(frame)
        count += frame.height
        while count >= rows:
            joined = pl.concat(held) if len(held) > 1 else held[0]
            yield joined.head(rows)
            rest = joined.slice(rows)
            held, count = ([rest] if rest.height else []), rest.height
    if count:
        yield pl.concat(held) if len(held) > 1 else held[0]


def source(path: Location) -> tuple[str | Path, dict[str, str] | None]:
    """What polars' scans take for `path`: the file, or the URL with its storage options."""
    if isinstance(path, ObjectURL):
        return path.url, objectstore.polars_options(path)
    return path, None


def scan(path: Location, *, header: bytes | None = None) -> pl.LazyFrame:
    """A lazy scan of a CSV, Parquet or JSONL file (or object), chosen by its extension; CSV and JSONL cells as
    text. `header`: a CSV's header record, when the caller has read it already (_csv_header)."""
    suffix = path.suffix.lower()
    where, options = source(path)
    if suffix == ".csv":
        if not _in_blocks(path):
            return pl.scan_csv(where, infer_schema=False, storage_options=options)
        # The columns from the header record alone, as polars reads a header (its error for a file with none):
        # a scan's schema would read the whole file for it, and download a whole object.
        first = _csv_header(path) if header is None else header
        schema = pl.read_csv(io.BytesIO(first), infer_schema=False, n_rows=0).schema
        return polars_source(functools.partial(_csv_frames, path), schema)
    if suffix == ".parquet":
        return pl.scan_parquet(where, storage_options=options)
    if suffix in (".jsonl", ".ndjson"):
        # Every key of every line, then every value as its JSON text (nested values too).
        names = pl.scan_ndjson(where, infer_schema_length=None, storage_options=options).collect_schema().names()
        return pl.scan_ndjson(where, schema=dict.fromkeys(names, pl.String()), storage_options=options)
    raise SpecError(Problem("input", f"unsupported input format {suffix!r}; use .csv, .parquet, .jsonl or .ndjson"))


def _unreadable(path: Location, exc: BaseException) -> SpecError:
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    if jsonl and isinstance(path, Path) and (bad := _first_bad_line(path)) is not None:  # polars names no line
        number, what = bad
        return SpecError(Problem("input", f"{path}:{number}: {what}"))
    detail = first_line(exc)
    if "utf-8" in detail.lower() or "utf8" in detail.lower():
        fix = "it is not UTF-8 text; re-save it as UTF-8"
    elif "fields" in detail.lower() or "ragged" in detail.lower():
        fix = "a line has more fields than the header; fix that line (a quote left open?)"
    else:
        fix = "fix the file, or check that its extension names its format"
    return SpecError(Problem("input", f"{path}: cannot read it as {path.suffix} ({detail}); {fix}"))


ONE_OBJECT = "; each line must be one JSON object: fix or remove that line"


def _first_bad_line(path: Path) -> tuple[int, str] | None:
    """The first line of a local JSONL file that is not one JSON object (blank lines are skipped, as polars skips
    them): its number and what it is; None when every line is one. Read a line at a time, once polars has refused
    the file."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError:
                return number, "not UTF-8 text; re-save the file as UTF-8"
            except json.JSONDecodeError as exc:
                return number, f"not JSON ({exc.msg} at column {exc.colno}){ONE_OBJECT}"
            except (ValueError, RecursionError) as exc:
                return number, f"not JSON ({first_line(exc)}){ONE_OBJECT}"
            if not isinstance(value, dict):
                kind = "an array" if isinstance(value, list) else "a single value"
                return number, f"not a JSON object but {kind}{ONE_OBJECT}"
    return None


def open_dataset(path: Location, *, id_column: str | None) -> Dataset:
    """Open `path` and check what the job needs of it; raise SpecError otherwise."""
    if isinstance(path, ObjectURL):
        objectstore.objects(path)  # there, and readable with these credentials: else a SpecError naming the fix
    elif not path.exists():
        raise SpecError(Problem("input", f"{path}: no such file; check `input` in the spec or pass --input"))
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):  # before polars (see there), local or remote
            _refuse_lone_surrogates(path)
        csv = path.suffix.lower() == ".csv"
        header = _csv_header(path) if csv and _in_blocks(path) else None  # read once, for the columns and the check
        frame = scan(path, header=header)
        columns = list(frame.collect_schema().names())
        problems = _header_problems(path, header) if csv else []
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _unreadable(path, exc) from None

    if csv and len(columns) == 1 and (separator := _other_separator(columns[0])) is not None:
        raise SpecError(
            Problem(
                "input",
                f"{path}: its header is one column, {columns[0]!r}: the file is separated by {separator}, and a .csv "
                "is read as separated by commas; re-save it with commas (or as .parquet or .jsonl)",
            )
        )
    if ROW_INDEX in columns:
        problems.append(Problem("input", f"the column name {ROW_INDEX!r} is reserved; rename it"))
    if id_column is not None and id_column not in columns:
        problems.append(
            Problem("id_column", f"{id_column!r} is not an input column; the input has: {', '.join(columns)}")
        )
    if problems:
        raise SpecError(problems)

    indexed = frame.with_row_index(ROW_INDEX)
    read = _read_through(path, indexed, id_column)
    if id_column is not None:
        _check_ids(id_column, read.nulls, read.duplicated)
    return Dataset(path, id_column, indexed, columns, read.rows, read.digest, row_bytes=read.row_bytes)


def _other_separator(name: str) -> str | None:
    """How a CSV whose header is this one name is separated, when by something else than commas (a European
    spreadsheet's export: `id;text`)."""
    return next((label for char, label in ((";", "';'"), ("\t", "tabs"), ("|", "'|'")) if char in name), None)


def _header_problems(path: Location, first: bytes | None) -> list[Problem]:
    """A CSV header that names a column twice: polars would rename the second (`text_duplicated_0`) and `{text}`
    would quietly mean the first, so it is refused. The header is read as polars reads it (quotes, separators),
    as a row of plain values; empty names are left alone (no placeholder can name them). `first` is the header
    record as _csv_header read it (polars' scan would read the whole file to give one row); None where polars
    reads the input (a glob, hf://)."""
    if first is not None:
        header = (
            pl.read_csv(io.BytesIO(first), has_header=False, infer_schema=False) if first.strip() else pl.DataFrame()
        )
    else:
        where, options = source(path)
        header = pl.scan_csv(where, has_header=False, infer_schema=False, n_rows=1, storage_options=options).collect()
    names = list(header.row(0)) if header.height else []
    problems = []
    for name in dict.fromkeys(n for n in names if n):
        places = [str(position + 1) for position, other in enumerate(names) if other == name]
        if len(places) > 1:
            problems.append(
                Problem(
                    "input",
                    f"{path}: the header names the column {name!r} {_times(len(places))} (columns "
                    f"{', '.join(places[:-1])} and {places[-1]}), so a placeholder or the output could not tell "
                    "them apart; rename all but one",
                )
            )
    return problems


def _times(count: int) -> str:
    return "twice" if count == 2 else f"{count} times"


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # \ud800 to \udfff: half of a UTF-16 pair
SCAN_BYTES = 8 << 20


def _refuse_lone_surrogates(path: Location) -> None:
    """A JSON string may hold half of a UTF-16 surrogate pair (`"bad\\ud800x"`), which no text can hold: polars
    reads a lone high half as NUL (`bad\\x00x`, a changed id) and fails on a lone low half. Such values are refused,
    naming each line and column. The file is searched in blocks of whole lines for escapes in the surrogate
    range; only a line with one is parsed (json, which keeps lone halves), to tell a lone half from a pair or
    an escaped backslash."""
    problems: list[Problem] = []
    if isinstance(path, ObjectURL):  # each object in turn, its body streamed in blocks (polars could not say)
        for found in objectstore.objects(path):
            where = path.with_key(found["key"])
            with contextlib.closing(objectstore.body(where)) as handle:
                problems += _lone_surrogates_in(where, handle)
    else:
        with path.open("rb") as handle:
            problems = _lone_surrogates_in(path, handle)
    if problems:
        shown = problems[:5]
        if len(problems) > len(shown):
            shown.append(Problem("input", f"{path}: and {len(problems) - len(shown)} more such values"))
        raise SpecError(shown)


def _lone_surrogates_in(path: Location, handle: BinaryIO) -> list[Problem]:
    """The lone surrogates in one file or object, read from `handle` SCAN_BYTES at a time: memory is a block,
    whatever the size."""
    problems: list[Problem] = []
    line = 1  # the number of the first line in `block`
    carry = b""
    while True:
        read = handle.read(SCAN_BYTES)
        block = carry + read
        cut = block.rfind(b"\n") + 1 if read else len(block)  # whole lines; the rest waits for the next read
        if read and cut == 0:
            carry = block
            continue
        block, carry = block[:cut], block[cut:]
        at = 0
        while (found := SURROGATE_ESCAPE.search(block, at)) is not None:
            start = block.rfind(b"\n", 0, found.start()) + 1
            end = block.find(b"\n", found.end())
            end = len(block) if end < 0 else end
            number = line + block.count(b"\n", 0, start)
            problems += [Problem("input", f"{path}:{number}: {what}") for what in _lone_halves(block[start:end])]
            at = end
        line += block.count(b"\n")
        if not read:
            break
    return problems


def _lone_halves(line: bytes) -> list[str]:
    """What in one JSON line holds a lone surrogate: one sentence per column (or key). Nothing for a line that is
    not JSON (polars says what is wrong with it)."""
    try:
        parsed = json.loads(line.decode("utf-8-sig"), object_pairs_hook=lambda pairs: pairs)
    except (ValueError, RecursionError):
        return []
    fix = "so it could not be kept as written; write the character it stands for (or remove it) on that line"
    found = []
    for key, value in parsed if isinstance(parsed, list) and all(isinstance(p, tuple) for p in parsed) else []:
        if (half := _lone_half(key)) is not None:
            found.append(f"a key holds {half}, a lone UTF-16 surrogate that no text can hold, {fix}")
        elif (half := _lone_half(value)) is not None:
            found.append(f"the value of {key!r} holds {half}, a lone UTF-16 surrogate that no text can hold, {fix}")
    return found


def _lone_half(value: Any) -> str | None:
    """The first lone surrogate in a parsed JSON value (strings inside lists and objects too), as its escape."""
    if isinstance(value, str):
        return next((f"\\u{ord(char):04x}" for char in value if 0xD800 <= ord(char) <= 0xDFFF), None)
    if isinstance(value, (list, tuple)):
        return next((half for item in value if (half := _lone_half(item)) is not None), None)
    return None


@dataclass(frozen=True)
class _ReadThrough:
    """What the checking pass learned of every cell."""

    rows: int
    nulls: int  # rows without an id
    duplicated: list[Any]  # some ids that repeat
    digest: str  # of every row's content with its position
    row_bytes: int | None  # a Parquet input's longest row in bytes; None for other inputs, or a column of no known size


def _row_bytes(schema: pl.Schema) -> pl.Expr | None:
    """A row's size in bytes, an upper bound: text and bytes as long as they are, any other scalar 8 bytes, and
    None when a column's size is not known without walking it (lists, structs)."""
    sizes = []
    for name, dtype in schema.items():
        if dtype == pl.String:
            sizes.append(pl.col(name).str.len_bytes().fill_null(0))
        elif dtype == pl.Binary:
            sizes.append(pl.col(name).bin.size().fill_null(0))
        elif dtype.is_nested() or dtype == pl.Object:
            return None
        else:
            sizes.append(pl.lit(8))
    return pl.sum_horizontal(sizes).max() if sizes else None


def _read_through(path: Location, frame: pl.LazyFrame, id_column: str | None) -> _ReadThrough:
    """One pass over every cell of the input (with ROW_INDEX): its rows, null ids, some duplicated ids, the rows'
    digest and (Parquet) its longest row.

    Reading every column to the end here is what makes a file that breaks at its last
    row fail now, before the first request, instead of after thousands were paid for."""
    schema = frame.collect_schema()
    longest = _row_bytes(schema) if path.suffix.lower() == ".parquet" else None
    checks = [
        pl.len().alias("__rows"),
        *(pl.col(c).null_count().alias(f"__cell{i}") for i, c in enumerate(schema.names())),
        *(expression.sum().alias(f"__digest{i}") for i, expression in enumerate(_HASHES)),
        *([longest.alias("__row_bytes")] if longest is not None else []),
    ]
    try:
        found = frame.select(checks).collect(engine="streaming").row(0, named=True)
        if id_column is not None:
            # A pass of its own: n_unique beside the other checks made polars' streaming engine hold far more
            # than the ids (measured: 158 MB against 133 MB at 100,000 rows of 1 KB); alone it holds the distinct
            # ids, O(ids), and reads only that column of a Parquet input.
            column = pl.col(id_column)
            ids = [column.null_count().alias("__nulls"), column.n_unique().alias("__distinct")]
            found |= frame.select(ids).collect(engine="streaming").row(0, named=True)
        duplicated: list[Any] = []
        nulls = int(found.get("__nulls") or 0)
        if id_column is not None and int(found["__distinct"]) < int(found["__rows"]) - nulls + (1 if nulls else 0):
            # Some id repeats: a second pass finds which (only then: listing them costs more than counting).
            column = pl.col(id_column)
            repeated = column.filter(column.is_duplicated()).unique(maintain_order=True).head(3)
            duplicated = frame.select(repeated).collect().to_series().to_list()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _unreadable(path, exc) from None
    digest = _digest_text(tuple(found[f"__digest{i}"] for i in range(len(_HASHES))))
    row_bytes = found.get("__row_bytes")
    return _ReadThrough(int(found["__rows"]), nulls, duplicated, digest, None if row_bytes is None else int(row_bytes))


def _check_ids(id_column: str, nulls: int, duplicated: list[Any]) -> None:
    if nulls:
        raise SpecError(Problem("id_column", f"{id_column!r} is empty in {nulls} row(s); every row needs an id"))
    if duplicated:
        shown = ", ".join(repr(v) for v in duplicated)
        raise SpecError(Problem("id_column", f"{id_column!r} has duplicate values ({shown}); ids must be unique"))
