"""What each complete evaluation run answered, kept to be compared with later (`report --baseline`).

The checkpoint keeps one answer per request, and an unchanged rerun asks nothing, so last
week's run must be kept to be compared with. When a run of a job with `evaluate:` ends with every
pair answered or failed, its rows are written to `<checkpoint>.runs/<N>-<UTC time>.parquet`: each
row's id and input position, requested model, sample, status, scores, the model and provider that
served it, cost and latency (no answers, no inputs: small). `status` lists them; a baseline is
`run:N`, a date (the last run that day or before), another job's spec (its checkpoint's answers),
or an output file an earlier run wrote.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batchrunner.errors import Problem, SpecError, first_line
from batchrunner.files import replacing

if TYPE_CHECKING:  # polars where a snapshot is written or read: `status` lists them without it
    import polars as pl

    from batchrunner.spec import JobSpec

KEPT = ("requested_model", "sample", "status", "model", "provider", "cost_usd", "latency_s")
NAME = re.compile(r"(\d+)-(\d{8}T\d{6}Z)\.parquet")


@dataclass(frozen=True)
class Snapshot:
    number: int
    finished: dt.datetime  # UTC
    path: Path

    @property
    def label(self) -> str:
        return f"run:{self.number} ({self.finished:%Y-%m-%d %H:%M} UTC)"


def folder(spec: JobSpec) -> Path:
    checkpoint = spec.checkpoint_path()
    return checkpoint.with_name(checkpoint.stem + ".runs")


def listed(spec: JobSpec) -> list[Snapshot]:
    """The job's snapshots, oldest first."""
    found = []
    place = folder(spec)
    for path in place.iterdir() if place.is_dir() else []:
        if (match := NAME.fullmatch(path.name)) is not None:
            finished = dt.datetime.strptime(match[2], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
            found.append(Snapshot(int(match[1]), finished, path))
    return sorted(found, key=lambda snapshot: snapshot.number)


def record(spec: JobSpec, frame: pl.DataFrame, score_columns: list[str], now: dt.datetime | None = None) -> Snapshot:
    """Keep what a complete run answered (the output frame with ROW_INDEX) as the job's next snapshot."""
    from batchrunner.dataset import ROW_INDEX

    now = now or dt.datetime.now(dt.UTC)
    earlier = listed(spec)
    number = earlier[-1].number + 1 if earlier else 1
    path = folder(spec) / f"{number}-{now:%Y%m%dT%H%M%SZ}.parquet"
    wanted = [ROW_INDEX, *([spec.id_column] if spec.id_column else []), *KEPT, *score_columns]
    kept = frame.select([column for column in dict.fromkeys(wanted) if column in frame.columns])
    with replacing(path) as temporary:
        kept.write_parquet(temporary)
    return Snapshot(number, now, path)


OUTPUT_COLUMNS = ("requested_model", "status", "model", "provider", "cost_usd", "latency_s")  # what compare reads


def baseline(spec: JobSpec, token: str, *, current: pl.DataFrame | None = None) -> tuple[str, pl.DataFrame]:
    """What `--baseline` names, as (a label, its frame with ROW_INDEX): `run:N`, a date `YYYY-MM-DD` (the last
    snapshot finished that day or before), or an output file (.parquet, .csv, .jsonl) an earlier run wrote.
    (Another job's spec is read by the caller, which knows how to build a job's results.)"""
    import polars as pl

    from batchrunner.dataset import ROW_INDEX, scan

    snapshots = listed(spec)
    if token.startswith("run:"):
        wanted = token.removeprefix("run:")
        chosen = [s for s in snapshots if wanted.isdigit() and s.number == int(wanted)]
        if not chosen:
            raise SpecError(Problem("--baseline", f"{token}: no such run of {spec.name}; {_which(snapshots)}"))
        return chosen[0].label, pl.read_parquet(chosen[0].path)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", token):
        try:
            day_end = dt.datetime.fromisoformat(token).replace(tzinfo=dt.UTC) + dt.timedelta(days=1)
        except ValueError:
            raise SpecError(Problem("--baseline", f"{token} is not a date")) from None
        before = [s for s in snapshots if s.finished < day_end]
        if not before:
            raise SpecError(Problem("--baseline", f"no run of {spec.name} finished by {token}; {_which(snapshots)}"))
        return before[-1].label, pl.read_parquet(before[-1].path)
    path = Path(token)
    if path.suffix.lower() in (".parquet", ".csv", ".jsonl", ".ndjson"):
        if not path.exists():
            raise SpecError(Problem("--baseline", f"{path}: no such file"))
        try:
            frame = scan(path).collect()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise SpecError(Problem("--baseline", f"{path}: cannot read it ({first_line(exc)})")) from None
        lacking = [column for column in OUTPUT_COLUMNS if column not in frame.columns]
        if lacking:  # the input, or another tool's file: compare would fail on the first column it reads
            raise SpecError(
                Problem(
                    "--baseline",
                    f"{path}: not an output batchrunner wrote (no {', '.join(lacking)} column); give an earlier "
                    "run's output file, run:N or a date",
                )
            )
        # An output file is in input order: its position is the row's, as in the job's own frames
        return str(path), _typed(frame.with_row_index(ROW_INDEX))
    raise SpecError(
        Problem(
            "--baseline",
            f"{token!r}: give run:N, a date (YYYY-MM-DD), another job's spec (.yaml) or an output file; "
            + _which(snapshots),
        )
    )


def _typed(frame: pl.DataFrame) -> pl.DataFrame:
    """A CSV or JSONL output read back as text: its numbers as numbers, for the comparison."""
    import polars as pl

    casts = {
        column: pl.Float64
        for column in frame.columns
        if (column.startswith("score") or column in ("latency_s", "cost_usd")) and frame.schema[column] == pl.String
    }
    return frame.with_columns(pl.col(name).cast(dtype, strict=False) for name, dtype in casts.items())


def _which(snapshots: list[Snapshot]) -> str:
    if not snapshots:
        return "it has no recorded run yet (a run of an evaluate: job records one when every row is done)"
    return "it has " + ", ".join(snapshot.label for snapshot in snapshots[-5:])
