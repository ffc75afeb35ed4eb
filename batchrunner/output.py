"""Writing the output file through polars: input columns, then the result columns.

The output is rebuilt from the checkpoint store, streamed in batches: each input batch is
joined with its stored answers and written as a part file, and the parts are then sunk
into the target format. Memory stays bounded by the batch size, not the dataset. The
target is replaced atomically (a temporary file, then a rename), so a reader or a crash
never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import polars as pl

from batchrunner.dataset import ROW_INDEX, Dataset
from batchrunner.records import RESULT_SCHEMA
from batchrunner.request import RequestBuilder
from batchrunner.spec import JobSpec
from batchrunner.store import Store
from batchrunner.structured import InvalidAnswer, Mode, column_types, parse_answer, typed_value

MODEL_POSITION = "__batchrunner_model"
_KEYS_SCHEMA = {ROW_INDEX: pl.UInt32(), MODEL_POSITION: pl.Int32()}


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
    return columns


def _typed(values: dict[str, Any], spec: JobSpec, extra: dict[str, pl.DataType]) -> dict[str, Any]:
    """A stored result as an output record: the structured answer spread over its typed columns."""
    mode = Mode.of(spec.response_format)
    if mode.kind != "json_schema":
        return values
    parsed = json.loads(values["parsed"]) if values.get("parsed") else None
    if parsed is None and values.get("status") == "ok" and values.get("response"):
        # Answered before answers were parsed into the checkpoint: parse the stored text now.
        with contextlib.suppress(InvalidAnswer):
            parsed = parse_answer(str(values["response"]), mode)
    prefix = spec.output_prefix
    typed = {
        column: typed_value(parsed.get(column[len(prefix) :]) if isinstance(parsed, dict) else None, dtype)
        for column, dtype in extra.items()
        if column not in ("parsed", "tool_calls")
    }
    return {**values, **typed}


def _answers(rows_frame: pl.DataFrame, records: list[dict[str, object]], extra: dict[str, pl.DataType]) -> pl.DataFrame:
    """One input batch joined with its answers: input rows in order, then models in spec order."""
    schema = {**_KEYS_SCHEMA, **RESULT_SCHEMA, **extra}
    records = [{name: record.get(name) for name in schema} for record in records]
    answers = pl.DataFrame(records, schema=schema, orient="row") if records else pl.DataFrame(schema=schema)
    joined = rows_frame.join(answers, on=ROW_INDEX, how="inner")
    return joined.sort(ROW_INDEX, MODEL_POSITION).drop(ROW_INDEX, MODEL_POSITION)


def export(dataset: Dataset, requests: RequestBuilder, store: Store, path: Path, *, batch_size: int = 20_000) -> int:
    """Write every answered (row, model) of the current spec to `path`; return the row count.

    Rows without an answer for the spec as it is now (never run, or run before an edit to
    their prompt or params) are left out: they are pending.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    extra = extra_columns(requests.spec)
    written = 0
    try:
        for number, (frame, rows) in enumerate(dataset.chunks(batch_size=batch_size)):
            keys = {}
            for row in rows:
                prompt = requests.prompt(row)
                for position, model in enumerate(requests.spec.models):
                    keys[(row.id, model, requests.fingerprint(prompt, model))] = (row.index, position)
            stored = store.fetch(keys)
            records = [
                {ROW_INDEX: keys[key][0], MODEL_POSITION: keys[key][1], **_typed(values, requests.spec, extra)}
                for key, values in stored.items()
            ]
            part = _answers(frame, records, extra)
            written += part.height
            part.write_parquet(parts / f"{number:08d}.parquet")
        if not any(parts.iterdir()):  # an empty input still gets a file with the right columns
            _answers(dataset.frame.head(0).collect(), [], extra).write_parquet(parts / "empty.parquet")
        _sink(pl.scan_parquet(parts / "*.parquet"), path)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    return written


def _sink(frame: pl.LazyFrame, path: Path) -> None:
    """Stream `frame` into `path` in the format its extension names, atomically."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            frame.sink_parquet(temporary)
        elif suffix == ".csv":
            frame.sink_csv(temporary)
        elif suffix in (".jsonl", ".ndjson"):
            frame.sink_ndjson(temporary)
        else:
            raise ValueError(f"unsupported output format {suffix!r}")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
