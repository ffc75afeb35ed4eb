"""Reading inputs: formats, batches, and the checks that refuse a job before it starts."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from batchrunner.dataset import open_dataset
from batchrunner.errors import SpecError

FRAME = pl.DataFrame({"id": [10, 11, 12, 13, 14], "text": ["a", "b", None, "d", "e"]})


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl", ".ndjson"])
def test_every_format_streams_rows_in_order(tmp_path: Path, suffix: str) -> None:
    """CSV, Parquet and JSONL inputs yield every row, in order, with position and id."""
    path = tmp_path / f"input{suffix}"
    {".csv": FRAME.write_csv, ".parquet": FRAME.write_parquet}.get(suffix, FRAME.write_ndjson)(path)
    dataset = open_dataset(path, id_column="id")
    rows = [row for batch in dataset.batches(batch_size=2) for row in batch]
    assert dataset.rows == 5
    assert [(r.index, r.id, r.values["text"]) for r in rows] == [
        (0, "10", "a"),
        (1, "11", "b"),
        (2, "12", None),
        (3, "13", "d"),
        (4, "14", "e"),
    ]


def test_batches_respect_limit_and_default_id_is_position(tmp_path: Path) -> None:
    """--limit stops after N rows; without id_column the id is the row's position."""
    path = tmp_path / "in.parquet"
    FRAME.write_parquet(path)
    rows = [row for batch in open_dataset(path, id_column=None).batches(limit=3) for row in batch]
    assert [r.id for r in rows] == ["0", "1", "2"]


def test_missing_id_column_is_refused(tmp_path: Path) -> None:
    """An id_column that is not in the input is refused."""
    path = tmp_path / "in.csv"
    FRAME.write_csv(path)
    with pytest.raises(SpecError, match="id_column: 'ticket' is not an input column"):
        open_dataset(path, id_column="ticket")


def test_duplicate_ids_are_refused_and_shown(tmp_path: Path) -> None:
    """Duplicate id values are refused, showing some of them."""
    path = tmp_path / "in.csv"
    pl.DataFrame({"id": [1, 2, 2, 3, 3], "text": list("abcde")}).write_csv(path)
    with pytest.raises(SpecError, match=r"duplicate values \(2, 3\)"):
        open_dataset(path, id_column="id")


def test_null_ids_are_refused(tmp_path: Path) -> None:
    """A row without an id cannot be checkpointed or joined, so it is refused."""
    path = tmp_path / "in.csv"
    pl.DataFrame({"id": [1, None, 3], "text": list("abc")}).write_csv(path)
    with pytest.raises(SpecError, match="empty in 1 row"):
        open_dataset(path, id_column="id")


def test_missing_and_unreadable_inputs_are_refused(tmp_path: Path) -> None:
    """A missing file and a file that is not what its extension says are SpecErrors."""
    with pytest.raises(SpecError, match="no such file"):
        open_dataset(tmp_path / "absent.csv", id_column=None)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet")
    with pytest.raises(SpecError, match=r"cannot read it as \.parquet"):
        open_dataset(broken, id_column=None)
