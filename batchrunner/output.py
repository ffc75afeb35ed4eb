"""Writing the output file through polars: input columns, then the result columns.

The output is rebuilt from the checkpoint store, streamed in batches: each input batch is
joined with its stored answers and written as a part file, and the parts are then sunk
into the target format. Memory stays bounded by the batch size, not the dataset. The
target is replaced atomically (a temporary file, then a rename), so a reader or a crash
never sees half a file.

An output in S3 (`s3://...`) is written by polars' sink as one multipart upload, completed only when the
last row is written: the object at the key is the old one or the new one, whole. A sink that fails is
never completed (its upload is aborted here); its parts and key log are kept locally, beside the checkpoint
(ObjectURL.local). S3 has no append: rows added to a remote output rewrite it (extend returns None).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from batchrunner import objectstore
from batchrunner.dataset import ROW_INDEX, Dataset, polars_source, source
from batchrunner.errors import OutputError, first_line
from batchrunner.files import replacing, summary_path
from batchrunner.judging import grade_keys, score_of
from batchrunner.keylog import MODEL_POSITION, SAMPLE, KeyCursor, KeyLog, folder_prefix, keys_frame
from batchrunner.records import KEY_COLUMNS, MONEY_COLUMNS, RESULT_SCHEMA, STORED_EXTRAS
from batchrunner.request import RequestBuilder
from batchrunner.scoring import error_column, metrics_of, score_rows
from batchrunner.spec import JobSpec
from batchrunner.store import Store, fetched_schema, read_ahead
from batchrunner.structured import InvalidAnswer, Mode, column_types, parse_answer, typed_value
from batchrunner.urls import Location, ObjectURL

log = logging.getLogger("batchrunner")
UPLOAD_CLOCK_SKEW = timedelta(minutes=5)  # the store's clock may be ahead of ours: uploads begun since then are ours


def local_of(path: Location) -> Path:
    """Where the output's temporaries go: beside it, or for an s3:// output beside the checkpoint."""
    return path.local() if isinstance(path, ObjectURL) else path


def extra_columns(spec: JobSpec) -> dict[str, pl.DataType]:
    """Columns after the standard ones: the structured answer's, and tool calls when tools are offered."""
    mode = Mode.of(spec.response_format)
    columns: dict[str, pl.DataType] = {}
    if mode.kind == "json_object":
        columns["parsed"] = pl.String()
    if "tools" in spec.params:
        columns["tool_calls"] = pl.String()
    if mode.kind == "json_schema" and mode.schema:
        columns.update({spec.output_prefix + name: dtype for name, dtype in column_types(mode.schema).items()})
    columns.update(score_columns(spec))
    return columns


def _structured_columns(answers: pl.DataFrame, spec: JobSpec, extra: dict[str, pl.DataType]) -> list[pl.Series]:
    """The structured answers spread over their typed columns, one per schema property."""
    mode = Mode.of(spec.response_format)
    scored = score_columns(spec)
    wanted = {column: dtype for column, dtype in extra.items() if column not in STORED_EXTRAS and column not in scored}
    typed: dict[str, list[Any]] = {column: [] for column in wanted}
    if mode.kind == "json_schema" and wanted:
        for parsed_text, status, response in answers.select("parsed", "status", "response").iter_rows():
            parsed = json.loads(parsed_text) if parsed_text else None
            if parsed is None and status == "ok" and response:
                # Answered before answers were parsed into the checkpoint: parse the stored text now.
                with contextlib.suppress(InvalidAnswer):
                    parsed = parse_answer(str(response), mode)
            for column, dtype in wanted.items():
                value = parsed.get(column[len(spec.output_prefix) :]) if isinstance(parsed, dict) else None
                typed[column].append(typed_value(value, dtype))
    return [pl.Series(column, values, dtype=wanted[column]) for column, values in typed.items()]


def _answers(
    rows_frame: pl.DataFrame,
    keys: pl.DataFrame,
    stored: pl.DataFrame,
    spec: JobSpec,
    extra: dict[str, pl.DataType],
    *,
    row_index: bool = False,
) -> pl.DataFrame:
    """One input batch joined with its answers (by checkpoint key, by name): input rows in order, then
    models in spec order. `keys` maps each pair's checkpoint key to its row and model position."""
    answers = keys.join(stored, on=list(KEY_COLUMNS), how="inner")
    unknown = (pl.col("cost_source") == "unknown") & (pl.col("cost_usd").cast(pl.Float64) == 0)
    answers = (
        answers.with_columns(pl.when(unknown).then(None).otherwise(pl.col("cost_usd")).alias("cost_usd"))  # not $0
        .with_columns(pl.col(name).cast(RESULT_SCHEMA[name]) for name in MONEY_COLUMNS)  # exact text to decimals
        .with_columns(_structured_columns(answers, spec, extra))
    )
    scored = score_columns(spec)
    keep = [*RESULT_SCHEMA, *(c for c in extra if c not in scored and c != "parsed"), "parsed"]
    joined = rows_frame.join(answers.select(ROW_INDEX, MODEL_POSITION, SAMPLE, *keep), on=ROW_INDEX, how="inner")
    joined = joined.sort(ROW_INDEX, MODEL_POSITION, SAMPLE)
    if spec.evaluate is not None:  # scores are computed here, from what is stored: no request, rerun any time
        values = score_rows(
            joined.select(pl.exclude(ROW_INDEX, MODEL_POSITION, SAMPLE)).to_dicts(),
            metrics_of(spec.evaluate.rules(), spec.output_prefix),
            reference=spec.evaluate.reference,
            field=spec.evaluate.field,
            input_columns=[c for c in rows_frame.columns if c != ROW_INDEX],
        )
        joined = joined.with_columns(pl.Series(name, values[name], dtype=scored[name]) for name in scored)
    samples = [SAMPLE] if spec.samples > 1 else []
    columns = [c for c in rows_frame.columns if c != ROW_INDEX or row_index] + [*samples, *RESULT_SCHEMA, *extra]
    return joined.select(columns)


def score_columns(spec: JobSpec) -> dict[str, pl.DataType]:
    """The score columns an evaluation job's output ends with."""
    if spec.evaluate is None:
        return {}
    metrics = metrics_of(spec.evaluate.rules(), spec.output_prefix)
    columns: dict[str, pl.DataType] = {metric.name: pl.Float64() for metric in metrics}
    if any(metric.kind == "python" for metric in metrics):
        columns[error_column(metrics)] = pl.String()
    return columns


MEDIA_EXPORT_ROWS = 1024
ROW_GROUP_ROWS = 20_000  # a Parquet output's row groups: polars decodes a whole group to read any of it (1M rows in
# one group took 370 MB to copy into a longer output; in groups of 20,000, 130 MB)


def results(
    dataset: Dataset,
    requests: RequestBuilder,
    store: Store,
    *,
    batch_size: int = 20_000,
    row_index: bool = False,
    start: int = 0,
    keys: KeyLog | None = None,
) -> Iterator[pl.DataFrame]:
    """The output, batch by batch: every answered (row, model) of the current spec (from input row `start`),
    input columns first (and, with `row_index`, the row's position in the input as ROW_INDEX, to pair
    models' answers).

    Rows without an answer for the spec as it is now (never run, or run before an edit to
    their prompt or params) are left out: they are pending. The report reads these frames too.
    With `keys`, a run's complete KeyLog, the rows' keys are read from it instead of computed again."""
    spec = requests.spec
    extra = extra_columns(spec)
    judges = spec.evaluate.judges() if spec.evaluate is not None else []
    if requests.has_media:  # each row's files are hashed again to find its key; bytes cells are held per batch
        batch_size = min(batch_size, MEDIA_EXPORT_ROWS)
    cursor = keys.cursor() if keys is not None and keys.covers(start) else None
    for frame, known, stored in _fetched(_keyed(dataset, requests, cursor, batch_size=batch_size, start=start), store):
        answers = _answers(frame, known, stored, spec, extra, row_index=row_index or bool(judges))
        for rule, column in zip(judges, _judge_columns(spec) if judges else [], strict=True):
            answers = answers.with_columns(
                _grades(answers, spec, rule, requests.server, dataset.columns, store).alias(column)
            )
        yield answers if row_index or not judges else answers.drop(ROW_INDEX)


FETCH_AHEAD_MAX_BYTES = 256 * 2**20  # a batch's answers are fetched while the last is written, if it was under this


def _fetched(
    keyed: Iterator[tuple[pl.DataFrame, pl.DataFrame]], store: Store
) -> Iterator[tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]]:
    """Each input batch and its keys with their stored answers, fetched a batch ahead (store.read_ahead) unless
    a batch's answers took more than FETCH_AHEAD_MAX_BYTES (long answers: two batches of them at once would
    double the output's peak)."""

    def fetch(batch: tuple[pl.DataFrame, pl.DataFrame]) -> pl.DataFrame:
        return store.fetch(batch[1]["row_id"].unique(maintain_order=True).to_list())

    def small(stored: pl.DataFrame) -> bool:
        return stored.estimated_size() <= FETCH_AHEAD_MAX_BYTES

    for (frame, known), stored in read_ahead(keyed, fetch, ahead_after=small):
        yield frame, known, stored


def _keyed(
    dataset: Dataset, requests: RequestBuilder, cursor: KeyCursor | None, *, batch_size: int, start: int
) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
    """Each input batch with its pairs' keys: read from the run's KeyLog (`cursor`), the frames alone (a Row
    object for each row cost more than reading it: 0.39 s of 200,000 rows' 0.45), or computed again from Rows."""
    if cursor is not None:
        for frame in dataset.frames(batch_size=batch_size, start=start):
            yield frame, cursor.upto(frame[ROW_INDEX][-1])
        return
    for frame, rows in dataset.chunks(batch_size=batch_size, start=start):
        yield frame, keys_frame(requests.for_rows(rows))


def _judge_columns(spec: JobSpec) -> list[str]:
    """The score column of each judge metric, in order."""
    assert spec.evaluate is not None
    metrics = metrics_of(spec.evaluate.rules(), spec.output_prefix)
    return [metric.name for metric in metrics if metric.kind == "judge"]


def _grades(
    answers: pl.DataFrame, spec: JobSpec, rule: Any, server: str, input_columns: list[str], store: Store
) -> pl.Series:
    """A judge metric's scores: each answered row's grade from the checkpoint (null while ungraded), 0 for a
    failed row."""
    keys = grade_keys(answers, spec, rule, server, input_columns)
    wanted = [key for key in keys if key is not None]
    graded: dict[tuple[str, str, str], str | None] = {}
    if wanted:
        found = store.fetch(sorted({key[0] for key in wanted})).filter(pl.col("status") == "ok")
        graded = {
            (r[0], r[1], r[2]): r[3]
            for r in found.select("row_id", "requested_model", "fingerprint", "parsed").iter_rows()
        }
    scores = [
        (0.0 if status != "ok" else None) if key is None else score_of(graded.get(key), rule.judge.scale)
        for key, status in zip(keys, answers["status"].to_list(), strict=True)
    ]
    return pl.Series(scores, dtype=pl.Float64())


PART = re.compile(r"(\d{8}|empty)\.parquet|tail\.(csv|jsonl|ndjson)")  # what _write_parts, extend and a KeyLog put
# in their folders
RANDOM = "[a-z0-9_]{8}"  # the eight characters tempfile's mkdtemp and mkstemp add to a prefix


def remove_leftovers(output: Location) -> list[str]:
    """Remove what a killed run or export of the output `path` left beside it, and return the names removed:
    parts folders (`.result.parquet.k2_9abcd`, `.result.parquet.keys.k2_9abcd`) holding nothing but parts,
    temporary copies of the output and its summary (`.result.parquet.k2_9abcd.tmp`), the probe. Only names
    batchrunner makes, owned by this user, never through a symlink; a folder holding anything else is left.

    Call it holding the job's lock (lock.py): then no live run or export of the job is using what it removes.
    For an s3:// output, its temporaries beside the checkpoint (an unfinished upload is aborted as it fails)."""
    path = local_of(output)
    name, summary = re.escape(path.name), re.escape(summary_path(path).name)
    folders = re.compile(rf"({re.escape(_parts_prefix(path))}|{re.escape(folder_prefix(path))}){RANDOM}")
    files = re.compile(rf"\.({name}|{summary})\.{RANDOM}\.tmp|\.{re.escape(path.stem)}\.probe{re.escape(path.suffix)}")
    removed: list[str] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        try:
            found = entry.stat(follow_symlinks=False)
            if found.st_uid != os.getuid():
                continue
            if stat.S_ISDIR(found.st_mode) and folders.fullmatch(entry.name) and _only_parts(Path(entry.path)):
                shutil.rmtree(entry.path)
            elif stat.S_ISREG(found.st_mode) and files.fullmatch(entry.name):
                os.unlink(entry.path)
            else:
                continue
        except OSError as exc:  # gone meanwhile, or not ours to remove: left as it is
            log.debug("left %s beside %s (%s)", entry.name, path, exc)
            continue
        removed.append(entry.name)
    return removed


def _parts_prefix(path: Path) -> str:
    """The output's parts are written in a folder named this and eight random characters."""
    return f".{path.name}."


def _only_parts(folder: Path) -> bool:
    """Whether a folder holds nothing but files named as batchrunner names its parts (no folder, no link)."""
    with os.scandir(folder) as entries:
        return all(entry.is_file(follow_symlinks=False) and PART.fullmatch(entry.name) for entry in entries)


def export(
    dataset: Dataset,
    requests: RequestBuilder,
    store: Store,
    path: Location,
    *,
    batch_size: int = 20_000,
    keys: KeyLog | None = None,
    check: Callable[[int], None] | None = None,
) -> int:
    """Write every answered (row, model) of the current spec to `path`; return the row count.

    Rows without an answer for the spec as it is now (never run, or run before an edit to
    their prompt or params) are left out: they are pending. `check` is called with the number of rows
    about to be written, before `path` is replaced: it may refuse by raising, and `path` is left as it was.
    """
    local = local_of(path)
    local.parent.mkdir(parents=True, exist_ok=True)
    parts = Path(tempfile.mkdtemp(prefix=_parts_prefix(local), dir=local.parent))
    try:
        written = _write_parts(results(dataset, requests, store, batch_size=batch_size, keys=keys), parts)
        if check is not None:
            check(written)
        if not any(parts.iterdir()):  # an empty input still gets a file with the right columns
            _empty(dataset, requests.spec).write_parquet(parts / "empty.parquet")
        _sink(_of_parts(parts, path.suffix), path)
    except pl.exceptions.PolarsError as exc:  # polars' errors stop here, as aiohttp's stop in client.py
        raise OutputError(f"could not write {path}: {first_line(exc)}") from exc
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    return written


def _of_parts(folder: Path, suffix: str) -> pl.LazyFrame:
    """The parts in `folder`, in order, as what the output is written from. A Parquet output is sunk from a
    source that reads one part at a time: polars' scan of the parts decodes ahead of its sink (measured, sinking
    1,000,000 rows of 1 KB: 209 MB of anonymous memory, against 177 MB for 300,000 rows and 1,000,000 alike
    part by part). A text output is written a window at a time (_write_text), which the scan's slices serve."""
    files = sorted(folder.glob("*.parquet"))
    if suffix.lower() != ".parquet" or not files:
        return pl.scan_parquet(folder / "*.parquet")
    return polars_source(lambda: (pl.read_parquet(file) for file in files), pl.Schema(pl.read_parquet_schema(files[0])))


def _write_parts(frames: Iterable[pl.DataFrame], folder: Path) -> int:
    """Each frame as a numbered Parquet part in `folder`, in order; the rows written."""
    rows = 0
    for number, frame in enumerate(frames):
        rows += frame.height
        frame.write_parquet(folder / f"{number:08d}.parquet")
    return rows


def extend(
    dataset: Dataset, requests: RequestBuilder, store: Store, path: Location, *, start: int, keys: KeyLog | None = None
) -> int | None:
    """Add the answers of input rows from `start` on to the end of `path`, an output of the same job's rows
    before them, instead of rewriting it; return the rows added. None when `path` cannot be extended
    (its columns are not what the new rows' are): then it must be rewritten with `export`.

    Parquet is rewritten as the old file's row groups followed by the new rows (no row is rebuilt from
    the checkpoint); CSV and JSONL are copied and appended to. Atomic as `export` is.

    An object in S3 cannot be appended to: it is rewritten whole by `export` (None)."""
    if isinstance(path, ObjectURL):
        return None
    parts = Path(tempfile.mkdtemp(prefix=_parts_prefix(path), dir=path.parent))
    try:
        added = _write_parts(results(dataset, requests, store, start=start, keys=keys), parts)
        if not added:
            return 0
        new = pl.scan_parquet(parts / "*.parquet")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            old = pl.scan_parquet(path)
            if old.collect_schema() != new.collect_schema():
                return None
            _sink(pl.concat([old, new]), path)
            return added
        tail = parts / f"tail{suffix}"
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as old_file:
                if old_file.readline() != _as_json_text(_as_text(new)).head(0).collect().write_csv():
                    return None  # not the columns the new rows have
        _write_text(new, tail, suffix, header=False)
        with replacing(path) as temporary, tail.open("rb") as source:
            shutil.copyfile(path, temporary)
            with temporary.open("ab") as target:
                shutil.copyfileobj(source, target)
        return added
    except pl.exceptions.PolarsError as exc:
        raise OutputError(f"could not write {path}: {first_line(exc)}") from exc
    finally:
        shutil.rmtree(parts, ignore_errors=True)


def rows_in(path: Location) -> int | None:
    """How many rows an output file holds: 0 when there is no file, None when it cannot be read as its format."""
    if not (objectstore.exists(path) if isinstance(path, ObjectURL) else path.exists()):
        return 0
    suffix = path.suffix.lower()
    where, options = source(path)
    try:
        if suffix == ".parquet":
            frame = pl.scan_parquet(where, storage_options=options)
        elif suffix == ".csv":
            frame = pl.scan_csv(where, infer_schema=False, storage_options=options)
        else:
            frame = pl.scan_ndjson(where, infer_schema_length=None, storage_options=options)
        return int(frame.select(pl.len()).collect().item())
    except (pl.exceptions.PolarsError, OSError):
        return None


def _empty(dataset: Dataset, spec: JobSpec) -> pl.DataFrame:
    """The output with no rows: every column it will have, with its type."""
    stored = pl.DataFrame(schema=fetched_schema())
    return _answers(dataset.frame.head(0).collect(), keys_frame([]), stored, spec, extra_columns(spec))


def probe_output(dataset: Dataset, spec: JobSpec, output: Location) -> None:
    """Write the output's columns, without rows, beside `path` and remove it: a folder that cannot be
    written or a column the format cannot hold is found before any request is paid for. For an s3:// output
    the columns are probed locally (beside the checkpoint) and the bucket by an empty object put and deleted
    (objectstore.check_writable: SpecError naming the fix)."""
    if isinstance(output, ObjectURL):
        objectstore.check_writable(output)
    path = local_of(output)
    made = []  # the folders the probe makes, deepest first: removed after it (a check leaves no trace; the run
    for folder in (path.parent, *path.parent.parents):  # makes them again when it writes)
        if folder.exists():
            break
        made.append(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise OutputError(f"{path} is a folder")
        probe = path.with_name(f".{path.stem}.probe{path.suffix}")
        try:
            _sink(_empty(dataset, spec).lazy(), probe)
        finally:
            probe.unlink(missing_ok=True)
    except pl.exceptions.PolarsError as exc:
        raise OutputError(first_line(exc)) from exc
    finally:
        for folder in made:
            with contextlib.suppress(OSError):  # something else wrote there meanwhile (a run): it stays
                folder.rmdir()


def _as_text(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Bytes (a Parquet column of images) as base64 text, for CSV and JSONL, which cannot hold bytes."""
    binary = [name for name, dtype in frame.collect_schema().items() if dtype == pl.Binary()]
    return frame.with_columns(pl.col(binary).bin.encode("base64")) if binary else frame


def _as_json_text(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Nested columns (lists, structs) as JSON text, for CSV, which cannot hold them."""

    def encode(column: str) -> pl.Expr:
        prefix = len("{" + json.dumps(column, ensure_ascii=False) + ":")
        text = pl.struct(pl.col(column)).struct.json_encode()  # {"column":<value>}: cut the wrapper off
        return (
            pl.when(pl.col(column).is_null())
            .then(None)
            .otherwise(text.str.slice(prefix, text.str.len_chars() - prefix - 1))
            .alias(column)
        )

    nested = [name for name, dtype in frame.collect_schema().items() if dtype.is_nested()]
    return frame.with_columns([encode(name) for name in nested]) if nested else frame


def _sink(frame: pl.LazyFrame, path: Location) -> None:
    """Stream `frame` into `path` in the format its extension names, atomically: a local file through a temporary
    renamed over it; an object through a staging object beside it, copied over it on the server once whole (a
    failed sink's upload aborted and its staging object deleted): the key holds the old object or the new one."""
    if isinstance(path, ObjectURL):  # written beside the key first, then copied over it whole (objectstore.publish)
        objectstore.discard_staged(path)  # what a killed run left (the job's lock is held)
        staged = objectstore.staging(path)
        since = datetime.now(UTC) - UPLOAD_CLOCK_SKEW
        try:
            if path.suffix.lower() in TEXT_SUFFIXES:  # written here a window at a time, then uploaded in parts
                with tempfile.TemporaryDirectory(dir=path.scratch, prefix=".upload-") as folder:
                    local = Path(folder) / path.name
                    _write_text(frame, local, path.suffix)
                    try:
                        objectstore.upload(staged, local)
                    except Exception as exc:  # the store's errors, not all OSErrors: one sentence, never a trace
                        raise OutputError(f"could not upload the output to {path}: {objectstore.said(exc)}") from exc
            else:
                _sink_as(frame, staged.url, path.suffix, objectstore.polars_options(staged))
        except BaseException:
            objectstore.settle_failed(staged, since)
            raise
        try:
            objectstore.publish(staged, path)
        except Exception as exc:  # the store's errors: the old output stands, the answers are in the checkpoint
            objectstore.discard(staged)
            raise OutputError(f"could not put the output in place at {path}: {objectstore.said(exc)}") from exc
        return
    with replacing(path) as temporary:
        if path.suffix.lower() in TEXT_SUFFIXES:
            _write_text(frame, temporary, path.suffix)
        else:
            _sink_as(frame, temporary, path.suffix, None)


TEXT_SUFFIXES = (".csv", ".jsonl", ".ndjson")


def _write_text(frame: pl.LazyFrame, target: Path, suffix: str, *, header: bool = True) -> None:
    """`frame` as CSV or JSONL text in `target`, ROW_GROUP_ROWS rows at a time (each a slice the scan of the
    parts decodes alone). polars' text sinks decode their source ahead of the writer until they hold most of it
    (measured: 415 MB of anonymous memory writing 300,000 rows of 1 KB as CSV, pola-rs/polars#28569)."""
    csv = suffix.lower() == ".csv"
    text = _as_json_text(_as_text(frame)) if csv else _as_text(frame)
    with target.open("wb") as handle:
        offset = 0
        while True:
            window = text.slice(offset, ROW_GROUP_ROWS).collect()
            if csv:
                window.write_csv(handle, include_header=header and offset == 0)
            else:
                window.write_ndjson(handle)
            if window.height < ROW_GROUP_ROWS:
                return
            offset += ROW_GROUP_ROWS


def _sink_as(frame: pl.LazyFrame, target: str | Path, suffix: str, options: dict[str, str] | None) -> None:
    suffix = suffix.lower()
    if suffix == ".parquet":  # in row groups small enough to read back one at a time (extend, readers)
        frame.sink_parquet(target, row_group_size=ROW_GROUP_ROWS, storage_options=options)
    elif suffix == ".csv":
        _as_json_text(_as_text(frame)).sink_csv(target, storage_options=options)
    elif suffix in (".jsonl", ".ndjson"):
        _as_text(frame).sink_ndjson(target, storage_options=options)
    else:
        raise ValueError(f"unsupported output format {suffix!r}")
