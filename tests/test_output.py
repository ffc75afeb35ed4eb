"""Writing the output: order, types, formats, and atomic replacement."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from batchrunner.dataset import open_dataset
from batchrunner.output import write_output
from batchrunner.records import RowResult


def result(row: int, position: int, model: str, cost: str = "0.000001") -> RowResult:
    return RowResult(
        row_index=row,
        row_id=str(row),
        model_position=position,
        requested_model=model,
        status="ok",
        model=model,
        response=f"r{row}{model}",
        cost_usd=Decimal(cost),
        attempts=1,
    )


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_output_is_in_input_then_model_order_and_omits_pending(tmp_path: Path, suffix: str) -> None:
    """Results given in any order come out by input row, then by the spec's model order; unanswered rows are left out."""
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": ["a", "b", "c"], "text": ["x", "y", "z"]}).write_csv(source)
    dataset = open_dataset(source, id_column="id")
    results = [result(2, 1, "m2"), result(0, 1, "m2"), result(2, 0, "m1"), result(0, 0, "m1")]
    target = tmp_path / f"out{suffix}"
    assert write_output(dataset, results, target) == 4
    frame = {".parquet": pl.read_parquet, ".csv": pl.read_csv, ".jsonl": pl.read_ndjson}[suffix](target)
    assert list(zip(frame["id"], frame["requested_model"], strict=True)) == [
        ("a", "m1"),
        ("a", "m2"),
        ("c", "m1"),
        ("c", "m2"),
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary file is left behind"


def test_costs_are_exact_decimals(tmp_path: Path) -> None:
    """cost_usd is a Decimal column: a thousand tiny costs sum without float drift."""
    source = tmp_path / "in.parquet"
    pl.DataFrame({"n": list(range(1000))}).write_parquet(source)
    dataset = open_dataset(source, id_column=None)
    target = tmp_path / "out.parquet"
    write_output(dataset, [result(i, 0, "m", "0.0000001") for i in range(1000)], target)
    assert pl.read_parquet(target)["cost_usd"].sum() == Decimal("0.0001")


def test_failed_write_leaves_the_previous_output(tmp_path: Path) -> None:
    """If writing fails midway, the old output stays whole and no temporary file remains."""
    source = tmp_path / "in.csv"
    pl.DataFrame({"id": ["a"]}).write_csv(source)
    target = tmp_path / "out.parquet"
    target.write_bytes(b"previous")
    dataset = open_dataset(source, id_column=None)
    with pytest.raises(TypeError):
        write_output(dataset, [result(0, 0, "m", cost=object())], target)  # type: ignore[arg-type]
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.parquet"]
