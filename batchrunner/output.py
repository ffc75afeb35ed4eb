"""Writing the output file through polars: input columns, then the result columns.

Written atomically (a temporary file beside the target, then a rename), so a reader or a
crash never leaves half a file where the output should be.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import polars as pl

from batchrunner.dataset import ROW_INDEX, Dataset
from batchrunner.records import RESULT_SCHEMA, RowResult

MODEL_POSITION = "__batchrunner_model"


def results_frame(results: Iterable[RowResult]) -> pl.DataFrame:
    """Results as a typed frame keyed by (row position, model position)."""
    schema = {ROW_INDEX: pl.UInt32(), MODEL_POSITION: pl.Int32(), **RESULT_SCHEMA}
    rows = [{ROW_INDEX: r.row_index, MODEL_POSITION: r.model_position, **r.columns()} for r in results]
    return pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


def output_frame(dataset: Dataset, results: Iterable[RowResult]) -> pl.DataFrame:
    """One row per answered (input row, model), in input order, then in the spec's model order."""
    answered = results_frame(results).lazy()
    joined = dataset.frame.join(answered, on=ROW_INDEX, how="inner")
    return joined.sort(ROW_INDEX, MODEL_POSITION).drop(ROW_INDEX, MODEL_POSITION).collect()


def write_frame(frame: pl.DataFrame, path: Path) -> None:
    """Write `frame` in the format `path`'s extension names, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            frame.write_parquet(temporary)
        elif suffix == ".csv":
            frame.write_csv(temporary)
        elif suffix in (".jsonl", ".ndjson"):
            frame.write_ndjson(temporary)
        else:
            raise ValueError(f"unsupported output format {suffix!r}")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_output(dataset: Dataset, results: Iterable[RowResult], path: Path) -> int:
    """Write the output file; return how many rows it holds."""
    frame = output_frame(dataset, results)
    write_frame(frame, path)
    return frame.height
