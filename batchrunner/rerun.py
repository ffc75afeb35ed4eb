"""What a rerun can take from the last run that left every pair answered, without reading its rows.

A cron job reruns the same spec over an input that is either unchanged or has had rows
appended. Reading, rendering and hashing every row to learn that is what made such reruns
cost as much as the input's size; instead, a run that leaves every pair answered records in
the checkpoint what it left (`mark_complete`), and the next run compares (`last_run`):

- **unchanged**: the spec's request-shaping fields, the server and the input file as the
  filesystem knows it (size, times to the nanosecond, inode; an object in S3: its ETag, version and
  size) are as recorded: no row is read,
  nothing is sent, and the output, if still the file that run wrote, is kept;
- **grown**: the same spec and server, and the input's first rows are the rows that run
  answered, in the same places (a digest of their content with their positions: Parquet,
  CSV or JSONL, appended to or rewritten with more rows): only the rows after them are read,
  and their answers are added to the end of the output instead of rewriting it.

Anything else (an edit, a row inserted or removed, media files, judges, a `--limit` run)
goes the long way: every row is read, and the checkpoint says which are answered.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import polars as pl

from batchrunner.dataset import Dataset
from batchrunner.files import identity
from batchrunner.records import RESULT_SCHEMA
from batchrunner.request import RequestBuilder
from batchrunner.spec import RUN_ONLY_KEYS, JobSpec
from batchrunner.store import MIGRATIONS, Store
from batchrunner.urls import ObjectURL

COMPLETE = "complete"  # the checkpoint's record of the last run that left every pair answered


@dataclass(frozen=True)
class JobState:
    """The job as it is at the start of a run, in the terms `mark_complete` records and `last_run` compares."""

    whole: str  # the spec's request-shaping fields, the server, the input file's identity, the output's columns
    shape: str  # the same without the input file: what must hold for appended rows to be all that changed
    rows: int  # the input's rows
    digest: str  # the content of every row, with its position (Dataset.digests)


@dataclass(frozen=True)
class LastRun:
    """What the last complete run left that still holds."""

    rows: int  # the input rows it answered: the first `rows` of the input as it is now
    answered: dict[str, int]  # pairs answered, per requested model, in those rows
    written: int  # rows in the output it wrote
    output_unchanged: bool  # the output is still the file it wrote
    grown: bool  # rows were appended since; False: the input is the one it read


def job_state(spec: JobSpec, requests: RequestBuilder, dataset: Dataset) -> JobState | None:
    """The job's state now; None when it cannot be known without reading every row: media files (they
    change on their own), judges (graded after the answers)."""
    if requests.has_media or (spec.evaluate is not None and spec.evaluate.judges()):
        return None
    if isinstance(spec.input, ObjectURL):  # its URL (no credentials), ETag, version and size, by a HEAD
        if (known := identity(spec.input)) is None:
            return None
        where: list[Any] = known
    else:
        try:
            found = os.stat(spec.input)
        except OSError:
            return None
        where = [str(spec.input.resolve()), found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino]
    shape = {
        "spec": spec.model_dump(mode="json", exclude=set(RUN_ONLY_KEYS)),
        "server": requests.server,
        "columns": [*RESULT_SCHEMA, len(MIGRATIONS)],
        "input_columns": [[name, str(dtype)] for name, dtype in dataset.frame.collect_schema().items()],
        "polars": pl.__version__,  # whose row hash the digest is
    }
    whole = {
        **shape,
        "input": where,
    }
    return JobState(_digest(whole), _digest(shape), dataset.rows, dataset.digest)


def last_run(store: Store, spec: JobSpec, state: JobState | None, dataset: Dataset) -> LastRun | None:
    """What the last complete run left, if the job is as it left it (unchanged) or only has rows appended
    (grown); None otherwise, or when there was none."""
    if state is None:
        return None
    try:  # a record that is not what this module writes (edited, damaged) is no record: the long way is safe
        record = json.loads(store.meta(COMPLETE) or "null")
        answered = {str(model): int(count) for model, count in dict(record["answered"]).items()}
        written = int(record["written"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    output_unchanged = record.get("output") == identity(spec.output)
    if record.get("state") == state.whole:
        return LastRun(state.rows, answered, written, output_unchanged, grown=False)
    rows = record.get("rows")
    if (
        record.get("shape") == state.shape
        and isinstance(rows, int)
        and 0 < rows < state.rows
        and dataset.digests(rows)[0] == record.get("digest")
    ):
        return LastRun(rows, answered, written, output_unchanged, grown=True)
    return None


def mark_complete(store: Store, spec: JobSpec, state: JobState | None, answered: dict[str, int], written: int) -> None:
    """Record that every pair of the job, as it was at the start of this run, is answered, and the output
    just written."""
    if state is not None:
        record: dict[str, Any] = {
            "state": state.whole,
            "shape": state.shape,
            "rows": state.rows,
            "digest": state.digest,
            "answered": answered,
            "written": written,
            "output": identity(spec.output),
        }
        store.set_meta(COMPLETE, json.dumps(record))


def forget(store: Store) -> None:
    """Until this run ends with every pair answered, no run has."""
    store.set_meta(COMPLETE, None)


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
