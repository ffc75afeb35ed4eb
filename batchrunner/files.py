"""Creating files safely in folders other people may write to (a shared output folder, a cron job's).

Every file batchrunner writes goes through here: a new file is created beside its target
under a name no one can predict (`mkstemp`), then renamed over the target, so a symlink
planted at the target or at a temporary name is replaced, never written through. Files we
open in place (the lock, the spill file) are opened with O_NOFOLLOW. New files get the
permissions the process umask allows, like any other tool's, not mkstemp's private 0600.
`identity` tells whether a file is still the one a run read or wrote; `summary_path` names the summary beside an
output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchrunner.urls import Location, ObjectURL


def summary_path(output: Location) -> Location:
    """out/triage.parquet -> out/triage.summary.json (s3://b/triage.parquet -> s3://b/triage.summary.json)"""
    return output.with_name(output.stem + ".summary.json")


def umask_mode(mode: int = 0o666) -> int:
    """`mode` less the process umask: what open() would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A fresh temporary path beside `path`; when the block succeeds, it atomically replaces `path`.

    The temporary file exists (empty, with umask permissions) when the block starts; writers
    may truncate and rewrite it. On failure it is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temporary = Path(name)
    try:
        os.fchmod(fd, umask_mode())
        os.close(fd)
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`, durably (fsync) and atomically."""
    with replacing(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def open_no_follow(path: Path, flags: int, mode: int = 0o666) -> int:
    """os.open that refuses a symlink at `path` (OSError ELOOP) instead of writing where it points."""
    return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)


def identity(path: Location) -> list[Any] | None:
    """A file as the filesystem knows it (size, modification time to the nanosecond, inode), to tell later
    whether it is still the same file; None when there is none. A list, as it is kept in JSON records.
    An object in S3 has no inode or mtime to trust: its identity is its URL, ETag, version and size (a HEAD)."""
    if isinstance(path, ObjectURL):
        from batchrunner import objectstore  # boto3 only for jobs that name objects

        return objectstore.identity(path)
    try:
        found = os.stat(path)
    except OSError:
        return None
    return [found.st_size, found.st_mtime_ns, found.st_ino]
