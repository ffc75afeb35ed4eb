"""Which (row, model) pairs are still to answer: one generator for the executors, `status` and `estimate`.

The input is read in batches; each batch's pairs are rendered and fingerprinted
(request.py), and the checkpoint says which are already answered for the spec as it is
now (skipped), and which failed or were stopped half-way in an earlier run (to do again,
starting from what they were billed).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from batchrunner.dataset import Row
from batchrunner.errors import RunHalted, first_line
from batchrunner.records import RESULT_SCHEMA, Bill
from batchrunner.request import RequestBuilder, RowRequest
from batchrunner.spec import JobSpec
from batchrunner.store import MIGRATIONS, Store

BATCH_ROWS = 8192  # input rows per batch: one checkpoint query each, memory bounded by it
MEDIA_BATCH_ROWS = 64  # with media: a batch's files are hashed in one go on the event loop (and bytes cells held)


@dataclass(frozen=True, slots=True)
class Todo:
    """A pair to answer, with what earlier runs already spent on it."""

    request: RowRequest
    earlier: Bill | None = None  # the bill of an earlier failed or unfinished attempt at this exact request
    earlier_status: str | None = None  # "failed" or "pending" (stopped half-way), with `earlier`


@dataclass
class Batch:
    """One batch of input rows: the pairs still to answer, and how many per model were answered already."""

    todo: list[Todo]
    answered: collections.Counter[str] = field(default_factory=collections.Counter)  # per requested model
    rows: int = 0  # input rows read in this batch


class Source(Protocol):
    """What pending() reads rows from: an input file (dataset.Dataset), or answers to grade (judging.Items)."""

    path: Path

    def batches(self, *, limit: int | None = None, batch_size: int = ...) -> Iterator[list[Row]]: ...


def pending(
    dataset: Source,
    requests: RequestBuilder,
    store: Store | None,
    *,
    limit: int | None = None,
    batch_size: int = BATCH_ROWS,
) -> Iterator[Batch]:
    """The pairs of the input (its first `limit` rows) that the checkpoint has no answer for, batch by batch."""
    read = 0
    if requests.has_media:
        batch_size = min(batch_size, MEDIA_BATCH_ROWS)
    batches = dataset.batches(limit=limit, batch_size=batch_size)
    while True:
        try:
            rows = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # the input changed under the run (it was read to its end before it began)
            raise RunHalted(
                f"reading {dataset.path.name} failed after {read} rows: {first_line(exc)}; fix the input and rerun"
            ) from exc
        read += len(rows)
        ids = [row.id for row in rows]
        answered = store.answered(ids) if store is not None else set()
        unfinished = store.unfinished(ids) if store is not None else {}
        batch = Batch([], rows=len(rows))
        for request in requests.for_rows(rows):
            key = request.key
            if key in answered:
                batch.answered[request.requested_model] += 1
            elif key in unfinished:
                status, bill = unfinished[key]
                batch.todo.append(Todo(request, bill, status))
            else:
                batch.todo.append(Todo(request))
        yield batch


# -- a job unchanged since a run that left nothing to do ----------------------------------------

COMPLETE = "complete"  # the checkpoint's record of the last run that left every pair answered
NOT_REQUEST_SHAPING = {  # spec fields that change how a run goes, never which pairs there are or the output
    "concurrency",
    "timeout_s",
    "unreachable_timeout_s",
    "rate_limit",
    "free_requests_per_day",
    "retry",
    "budget_usd",
    "batch",
    "mode",
}


def job_state(spec: JobSpec, requests: RequestBuilder) -> str | None:
    """A digest of everything that decides the job's pairs and its output: the spec's request-shaping fields,
    the server, the input file as the filesystem knows it (size, times to the nanosecond, inode; its change
    time cannot be set back by hand), and the output's columns. None when it cannot be known without reading
    every row: media files (they change on their own), judges (graded later)."""
    if requests.has_media or (spec.evaluate is not None and spec.evaluate.judges()):
        return None
    try:
        found = os.stat(spec.input)
    except OSError:
        return None
    state = {
        "spec": spec.model_dump(mode="json", exclude=NOT_REQUEST_SHAPING),
        "server": requests.server,
        "input": [str(spec.input.resolve()), found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino],
        "columns": [*RESULT_SCHEMA, len(MIGRATIONS)],
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def nothing_left(store: Store, spec: JobSpec, state: str | None) -> dict[str, Any] | None:
    """What the last complete run recorded (answers per model, output rows, whether the output is still
    the file it wrote), if the job is unchanged since: then no pair needs reading, rendering or hashing."""
    if state is None:
        return None
    text = store.meta(COMPLETE)
    record = json.loads(text) if text else None
    if not isinstance(record, dict) or record.get("state") != state:
        return None
    record["output_unchanged"] = record.get("output") == _output_stat(spec)
    return record


def mark_complete(store: Store, spec: JobSpec, state: str | None, answered: dict[str, int], written: int) -> None:
    """Record that every pair of the job, as it is now, is answered, and the output just written."""
    if state is not None:
        record = {"state": state, "answered": answered, "written": written, "output": _output_stat(spec)}
        store.set_meta(COMPLETE, json.dumps(record))


def _output_stat(spec: JobSpec) -> list[object] | None:
    try:
        found = os.stat(spec.output)
    except OSError:
        return None
    return [found.st_size, found.st_mtime_ns, found.st_ino]
