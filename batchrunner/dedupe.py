"""Identical requests paid once: the pairs of a run whose requests are the same are sent once.

Two pairs ask the same thing when their checkpoint fingerprints match for the same requested
model: the rendered prompt, params, provider, response_format, the model chain, the server
(and the sample). `Dedupe` sits between pending() and the executor, on both sides of the
executor seam: it takes the work before it is scheduled and the results as they arrive.

- A pair whose request the checkpoint already answered for another row (an earlier run, or
  earlier in this one) is answered from there at once, with nothing sent.
- The first pair of a request not yet answered goes to the executor; later pairs of the same
  request wait for it, and are answered with a copy of its result when it arrives.

A copy says whose answer it is (`deduped_from`), costs nothing (`cost_usd` is what the copy's
own earlier attempts cost, usually 0) and counts in the summary's dedupe saving. If the run
stops before the first pair is answered, its copies stay pending, unrecorded, like it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

from batchrunner.pending import Batch, Todo
from batchrunner.records import Bill, ResultSink, RowResult
from batchrunner.store import Store

Key = tuple[str, str]  # (requested model, fingerprint)


class Dedupe:
    """Wraps the work an executor gets and the sinks its results go to. `sinks` are the run's own."""

    def __init__(self, store: Store, sinks: ResultSink) -> None:
        self.store = store
        self.sinks = sinks
        self._asked: dict[Key, str] = {}  # requests sent this run and not yet answered -> the row id asking
        self._waiting: dict[Key, list[Todo]] = {}  # pairs waiting for the answer to the same request

    # -- the work side ----------------------------------------------------------------------

    def work(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """The batches without the pairs that are copies: answered from the checkpoint now, or waiting."""
        for batch in batches:
            keyed = [(_key(todo), todo) for todo in batch.todo]
            keys = {key for key, todo in keyed if todo.request.problem is None}
            stored = self.store.answers_to(keys - self._asked.keys()) if keys else {}
            kept = []
            for key, todo in keyed:
                if todo.request.problem is not None:
                    kept.append(todo)  # it fails unsent, on its own
                elif key in stored:
                    self.sinks.add(_copy_of_stored(todo, stored[key]))
                elif key in self._asked:
                    self._waiting.setdefault(key, []).append(todo)
                else:
                    self._asked[key] = todo.request.row.id
                    kept.append(todo)
            yield dataclasses.replace(batch, todo=kept)

    # -- the results side -------------------------------------------------------------------

    def add(self, result: RowResult) -> None:
        self.sinks.add(result)
        key = (result.requested_model, result.fingerprint)
        if self._asked.get(key) != result.row_id:
            return
        del self._asked[key]
        waiting = self._waiting.pop(key, [])
        if result.status == "pending":  # the run stopped in it: its copies stay pending too
            return
        for todo in waiting:
            self.sinks.add(_copy(todo, result))

    def resumed(self, count: int) -> None:
        self.sinks.resumed(count)

    @property
    def waiting(self) -> int:
        """Pairs still waiting for an answer to copy (left pending if the run stops)."""
        return sum(len(todos) for todos in self._waiting.values())


def _key(todo: Todo) -> Key:
    return (todo.request.requested_model, todo.request.fingerprint)


def _copy(todo: Todo, paid: RowResult) -> RowResult:
    """`paid`'s answer, for another pair with the same request."""
    earlier = todo.earlier or Bill()
    return dataclasses.replace(
        paid,
        row_index=todo.request.row.index,
        row_id=todo.request.row.id,
        model_position=todo.request.model_position,
        cost_usd=earlier.cost_usd,
        upstream_cost_usd=earlier.upstream_usd,
        cost_source="deduped",
        billed_prompt_tokens=earlier.prompt_tokens,
        billed_completion_tokens=earlier.completion_tokens,
        attempts=earlier.attempts,
        latency_s=None,
        ttft_s=None,
        deduped_from=paid.row_id,
        this_run=Bill(),
        saved_usd=paid.cost_usd,
    )


def _copy_of_stored(todo: Todo, stored: dict[str, Any]) -> RowResult:
    """An answer the checkpoint holds for another row (its record by column name), for this pair: every column
    the answer has is copied, whatever columns there are; `_copy` then makes it this pair's, at no cost."""
    return _copy(todo, RowResult.from_row(stored))
