"""Writing the output from the checkpoint: order, types, formats, streaming, atomic replacement."""

from __future__ import annotations

import base64
import dataclasses
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchrunner import dedupe as dedupe_module
from batchrunner import output as output_module
from batchrunner import store as store_module
from batchrunner.dedupe import Dedupe
from batchrunner.output import export
from batchrunner.pending import Batch, Todo
from batchrunner.preflight import prepare
from batchrunner.records import RESULT_SCHEMA, STORED_SCHEMA, KeptResults, RowResult
from batchrunner.request import RequestBuilder
from batchrunner.spec import load_spec
from batchrunner.store import Store


def store_answers(
    spec_path: Path, rows: list[int], models: list[str] | None = None, cost: str = "0.000001"
) -> tuple[RequestBuilder, Store]:
    """A store holding answers for some rows of the spec, in scrambled order."""
    spec = load_spec(spec_path)
    requests = RequestBuilder(spec)
    store = Store.open(spec.checkpoint_path())
    dataset = prepare(spec)
    by_index = {row.index: row for batch in dataset.batches() for row in batch}
    for index in rows:
        row = by_index[index]
        prompt = requests.prompt(row)
        for position, model in reversed(list(enumerate(models or spec.models))):
            store.add(
                RowResult(
                    index,
                    row.id,
                    position,
                    model,
                    "ok",
                    model=model,
                    response=f"answer {row.id} {model}",
                    cost_usd=Decimal(cost),
                    attempts=1,
                    fingerprint=requests.fingerprint(prompt, model),
                )
            )
    store.flush()
    return requests, store


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_output_is_in_input_then_model_order_and_omits_pending(
    write_spec: Callable[..., Path], tmp_path: Path, suffix: str
) -> None:
    """Answers stored in any order come out by input row, then by the spec's model order; unanswered rows are left out."""
    spec_path = write_spec(models=["a/one", "b/two"])
    requests, store = store_answers(spec_path, [5, 0, 2])
    target = tmp_path / f"out{suffix}"
    assert export(prepare(requests.spec), requests, store, target, batch_size=2) == 6
    frame = {".parquet": pl.read_parquet, ".csv": pl.read_csv, ".jsonl": pl.read_ndjson}[suffix](target)
    assert list(zip(frame["ticket_id"], frame["requested_model"], strict=True)) == [
        ("T-0", "a/one"),
        ("T-0", "b/two"),
        ("T-2", "a/one"),
        ("T-2", "b/two"),
        ("T-5", "a/one"),
        ("T-5", "b/two"),
    ]
    assert frame["response"][0] == "answer T-0 a/one"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file is left behind"


def test_answers_for_an_edited_prompt_are_pending(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """After the prompt changes, stored answers to the old prompt no longer count as the output."""
    _, store = store_answers(write_spec(), [0, 1])
    edited = RequestBuilder(load_spec(write_spec(prompt="Now: {text}")))
    assert export(prepare(edited.spec), edited, store, tmp_path / "out.parquet") == 0
    assert pl.read_parquet(tmp_path / "out.parquet").columns[:3] == ["ticket_id", "subject", "text"]


def test_costs_are_exact_decimals(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """cost_usd is a Decimal column: tiny costs sum without float drift."""
    requests, store = store_answers(write_spec(), list(range(12)), cost="0.0000001")
    export(prepare(requests.spec), requests, store, tmp_path / "out.parquet")
    assert pl.read_parquet(tmp_path / "out.parquet")["cost_usd"].sum() == Decimal("0.0000012")


def test_failed_write_leaves_the_previous_output(
    write_spec: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If writing fails midway, the old output stays whole and no temporary file remains."""
    requests, store = store_answers(write_spec(), [0])
    target = tmp_path / "out.parquet"
    target.write_bytes(b"previous")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pl.LazyFrame, "sink_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        export(prepare(requests.spec), requests, store, target)
    assert target.read_bytes() == b"previous"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_a_bytes_column_is_kept_and_base64_where_the_format_holds_only_text(
    write_spec: Callable[..., Path], tmp_path: Path, suffix: str
) -> None:
    """A Parquet input of image bytes: Parquet output keeps the bytes, CSV and JSONL get them as base64 text."""
    photo = b"\x89PNG\r\n\x1a\n\x00\x01"
    pl.DataFrame({"ticket_id": ["T-0", "T-1"], "text": ["a", "b"], "photo": [photo, photo]}).write_parquet(
        tmp_path / "photos.parquet"
    )
    requests, store = store_answers(write_spec(input="photos.parquet", images=["photo"]), [0, 1])
    target = tmp_path / f"out{suffix}"
    assert export(prepare(requests.spec), requests, store, target) == 2
    frame = {".parquet": pl.read_parquet, ".csv": pl.read_csv, ".jsonl": pl.read_ndjson}[suffix](target)
    expected = photo if suffix == ".parquet" else base64.b64encode(photo).decode()
    assert frame["photo"].to_list() == [expected, expected]


def test_a_new_result_column_needs_a_field_a_schema_entry_and_a_migration_only(
    write_spec: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result column added as records.py says (a RowResult field, its RESULT_SCHEMA entry, a numbered migration) is
    stored, copied whole by dedupe and written to the output in its schema place, with no edit to store or output."""

    @dataclasses.dataclass(frozen=True)
    class WithNovel(RowResult):
        novel: str | None = None  # the new field

    monkeypatch.setitem(RESULT_SCHEMA, "novel", pl.String())  # its schema entry
    monkeypatch.setitem(STORED_SCHEMA, "novel", pl.String())  # as records.py derives STORED_SCHEMA at import
    add_novel = [lambda db: db.execute("ALTER TABLE results ADD COLUMN novel TEXT")]  # the numbered migration
    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, *add_novel])
    monkeypatch.setattr(dedupe_module, "RowResult", WithNovel)  # the field would be RowResult's own
    spec = load_spec(write_spec(models=["a/one"]))
    requests = RequestBuilder(spec)
    rows = next(prepare(spec).batches())[:4]
    with Store.open(spec.checkpoint_path()) as store:
        for request in requests.for_rows(rows[:3]):
            store.add(
                WithNovel(
                    request.row.index,
                    request.row.id,
                    request.model_position,
                    request.requested_model,
                    "ok",
                    fingerprint=request.fingerprint,
                    novel=f"new {request.row.id}",
                )
            )
        store.flush()
        assert export(prepare(spec), requests, store, tmp_path / "out.parquet") == 3
        twin = dataclasses.replace(next(requests.for_rows(rows[:1])), row=rows[3])  # asks what row 0 asked
        copies = KeptResults()
        list(Dedupe(store, copies).work([Batch([Todo(twin)])]))
    frame = pl.read_parquet(tmp_path / "out.parquet")
    assert frame.columns[-len(RESULT_SCHEMA) :] == list(RESULT_SCHEMA) and frame.columns[-1] == "novel"
    assert frame["novel"].to_list() == ["new T-0", "new T-1", "new T-2"]
    (copy,) = copies
    assert isinstance(copy, WithNovel) and (copy.row_id, copy.deduped_from, copy.novel) == ("T-3", "T-0", "new T-0")


class Fetching:
    """A store whose fetch says when it starts (an event per batch), and can fail for one batch."""

    def __init__(self, failing: str | None = None) -> None:
        self.failing = failing
        self.started = {name: threading.Event() for name in "abc"}

    def fetch(self, row_ids: list[str]) -> pl.DataFrame:
        self.started[row_ids[0]].set()
        if row_ids[0] == self.failing:
            raise store_module.RunHalted("cannot read the checkpoint")
        return pl.DataFrame({"row_id": row_ids, "response": [f"answer to {r}" for r in row_ids]})


def batches_of(names: str) -> Any:
    for name in names:
        yield pl.DataFrame({"n": [1]}), pl.DataFrame({"row_id": [name]})


@pytest.mark.parametrize("ahead_bytes", [output_module.FETCH_AHEAD_MAX_BYTES, 0])
def test_answers_are_fetched_a_batch_ahead_in_order_unless_a_batch_was_large(
    monkeypatch: pytest.MonkeyPatch, ahead_bytes: int
) -> None:
    """Each batch comes with its own answers, in input order; the next batch's fetch has started by the time a
    batch is handed on, except after a batch whose answers were over FETCH_AHEAD_MAX_BYTES (two at once would
    double the peak): then it starts only once that batch has been used."""
    monkeypatch.setattr(output_module, "FETCH_AHEAD_MAX_BYTES", ahead_bytes)
    store = Fetching()
    used = []
    for _, known, stored in output_module._fetched(batches_of("abc"), store):  # type: ignore[arg-type]
        name = known["row_id"][0]
        assert stored["response"].to_list() == [f"answer to {name}"]
        following = {"a": "b", "b": "c"}.get(name)
        if following is not None:
            assert store.started[following].wait(5 if ahead_bytes else 0.2) is bool(ahead_bytes)
        used.append(name)
    assert used == ["a", "b", "c"]


def test_a_fetch_that_fails_ahead_fails_at_its_own_batch() -> None:
    """A checkpoint read that fails on the thread is raised where its batch is taken, after the batches before it."""
    used = []
    with pytest.raises(store_module.RunHalted, match="cannot read"):
        for _, known, _ in output_module._fetched(batches_of("abc"), Fetching(failing="b")):  # type: ignore[arg-type]
            used.append(known["row_id"][0])
    assert used == ["a"]
