"""What a killed run or export leaves beside the output (parts folders, temporary files) is removed by the next
run or export of the job, under its lock: only what batchrunner names that way and fills, never a user's."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import polars as pl
from click.testing import CliRunner, Result
from conftest import signalled_at

from batchrunner.cli import main
from batchrunner.lock import job_lock, lock_path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def beside(out: Path) -> set[str]:
    """The names in the output's folder that start with a dot: where temporaries live."""
    return {name for name in os.listdir(out) if name.startswith(".")}


def lookalikes(out: Path) -> set[str]:
    """Things beside the output named almost like batchrunner's temporaries, or exactly but not holding what
    they would hold: a user's, each of them to be left alone."""
    part = pl.DataFrame({"a": [1]})
    (out / ".result.parquet.abcd_123").mkdir()
    (out / ".result.parquet.abcd_123" / "notes.txt").write_text("mine")  # not a part
    (out / ".result.parquet.abcd_124").mkdir()
    part.write_parquet(out / ".result.parquet.abcd_124" / "00000000.parquet")
    (out / ".result.parquet.abcd_124" / "deeper").mkdir()  # a folder inside: not ours
    (out / ".result.parquet.ABCDEFGH").mkdir()  # mkdtemp never writes capitals
    (out / ".result.parquet.abcdefghi").mkdir()  # nine characters, not eight
    (out / ".result.parquet.abcdefgh").write_text("a file, not a folder")
    (out / ".other.parquet.abcdefgh").mkdir()  # another output's name
    part.write_parquet(out / ".other.parquet.abcdefgh" / "00000000.parquet")
    target = out / "kept"
    target.mkdir()
    part.write_parquet(target / "00000000.parquet")
    (out / ".result.parquet.zzzzzzzz").symlink_to(target, target_is_directory=True)  # a link: never followed
    (out / ".result.parquet.abcdefgh.tmpx").write_text("not .tmp")
    (out / "result.parquet.abcdefgh.tmp").write_text("no leading dot")
    return beside(out)


def test_a_killed_runs_temporaries_are_removed_by_the_next_run_and_a_users_files_are_not(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """A run quit while writing its output leaves its parts folder and its key log beside the output; the next
    run removes exactly those (and a temporary output and summary), and every lookalike stays."""
    spec_path = str(write_spec())
    out = tmp_path / "out"
    quit_at_once = signalled_at(
        "batchrunner.output:_write_parts", [signal.SIGTERM, signal.SIGTERM], "run", spec_path, "--sandbox"
    )
    assert quit_at_once.returncode == 3, quit_at_once.stderr
    left = beside(out)
    assert any(name.startswith(".result.parquet.keys.") for name in left), left
    assert any(len(name) == len(".result.parquet.") + 8 for name in left), left
    (out / ".result.parquet.k2_9abcd.tmp").write_bytes(b"half an output")
    (out / ".result.summary.json.x_1234ab.tmp").write_text("{")
    (out / ".result.probe.parquet").write_bytes(b"a probe")
    ours = beside(out)
    users = lookalikes(out) - ours
    rerun = invoke("run", spec_path, "--sandbox")
    assert rerun.exit_code == 0, rerun.output
    assert beside(out) == users, "ours are gone, the user's are all there"
    assert (out / ".result.parquet.abcd_123" / "notes.txt").read_text() == "mine"
    assert (out / "kept" / "00000000.parquet").exists()
    assert pl.read_parquet(out / "result.parquet").height == 12


def test_export_removes_temporaries_beside_its_target_unless_a_run_of_the_job_is_live(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """An export killed while writing leaves its parts folder; the next export removes it. While a run of the job
    holds its lock, export exits 3 (the run writes the output itself) and removes nothing that run may be using."""
    spec_path = str(write_spec())
    assert invoke("run", spec_path, "--sandbox").exit_code == 0
    out = tmp_path / "out"
    killed = signalled_at(
        "batchrunner.output:_write_parts", [signal.SIGTERM, signal.SIGTERM], "export", spec_path, "--sandbox"
    )
    assert killed.returncode == 3, killed.stderr
    left = beside(out)
    assert any(len(name) == len(".result.parquet.") + 8 for name in left), left
    checkpoint = out / "result.checkpoint.sqlite"
    with job_lock(lock_path(checkpoint)):
        busy = invoke("export", spec_path, "--sandbox")
    assert busy.exit_code == 3 and "already running" in busy.stderr, busy.output
    assert beside(out) == left, "a live run's folders are not touched"
    again = invoke("export", spec_path, "--sandbox")
    assert again.exit_code == 0, again.output
    assert not [name for name in beside(out) if name.startswith(".result.parquet.")]
