"""Reading inputs: formats, batches, and the checks that refuse a job before it starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchrunner import dataset
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
    with pytest.raises(SpecError, match=r"duplicate values \('2', '3'\)"):
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


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_values_are_read_as_written_whatever_comes_below(tmp_path: Path, suffix: str) -> None:
    """Zero-padded ids and zip codes keep their zeros, and a 2.5 appended below does not turn 1 into 1.0."""
    rows = [{"id": "0001", "zip": "02134", "score": 1}, {"id": "0002", "zip": "10001", "score": 3}]
    path = tmp_path / f"in{suffix}"

    def write(rows: list[dict[str, object]]) -> None:
        if suffix == ".csv":
            path.write_text("id,zip,score\n" + "".join(f"{r['id']},{r['zip']},{r['score']}\n" for r in rows))
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def read() -> list[tuple[str, dict[str, object]]]:
        return [(row.id, row.values) for batch in open_dataset(path, id_column="id").batches() for row in batch]

    write(rows)
    before = read()
    write([*rows, {"id": "A100", "zip": "x", "score": 2.5}])
    after = read()
    assert after[:2] == before
    assert before[0][0] == "0001"
    assert before[0][1]["zip"] == "02134" and before[0][1]["score"] == "1"


def test_a_row_that_breaks_late_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    """A CSV whose 12,001st line is malformed, or that is not UTF-8, is refused when opened, naming the fix."""
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("id,text\n" + "".join(f"{i},text {i}\n" for i in range(12_000)) + "12000,a,b,c\n")
    with pytest.raises(SpecError, match="more fields than the header"):
        open_dataset(ragged, id_column="id")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"id,text\n" + b"".join(b"%d,ok\n" % i for i in range(12_000)) + b"12000,caf\xe9\n")
    with pytest.raises(SpecError, match="not UTF-8 text; re-save it as UTF-8"):
        open_dataset(latin1, id_column="id")


def test_a_jsonl_key_that_first_appears_late_is_a_column(tmp_path: Path) -> None:
    """A key seen only after the first 10,000 lines is still read (not silently dropped from the output)."""
    path = tmp_path / "in.jsonl"
    path.write_text(
        "".join(json.dumps({"id": i}) + "\n" for i in range(10_500)) + json.dumps({"id": 10_500, "late": "x"}) + "\n"
    )
    dataset = open_dataset(path, id_column="id")
    assert dataset.columns == ["id", "late"] and dataset.rows == 10_501


def test_digests_name_the_rows_and_their_places_whatever_the_format(tmp_path: Path) -> None:
    """The digest of a file's first n rows equals that of a file of only those rows, in any format; a changed
    cell, or two rows swapped, changes it."""
    rows = {"id": [f"r{i}" for i in range(50)], "text": [f"text {i}" for i in range(50)]}
    pl.DataFrame(rows).write_csv(tmp_path / "all.csv")
    pl.DataFrame(rows).head(40).write_ndjson(tmp_path / "first.jsonl")
    swapped = {name: [*values[:10], values[11], values[10], *values[12:40]] for name, values in rows.items()}
    pl.DataFrame(swapped).write_csv(tmp_path / "swapped.csv")
    edited = {"id": rows["id"][:40], "text": [*rows["text"][:39], "text 39!"]}
    pl.DataFrame(edited).write_csv(tmp_path / "edited.csv")

    def digest(name: str, rows: int) -> str:
        return open_dataset(tmp_path / name, id_column="id").digests(rows)[0]

    assert digest("all.csv", 40) == digest("first.jsonl", 40) != digest("all.csv", 50)
    assert digest("swapped.csv", 40) != digest("first.jsonl", 40) != digest("edited.csv", 40)
    assert digest("edited.csv", 39) == digest("all.csv", 39)
    whole = open_dataset(tmp_path / "all.csv", id_column="id")
    assert whole.digest == digest("all.csv", 50), "the checking pass computes the whole file's digest on the way"


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    """A header that names a column twice is refused, naming the file and the column, instead of polars
    renaming the second one (`text_duplicated_0`) so that `{text}` quietly means the first."""
    path = tmp_path / "in.csv"
    path.write_text('id,text,"te\nxt",text\n1,first,x,second\n')
    with pytest.raises(SpecError) as refused:
        open_dataset(path, id_column="id")
    message = str(refused.value)
    assert str(path) in message and "'text' twice (columns 2 and 4)" in message
    unique = tmp_path / "unique.csv"
    unique.write_text("id,text,text_duplicated_0,,\n1,a,b,c,d\n")  # a name like polars' renaming is a name
    assert open_dataset(unique, id_column="id").columns[:3] == ["id", "text", "text_duplicated_0"]


@pytest.mark.parametrize("block_bytes", [8 << 20, 16])
def test_a_jsonl_value_with_a_lone_surrogate_is_refused_naming_its_line_and_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    """A lone UTF-16 surrogate escape (which polars reads as NUL, or fails on) is refused, naming each line and
    column, so no id or prompt is ever changed; a surrogate pair and an escaped backslash are read exactly (the
    file read in blocks of 8 MB, or of 16 bytes, shorter than its lines)."""
    monkeypatch.setattr(dataset, "SCAN_BYTES", block_bytes)
    path = tmp_path / "in.jsonl"
    lines = [
        r'{"id": "pair\ud83d\ude00", "text": "a"}',
        r'{"id": "slash\\ud800", "text": "b"}',
        r'{"id": "nul\u0000", "text": "c"}',
        r'{"id": "bad\ud800x", "text": "d"}',
        r'{"id": "e", "text": {"deep": ["\udc00"]}}',
    ]
    path.write_text("\n".join(lines[:3]) + "\n")
    assert [row.id for rows in open_dataset(path, id_column="id").batches() for row in rows] == [
        "pair\U0001f600",
        "slash\\ud800",
        "nul\x00",
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecError) as refused:
        open_dataset(path, id_column="id")
    assert [str(problem) for problem in refused.value.problems] == [
        f"input: {path}:4: the value of 'id' holds \\ud800, a lone UTF-16 surrogate that no text can hold, so it "
        "could not be kept as written; write the character it stands for (or remove it) on that line",
        f"input: {path}:5: the value of 'text' holds \\udc00, a lone UTF-16 surrogate that no text can hold, so it "
        "could not be kept as written; write the character it stands for (or remove it) on that line",
    ]


WINDOW_CASES = [  # (limit, start, batch_size, selected): every boundary a window, a batch or a slice can fall on
    (None, 0, 7, False),
    (None, 0, 5, False),
    (None, 13, 4, False),
    (20, 3, 6, False),
    (5, 0, 100, False),
    (None, 49, 3, False),
    (None, 50, 3, False),
    (None, 0, 4, True),
    (None, 2, 3, True),
    (11, 1, 2, True),
    (40, 0, 100, True),
]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
@pytest.mark.parametrize(("limit", "start", "batch_size", "selected"), WINDOW_CASES)
def test_rows_read_in_windows_are_the_rows_a_whole_read_gives(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    suffix: str,
    limit: int | None,
    start: int,
    batch_size: int,
    selected: bool,
) -> None:
    """Reading a Parquet input by slices of a few rows (and a CSV one in batches) gives the same rows, ids and
    places, in the same batches, as cutting the whole input does, whatever the limit, start and selection."""
    monkeypatch.setattr(dataset, "WINDOW_ROWS", 4)
    path = tmp_path / f"in{suffix}"
    whole = pl.DataFrame({"id": [f"r{n}" for n in range(50)], "text": [f"t{n % 7}" for n in range(50)]})
    whole.write_parquet(path, row_group_size=6) if suffix == ".parquet" else whole.write_csv(path)
    opened = open_dataset(path, id_column="id")
    expected = list(range(50))
    if selected:
        opened = opened.only(pl.col("text") != "t3", rows=0)
        expected = [n for n in expected if n % 7 != 3]
    expected = expected[:limit][start:]
    batches = list(opened.batches(limit=limit, batch_size=batch_size, start=start))
    assert [[row.index for row in batch] for batch in batches] == [
        expected[at : at + batch_size] for at in range(0, len(expected), batch_size)
    ]
    assert [row.id for batch in batches for row in batch] == [f"r{n}" for n in expected]
    assert all(row.values == {"id": f"r{row.index}", "text": f"t{row.index % 7}"} for b in batches for row in b)


def test_a_parquet_input_is_decoded_a_window_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Parquet input is never handed to polars' batched reader, which decodes ahead of a slow reader until it
    holds the whole input (pola-rs/polars#28569): every frame collected from it is one window of rows."""
    path = tmp_path / "in.parquet"
    pl.DataFrame({"id": [str(n) for n in range(100)]}).write_parquet(path, row_group_size=10)
    opened = open_dataset(path, id_column="id")
    collected: list[int] = []
    real_collect = pl.LazyFrame.collect

    def collect(frame: pl.LazyFrame, *args: object, **kwargs: object) -> pl.DataFrame:
        found = real_collect(frame, *args, **kwargs)  # type: ignore[arg-type]
        collected.append(found.height)
        return found

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("collect_batches decodes ahead of its reader")

    monkeypatch.setattr(pl.LazyFrame, "collect", collect)
    monkeypatch.setattr(pl.LazyFrame, "collect_batches", refused)
    monkeypatch.setattr(dataset, "WINDOW_ROWS", 16)
    monkeypatch.setattr(dataset, "WINDOW_BYTES", 1)  # no room for longer windows
    assert sum(len(batch) for batch in opened.batches(batch_size=8)) == 100
    assert collected and max(collected) <= 16


def windows_read(opened: Any, monkeypatch: pytest.MonkeyPatch) -> list[pl.DataFrame]:
    """The windows `opened` (a Dataset) is decoded in from now on, each as read."""
    windows: list[pl.DataFrame] = []
    real_windows = dataset._windows

    def counted(*args: Any, **kwargs: Any) -> Any:
        for window in real_windows(*args, **kwargs):
            windows.append(window)
            yield window

    monkeypatch.setattr(dataset, "_windows", counted)
    return windows


def test_short_rows_are_decoded_in_windows_as_long_as_window_bytes_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Parquet input's windows hold as many rows as WINDOW_BYTES does of its longest row (the checking pass
    measures it), at least WINDOW_ROWS: a slice decodes each row group it touches whole, and short rows in
    16,384-row windows decoded each group many times over (1M rows: 4 s of a rerun's 11). Every row is read
    once, in order."""
    path = tmp_path / "in.parquet"
    pl.DataFrame({"id": [str(n) for n in range(1000)]}).write_parquet(path, row_group_size=300)
    opened = open_dataset(path, id_column="id")
    assert opened.row_bytes == 8 + 3  # the row's position, and the longest id
    monkeypatch.setattr(dataset, "WINDOW_ROWS", 16)
    monkeypatch.setattr(dataset, "WINDOW_BYTES", 400 * 11)
    windows = windows_read(opened, monkeypatch)
    ids = [row.id for batch in opened.batches(batch_size=16) for row in batch]
    assert ids == [str(n) for n in range(1000)]
    assert [window.height for window in windows] == [400, 400, 200]


def test_a_parquet_window_after_short_rows_holds_no_more_than_window_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows empty at first and long later (a column filled in later rows only) do not make a long window of long
    rows: windows are sized by the longest row, so here they keep WINDOW_ROWS rows. A size guessed from the first
    window held 30,000 rows of 2 KB, ~58 MB (found by a hostile review)."""
    path = tmp_path / "skewed.parquet"
    short, long = dataset.WINDOW_ROWS, 30_000
    texts = [""] * short + ["y" * 2000] * long
    pl.DataFrame({"id": [f"r{i}" for i in range(short + long)], "text": texts}).write_parquet(path)
    opened = open_dataset(path, id_column="id")
    windows = windows_read(opened, monkeypatch)
    assert sum(len(batch) for batch in opened.batches(batch_size=8192)) == short + long
    assert [window.height for window in windows] == [
        dataset.WINDOW_ROWS,
        dataset.WINDOW_ROWS,
        long + short - 2 * dataset.WINDOW_ROWS,
    ]


TRICKY_CSV = [  # each a CSV whose records a naive cut at newlines would get wrong, or whose edges polars trims
    'id,text\n1,"a\nb"\n2,"c ""quoted""\nd"\n3,plain\n',
    '\ufeffid,text\r\n1,crlf\r\n2,"x\r\ny"\r\n',
    "id,text\n1,a\n\n2,b\n\n\n3,c",
    "id,text\n1,a\n\n",
    'id,"multi\nline header"\n1,"a,b"\n2,""\n3,\n',
    "id,text\n" + "".join(f'{n},"{"q" * (n % 13)}\n{n}"\n' for n in range(200)),
    'id,text\n1,"""\n"""\n2,"\n\n"\n',
    "id,text\n",
]


@pytest.mark.parametrize("block_bytes", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("content", TRICKY_CSV)
def test_a_csv_read_in_blocks_is_the_csv_polars_reads_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str, block_bytes: int
) -> None:
    """A CSV read a few bytes at a time (records cut only at newlines outside quotes, the header before each
    block) gives the rows, cells, row count and digest that polars' reading of the whole file gives, quoted
    newlines, CRLF, a BOM, blank lines and a missing final newline included."""
    path = tmp_path / "in.csv"
    path.write_text(content, encoding="utf-8")
    whole = pl.read_csv(path, infer_schema=False)
    expected_digest = open_dataset(path, id_column=None).digest  # (read in blocks of the default size)
    monkeypatch.setattr(dataset, "CSV_BLOCK_BYTES", block_bytes)
    opened = open_dataset(path, id_column=None)
    rows = [row.values for batch in opened.batches(batch_size=5) for row in batch]
    assert rows == whole.to_dicts()
    assert opened.rows == whole.height
    assert opened.digest == expected_digest
    assert opened.digests(2, 3) == open_dataset(path, id_column=None).digests(2, 3)


def test_a_csv_is_never_parsed_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CSV input is parsed a block at a time: polars' scan, which holds the whole file in memory as it reads,
    never reads its rows (its first line alone, for the header)."""
    path = tmp_path / "in.csv"
    path.write_text("id,text\n" + "".join(f"{n},text {n}\n" for n in range(2000)))
    monkeypatch.setattr(dataset, "CSV_BLOCK_BYTES", 1000)
    parsed: list[int] = []
    read_csv = pl.read_csv

    def counting(source: object, *args: object, **kwargs: object) -> pl.DataFrame:
        found = read_csv(source, *args, **kwargs)  # type: ignore[arg-type]
        parsed.append(found.height)
        return found

    monkeypatch.setattr(pl, "read_csv", counting)
    opened = open_dataset(path, id_column="id")
    assert sum(len(batch) for batch in opened.batches(batch_size=100)) == 2000
    assert parsed and max(parsed) < 100


def test_a_csv_is_never_handed_to_polars_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening, checking and reading a CSV input never calls polars' CSV scan: even for the columns, a scan reads
    the whole file (and downloads a whole object from S3, GCS or Azure) before it says what they are."""
    path = tmp_path / "in.csv"
    path.write_text("id,text\n" + "".join(f"{n},text {n}\n" for n in range(50)))

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("polars' scan_csv reads the whole input")

    monkeypatch.setattr(pl, "scan_csv", refused)
    opened = open_dataset(path, id_column="id")
    assert opened.columns == ["id", "text"] and opened.rows == 50
    assert sum(len(batch) for batch in opened.batches(batch_size=16)) == 50


@pytest.mark.parametrize(
    ("lines", "number", "what"),
    [
        (['{"id": 1, "text": "a"}', '{"id": 2, "text": "b"}', "garbage"], 3, "not JSON"),
        (['{"id": 1, "text": "a"}', "garbage", '{"id": 2, "text": "b"}'], 2, "not JSON"),
        (['{"id": 1, "text": "a"}', "", '{"id": 2, "text": "b"}', '{"id": 3, "text": "c'], 4, "not JSON"),
        (['{"id": 1, "text": "a"},', '{"id": 2, "text": "b"},'], 1, "not JSON"),
        (['{"id": 1, "text": "a"}', "[1, 2]"], 2, "not a JSON object"),
    ],
)
def test_a_jsonl_line_that_is_not_a_json_object_is_refused_naming_its_line(
    tmp_path: Path, lines: list[str], number: int, what: str
) -> None:
    """A JSONL input with a garbage line (a trailing one, a cut-off last line, a comma after each object) is
    refused naming that line, as the README promises of a bad input. Before: polars' own words alone, such as
    `InternalError(TapeError) at character 0 ('g')`, which name no line of a file of a million."""
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(SpecError) as refused:
        open_dataset(path, id_column="id")
    (problem,) = refused.value.problems
    assert problem.where == "input"
    assert problem.message.startswith(f"{path}:{number}: {what}")
    assert "each line must be one JSON object" in problem.message


@pytest.mark.parametrize(("separator", "named"), [(";", "';'"), ("\t", "tabs")])
@pytest.mark.parametrize("id_column", ["id", None])
def test_a_csv_separated_by_semicolons_or_tabs_is_refused_saying_so(
    tmp_path: Path, separator: str, named: str, id_column: str | None
) -> None:
    """A European spreadsheet's CSV export (`id;text`) is one column to a comma reader. Before: `'id' is not an
    input column; the input has: id;text`, an 'id' the user can see in the list, or the job ran with every
    prompt's placeholder missing. Now the input is refused saying it is separated by something else, and the fix."""
    path = tmp_path / "in.csv"
    path.write_text(f"id{separator}text\n1{separator}a\n2{separator}b\n")
    with pytest.raises(SpecError) as refused:
        open_dataset(path, id_column=id_column)
    (problem,) = refused.value.problems
    assert problem.where == "input"
    assert f"separated by {named}" in problem.message and "re-save it with commas" in problem.message
    one = tmp_path / "one.csv"
    one.write_text('text\n"semi; colons, tabs\t"\n')  # a lone column whose name has none is a column
    assert open_dataset(one, id_column=None).columns == ["text"]
