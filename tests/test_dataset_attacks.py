"""Hostile inputs for the windowed reading: each read in blocks must give what polars' whole scan gave."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchrunner import dataset
from batchrunner.dataset import ROW_INDEX, open_dataset
from batchrunner.errors import SpecError


def old_reading(path: Path) -> tuple[list[str], list[tuple[Any, ...]]] | None:
    """The reading before windows: polars' scan of the whole file, with positions; None when it refused it."""
    try:
        frame = pl.scan_csv(path, infer_schema=False).with_row_index(ROW_INDEX).collect()
    except pl.exceptions.PolarsError:
        return None
    return frame.columns, frame.rows()


def new_reading(path: Path, block_bytes: int, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[Any], int]:
    """The reading in blocks of `block_bytes`: the columns, every row of every chunk, and the checked count."""
    monkeypatch.setattr(dataset, "CSV_BLOCK_BYTES", block_bytes)
    opened = open_dataset(path, id_column=None)
    rows = [row for chunk, _ in opened.chunks(batch_size=3) for row in chunk.rows()]
    return [ROW_INDEX, *opened.columns], rows, opened.rows


@pytest.mark.parametrize("block_bytes", [1, 2, 5, 64, 8 << 20])
@pytest.mark.parametrize("blank", ["\n", "\r\n", "\n\r\n\n", "\ufeff\n"])
def test_blank_lines_before_the_header_are_skipped_in_every_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blank: str, block_bytes: int
) -> None:
    """Empty lines before a CSV's header (which polars skips) are not taken as the header of every block."""
    path = tmp_path / "in.csv"
    path.write_text(blank + "id,text\n" + "".join(f"{n},t{n}\n" for n in range(30)), encoding="utf-8")
    expected = old_reading(path)
    assert expected is not None
    columns, rows, count = new_reading(path, block_bytes, monkeypatch)
    assert (columns, rows) == expected and count == 30


def test_a_header_naming_a_column_twice_after_a_blank_line_is_refused(tmp_path: Path) -> None:
    """A blank first line does not hide a header that names a column twice (read as text_duplicated_0)."""
    path = tmp_path / "in.csv"
    path.write_text("\nid,text,text\n1,a,b\n")
    with pytest.raises(SpecError, match="'text' twice"):
        open_dataset(path, id_column="id")


def test_a_quote_left_open_in_a_large_csv_is_refused_naming_its_line_without_holding_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quote left open near the top of a CSV is refused, naming its line, once the record it opens outgrows
    CSV_RECORD_BYTES, instead of the rest of the file being gathered into one record in memory."""
    monkeypatch.setattr(dataset, "CSV_BLOCK_BYTES", 64)
    monkeypatch.setattr(dataset, "CSV_RECORD_BYTES", 1000)
    path = tmp_path / "in.csv"
    path.write_text('id,text\n0,fine\n1,"oops\n' + "".join(f"{n},text {n}\n" for n in range(2, 500)))
    with pytest.raises(SpecError, match=r"in\.csv: the record starting on line 3 runs on for more than 0 MB"):
        open_dataset(path, id_column="id")


def test_a_record_longer_than_a_block_is_searched_for_its_end_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a record that spans many blocks searches each block once for its end (not the whole record again
    at every read, which made a quote left open in a large file quadratic), and still reads it whole."""
    monkeypatch.setattr(dataset, "CSV_BLOCK_BYTES", 64)
    path = tmp_path / "in.csv"
    long = "line\n" * 4000
    path.write_text(f'id,text\n1,"{long}"\n2,b\n')
    searched: list[int] = []
    records_end = dataset._records_end

    def counting(data: bytes, *args: int) -> int:
        searched.append(len(data) - (args[0] if args else 0))
        return records_end(data, *args)

    monkeypatch.setattr(dataset, "_records_end", counting)
    opened = open_dataset(path, id_column="id")
    assert [row.values["text"] for rows in opened.batches() for row in rows] == [long, "b"]
    assert sum(searched) <= 4 * path.stat().st_size  # the checks, the ids, the rows and the header


def random_csv(seed: int) -> str:
    """A CSV with quoted commas, quotes and newlines, CRLF or LF, blank and whitespace lines, a BOM or blank lines
    before the header, short rows and no final newline, drawn from `seed` (well-formed quoting: a quote inside
    an unquoted field is read inconsistently by polars itself, see test_a_literal_quote_...)."""
    draw = random.Random(seed)
    width = draw.randint(1, 4)
    eol = draw.choice(["\n", "\r\n"])

    def cell() -> str:
        if draw.random() < 0.4:
            inner = "".join(draw.choice(["a", ",", '""', "\n", "\r\n", " ", "é"]) for _ in range(draw.randint(0, 5)))
            return f'"{inner}"'
        return "".join(draw.choice(["a", "b", " ", "é", "1", "\t", "\x00"]) for _ in range(draw.randint(0, 3)))

    lines = [",".join(f"c{n}" for n in range(width))]
    for _ in range(draw.randint(0, 10)):
        cells = [cell() for _ in range(width)]
        lines.append(",".join(cells[: draw.randint(1, width)] if draw.random() < 0.1 else cells))
        if draw.random() < 0.15:
            lines.append(draw.choice(["", "  "]))
    text = eol.join(lines) + (eol if draw.random() < 0.7 else "")
    return draw.choice(["", "", "", "\ufeff", eol, "\n\n"]) + text


@pytest.mark.parametrize("seed", range(40))
def test_random_csvs_read_in_tiny_blocks_are_what_polars_reads_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """A random CSV read in blocks of 1, 5 or 64 bytes gives polars' whole reading: columns, rows, places, count
    and digests (or is refused where it refused)."""
    path = tmp_path / "in.csv"
    path.write_text(random_csv(seed), encoding="utf-8")
    expected = old_reading(path)
    digests = None if expected is None else open_dataset(path, id_column=None).digests(1, 3, 1000)
    for block_bytes in (1, 5, 64):
        if expected is None:
            with pytest.raises(SpecError):
                new_reading(path, block_bytes, monkeypatch)
            continue
        columns, rows, count = new_reading(path, block_bytes, monkeypatch)
        assert (columns, rows, count) == (*expected, len(expected[1])), block_bytes
        assert open_dataset(path, id_column=None).digests(1, 3, 1000) == digests


def test_a_literal_quote_in_an_unquoted_field_is_refused_as_polars_refused_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`5" screen` (a quote inside an unquoted field) was refused by polars' whole reading (its row counter takes
    every quote as one, its parser not), and is refused in blocks too, never read with the records cut elsewhere."""
    path = tmp_path / "in.csv"
    path.write_text('id,text\n1,5" screen\n2,ok\n3,7" tablet\n4,fine\n')
    assert old_reading(path) is None
    for block_bytes in (1, 16, 8 << 20):
        with pytest.raises(SpecError, match=r"cannot read it as \.csv"):
            new_reading(path, block_bytes, monkeypatch)
