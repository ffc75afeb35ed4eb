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

`batchrunner status` asks the same question without reading the input at all (`unchanged`): the record also
holds the job's state in terms known before the input is opened (`unread`: the spec, the server, the input
file's identity, the checkpoint's schema, the versions of batchrunner and polars, which decide how the input is
read), so an unchanged job is told from the record and the input's stat, without importing polars. This module
imports polars only where a state is made from a read input (`job_state`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from batchrunner.files import identity
from batchrunner.spec import RUN_ONLY_KEYS
from batchrunner.store import MIGRATIONS
from batchrunner.urls import ObjectURL

if TYPE_CHECKING:
    from batchrunner.dataset import Dataset
    from batchrunner.request import RequestBuilder
    from batchrunner.spec import JobSpec
    from batchrunner.store import Store

COMPLETE = "complete"  # the checkpoint's record of the last run that left every pair answered


@dataclass(frozen=True)
class JobState:
    """The job as it is at the start of a run, in the terms `mark_complete` records and `last_run` compares."""

    whole: str  # the spec's request-shaping fields, the server, the input file's identity, the output's columns
    shape: str  # the same without the input file: what must hold for appended rows to be all that changed
    rows: int  # the input's rows
    digest: str  # the content of every row, with its position (Dataset.digests)
    unread: str  # `whole`, in terms known without reading the input (`unread_state`): what `status` compares


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
    import polars as pl

    from batchrunner.records import RESULT_SCHEMA

    if (known := _unread(spec, requests.server)) is None:
        return None
    spec_fields, where, unread = known
    shape = {
        "spec": spec_fields,
        "server": requests.server,
        "columns": [*RESULT_SCHEMA, len(MIGRATIONS)],
        "input_columns": [[name, str(dtype)] for name, dtype in dataset.frame.collect_schema().items()],
        "polars": pl.__version__,  # whose row hash the digest is
    }
    whole = {
        **shape,
        "input": where,
    }
    return JobState(_digest(whole), _digest(shape), dataset.rows, dataset.digest, unread)


def unread_state(spec: JobSpec, server: str) -> str | None:
    """The job's state as far as it is known without reading the input (the `unread` of `job_state`, which
    `unchanged` compares); None when `job_state` would be None."""
    known = _unread(spec, server)
    return None if known is None else known[2]


def _unread(spec: JobSpec, server: str) -> tuple[dict[str, Any], list[Any], str] | None:
    """The spec's request-shaping fields, the input's identity, and the digest of those with everything else
    that decides the input's rows and the checkpoint's columns without reading them: the server, the checkpoint's
    schema (a result column is added by a migration), and the versions of batchrunner and polars (how a file is
    read into columns). None when the job's state cannot be known without reading every row: media files (they
    change on their own), judges (graded after the answers), an input that cannot be found or is no one file (a
    folder of Parquet files keeps its size, times and inode when a file in it is rewritten)."""
    if spec.prompt_template().media_kinds or (spec.evaluate is not None and spec.evaluate.judges()):
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
        if not stat.S_ISREG(found.st_mode):  # a folder (of Parquet parts): its stat holds when a part is rewritten
            return None
        where = [str(spec.input.resolve()), found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino]
    spec_fields = spec.model_dump(mode="json", exclude=set(RUN_ONLY_KEYS))
    unread = {
        "spec": spec_fields,
        "server": server,
        "schema": len(MIGRATIONS),
        "versions": [_version("batchrunner"), _version("polars")],
        "input": where,
    }
    return spec_fields, where, _digest(unread)


def last_run(store: Store, spec: JobSpec, state: JobState | None, dataset: Dataset) -> LastRun | None:
    """What the last complete run left, if the job is as it left it (unchanged) or only has rows appended
    (grown); None otherwise, or when there was none."""
    if state is None or (record := _record(store.meta(COMPLETE))) is None:
        return None
    if _unchanged(record, state.unread, state.whole):
        return _left(record, spec, state.rows, grown=False)
    rows = record.get("rows")
    if (
        record.get("shape") == state.shape
        and isinstance(rows, int)
        and 0 < rows < state.rows
        and dataset.digests(rows)[0] == record.get("digest")
    ):
        return _left(record, spec, rows, grown=True)
    return None


def unchanged(recorded: str | None, spec: JobSpec, server: str) -> LastRun | None:
    """What `last_run` says of a job the last complete run left unchanged, told without reading the input (for
    `status`): `recorded` is the checkpoint's record (`Store.meta(COMPLETE)`, or `Store.peek`). None when that
    cannot be told so (no record, one written before `unread` was kept, anything changed): then only `last_run`,
    after reading the input, can tell (rows appended, or the long way)."""
    if (record := _record(recorded)) is None or not isinstance(rows := record.get("rows"), int):
        return None
    if not _unchanged(record, unread_state(spec, server)):
        return None
    return _left(record, spec, rows, grown=False)


def _unchanged(record: dict[str, Any], unread: str | None, whole: str | None = None) -> bool:
    """The job is as the record's run left it: its whole state is as recorded, or its unread state is (known
    without reading the input; the same whenever the whole state is, since the input's columns follow from the
    input file, the spec and the versions it holds). The one rule of `last_run` and `unchanged`."""
    if whole is not None and record.get("state") == whole:
        return True
    return unread is not None and record.get("unread") == unread


def _record(recorded: str | None) -> dict[str, Any] | None:
    """The record `mark_complete` wrote, its counts read; None for none, or for one that is not what this module
    writes (edited, damaged): no record, and the long way is safe."""
    try:
        record = json.loads(recorded or "null")
        answered = {str(model): int(count) for model, count in dict(record["answered"]).items()}
        return {**record, "answered": answered, "written": int(record["written"])}
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _left(record: dict[str, Any], spec: JobSpec, rows: int, *, grown: bool) -> LastRun:
    """What the last complete run left, from its record (read by `_record`)."""
    output_unchanged = record.get("output") == identity(spec.output)
    return LastRun(rows, record["answered"], record["written"], output_unchanged, grown=grown)


def mark_complete(store: Store, spec: JobSpec, state: JobState | None, answered: dict[str, int], written: int) -> None:
    """Record that every pair of the job, as it was at the start of this run, is answered, and the output
    just written."""
    if state is not None:
        record: dict[str, Any] = {
            "state": state.whole,
            "shape": state.shape,
            "rows": state.rows,
            "digest": state.digest,
            "unread": state.unread,
            "answered": answered,
            "written": written,
            "output": identity(spec.output),
        }
        store.set_meta(COMPLETE, json.dumps(record))


def forget(store: Store) -> None:
    """Until this run ends with every pair answered, no run has."""
    store.set_meta(COMPLETE, None)


@functools.cache
def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:  # a source tree never installed: the other parts still tell a change
        return None


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
