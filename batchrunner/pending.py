"""Which (row, model) pairs are still to answer: one generator for the executors, `status` and `estimate`.

The input is read in batches; each batch's pairs are rendered and fingerprinted
(request.py), and the checkpoint says which are already answered for the spec as it is
now (skipped), and which failed or were stopped half-way in an earlier run (to do again,
starting from what they were billed).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from batchrunner.dataset import Row
from batchrunner.errors import RunHalted, first_line
from batchrunner.records import Bill
from batchrunner.request import RequestBuilder, RowRequest
from batchrunner.store import Store
from batchrunner.urls import Location

BATCH_ROWS = 8192  # input rows per batch: one checkpoint query each, memory bounded by it
FIRST_BATCH_ROWS = 256  # the first batch is split: rendering 8,192 rows first delayed the first request ~0.1 s
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

    path: Location

    def batches(self, *, limit: int | None = None, batch_size: int = ..., start: int = 0) -> Iterator[list[Row]]: ...


def pending(
    dataset: Source,
    requests: RequestBuilder,
    store: Store | None,
    *,
    limit: int | None = None,
    batch_size: int = BATCH_ROWS,
    start: int = 0,
    on_keys: Callable[[list[RowRequest], int], None] | None = None,
    failed_only: bool = False,
) -> Iterator[Batch]:
    """The pairs of the input (its first `limit` rows; from row `start`) that the checkpoint has no answer
    for, batch by batch. `on_keys` hears each batch's pairs, answered or not, and its row count (a KeyLog)."""
    read = start
    if requests.has_media:
        batch_size = min(batch_size, MEDIA_BATCH_ROWS)
    batches = dataset.batches(limit=limit, batch_size=batch_size, start=start)
    while True:
        try:
            rows = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # the input changed under the run (it was read to its end before it began)
            raise RunHalted(
                f"reading {dataset.path.name} failed after {read} rows: {first_line(exc)}; fix the input and rerun"
            ) from exc
        first = read == start
        read += len(rows)
        if first and len(rows) > FIRST_BATCH_ROWS:  # the first requests go out before the rest are rendered
            yield _batch(rows[:FIRST_BATCH_ROWS], requests, store, on_keys, failed_only)
            rows = rows[FIRST_BATCH_ROWS:]
        yield _batch(rows, requests, store, on_keys, failed_only)


def _batch(
    rows: list[Row],
    requests: RequestBuilder,
    store: Store | None,
    on_keys: Callable[[list[RowRequest], int], None] | None,
    failed_only: bool = False,
) -> Batch:
    """These rows' pairs, less those the checkpoint has answered for the spec as it is now."""
    ids = [row.id for row in rows]
    answered = store.answered(ids) if store is not None else set()
    unfinished = store.unfinished(ids) if store is not None else {}
    batch = Batch([], rows=len(rows))
    made = list(requests.for_rows(rows))
    if on_keys is not None:
        on_keys(made, len(rows))
    for request in made:
        key = request.key
        if key in answered:
            batch.answered[request.requested_model] += 1
        elif key in unfinished:
            status, bill = unfinished[key]
            if status == "failed" or not failed_only:
                batch.todo.append(Todo(request, bill, status))
        elif not failed_only:
            batch.todo.append(Todo(request))
    return batch
