"""Which (row, model) pairs are still to answer: one generator for the executors, `status` and `estimate`.

The input is read in batches; each batch's pairs are rendered and fingerprinted
(request.py), and the checkpoint says which are already answered for the spec as it is
now (skipped), and which failed or were stopped half-way in an earlier run (to do again,
starting from what they were billed).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, Protocol

import polars as pl

from batchrunner.dataset import ROW_INDEX, Dataset, Row
from batchrunner.errors import RunHalted, first_line
from batchrunner.keylog import KEYS_SCHEMA, MODEL_POSITION, SAMPLE, keys_frame
from batchrunner.records import KEY_COLUMNS, Bill
from batchrunner.request import RequestBuilder, RowRequest
from batchrunner.store import Store, read_ahead
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
    on_keys: Callable[[pl.DataFrame, int], None] | None = None,
    failed_only: bool = False,
    settled_state: str | None = None,
) -> Iterator[Batch]:
    """The pairs of the input (its first `limit` rows; from row `start`) that the checkpoint has no answer
    for, batch by batch. `on_keys` hears each batch's pairs' keys, answered or not, and its row count (a KeyLog).

    With `settled_state` (the job's state now, rerun.unread_state; the input a Dataset, each row one pair per
    model), the answers runs of the job in that very state stored are taken by position (Store.settled): a row
    whose every pair has one is answered without being rendered, which is most of what the first rerun after a
    killed run did (bench/resume.py)."""
    if requests.has_media:
        batch_size = min(batch_size, MEDIA_BATCH_ROWS)
    one_pair_a_model = requests.spec.samples == 1 and not requests.has_media and not failed_only
    if (
        settled_state is not None
        and store is not None
        and isinstance(dataset, Dataset)
        and one_pair_a_model
        and store.ran_in(settled_state)  # else nothing is settled (a first run): no query a batch
    ):
        settled = _Settled(dataset, store, settled_state, len(requests.spec.models))
        frames = _read(dataset.path, dataset.frames(limit=limit, batch_size=batch_size, start=start))
        for frame, found in read_ahead(frames, settled.found):
            yield settled.batch(frame, found, requests, on_keys)
        return
    for rows in _read(dataset.path, dataset.batches(limit=limit, batch_size=batch_size, start=start)):
        yield _batch(rows, requests, store, on_keys, failed_only)


def _read(path: Location, chunks: Iterator[Sized]) -> Iterator[Any]:
    """The input's chunks (lists of Rows, or frames), the first one split so that its first requests go out
    before the rest are rendered; an input that fails as it is read again is a halt naming it."""
    read = 0
    while True:
        try:
            chunk: Any = next(chunks)
        except StopIteration:
            return
        except Exception as exc:  # the input changed under the run (it was read to its end before it began)
            raise RunHalted(
                f"reading {path.name} failed after {read} rows: {first_line(exc)}; fix the input and rerun"
            ) from exc
        first = read == 0
        read += len(chunk)
        if first and len(chunk) > FIRST_BATCH_ROWS:
            yield chunk[:FIRST_BATCH_ROWS]
            chunk = chunk[FIRST_BATCH_ROWS:]
        yield chunk


def _batch(
    rows: list[Row],
    requests: RequestBuilder,
    store: Store | None,
    on_keys: Callable[[pl.DataFrame, int], None] | None,
    failed_only: bool = False,
    *,
    answered_keys: pl.DataFrame | None = None,
    answered_rows: int = 0,
) -> Batch:
    """These rows' pairs, less those the checkpoint has answered for the spec as it is now. `answered_keys` are
    those of `answered_rows` more rows of the batch known answered without rendering them (_Settled)."""
    ids = [row.id for row in rows]
    answered = store.answered(ids) if store is not None and rows else set()
    unfinished = store.unfinished(ids) if store is not None and rows else {}
    batch = Batch([], rows=len(rows) + answered_rows)
    made = list(requests.for_rows(rows))
    if on_keys is not None:
        keys = keys_frame(made)
        if answered_keys is not None:
            keys = pl.concat([keys, answered_keys]).sort(ROW_INDEX, MODEL_POSITION, SAMPLE)
        on_keys(keys, batch.rows)
    if answered_keys is not None:
        batch.answered.update(dict(answered_keys.group_by("requested_model").len().iter_rows()))
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


@dataclass(frozen=True)
class _Settled:
    """The answers runs of the job in `state` stored, taken by position (Store.settled) batch by batch."""

    dataset: Dataset
    store: Store
    state: str
    models: int

    def found(self, frame: pl.DataFrame) -> pl.DataFrame:
        """What runs in that state stored for `frame`'s rows (read ahead of the batch before: store.read_ahead)."""
        if frame.is_empty():
            return frame
        positions = frame[ROW_INDEX]
        return self.store.settled(self.state, int(positions[0]), int(positions[-1]))

    def batch(
        self,
        frame: pl.DataFrame,
        found: pl.DataFrame,
        requests: RequestBuilder,
        on_keys: Callable[[pl.DataFrame, int], None] | None,
    ) -> Batch:
        """The batch of `frame`'s rows: those whose every pair was answered in that state (`found`) are answered,
        their keys the stored ones; the others go the way of every row (_batch)."""
        if frame.is_empty():
            return _batch([], requests, self.store, on_keys)
        positions = frame[ROW_INDEX]
        if found.is_empty():  # nothing stored in this state here (a first run): every row goes the long way
            return _batch(self.dataset.rows_of(frame), requests, self.store, on_keys)
        rows = pl.DataFrame(
            {"row_index": positions.cast(pl.Int64), "id": self.dataset.ids_of(frame)},
            schema={"row_index": pl.Int64, "id": pl.String},
        )
        whole = (  # the row there now is the row answered (its id), and every model's pair has its one answer
            found.join(rows, on="row_index")
            .filter(pl.col("row_id") == pl.col("id"))
            .group_by("row_index")
            .agg(pl.len(), pl.col("model_position").n_unique().alias("models"))
            .filter((pl.col("len") == self.models) & (pl.col("models") == self.models))["row_index"]
        )
        answered = found.filter(pl.col("row_index").is_in(whole.implode()))
        keys = answered.select(
            pl.col("row_index").cast(KEYS_SCHEMA[ROW_INDEX]).alias(ROW_INDEX),
            pl.col("model_position").cast(KEYS_SCHEMA[MODEL_POSITION]).alias(MODEL_POSITION),
            pl.lit(0, dtype=KEYS_SCHEMA[SAMPLE]).alias(SAMPLE),
            *KEY_COLUMNS,
        )
        rest = self.dataset.rows_of(frame.filter(~pl.col(ROW_INDEX).cast(pl.Int64).is_in(whole.implode())))
        return _batch(rest, requests, self.store, on_keys, answered_keys=keys, answered_rows=frame.height - len(rest))
