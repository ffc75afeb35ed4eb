"""Creating files safely: planted symlinks are replaced or refused, never written through; umask permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from batchrunner.errors import RunHalted
from batchrunner.files import write_text_atomically
from batchrunner.lock import job_lock


def test_a_symlink_planted_at_the_target_is_replaced_not_followed(tmp_path: Path) -> None:
    """Writing summary.json where a symlink to another file stands leaves that file alone; summary.json is a file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out" / "result.summary.json"
    target.parent.mkdir()
    target.symlink_to(victim)
    write_text_atomically(target, '{"ok": 1}\n')
    assert victim.read_text() == "precious"
    assert not target.is_symlink() and target.read_text() == '{"ok": 1}\n'


def test_old_predictable_temporary_names_are_not_used(tmp_path: Path) -> None:
    """A symlink planted at the old temporary name (.result.summary.json.tmp) is never written through."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".result.summary.json.tmp").symlink_to(victim)
    write_text_atomically(tmp_path / "result.summary.json", "{}\n")
    assert victim.read_text() == "precious"


def test_new_files_get_the_umask_permissions_not_0600(tmp_path: Path) -> None:
    """Outputs are readable by whoever the umask allows, as with any other tool."""
    old = os.umask(0o022)
    try:
        write_text_atomically(tmp_path / "file.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "file.json").stat().st_mode) == 0o644


def test_a_symlinked_lock_is_refused(tmp_path: Path) -> None:
    """A symlink planted as the job's lock file is not opened (it would truncate its target)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock = tmp_path / "job.checkpoint.sqlite.lock"
    lock.symlink_to(victim)
    with pytest.raises(RunHalted, match="is a symlink"), job_lock(lock):
        pass
    assert victim.read_text() == "precious"
