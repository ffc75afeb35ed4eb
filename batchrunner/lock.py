"""One run per job at a time: an advisory lock on a file beside the checkpoint.

`flock` is released by the kernel when the holder dies, so a lock left by a killed run
is simply taken over; the file's text only says who holds it, for the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from batchrunner.errors import RunHalted
from batchrunner.files import open_no_follow


def lock_path(checkpoint: Path) -> Path:
    """The job's lock file: beside its checkpoint, named after it."""
    return checkpoint.with_name(checkpoint.name + ".lock")


@contextlib.contextmanager
def job_lock(path: Path) -> Iterator[None]:
    """Hold the job's lock for the block; RunHalted naming the holder if another run has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = open_no_follow(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise RunHalted(
                f"the lock file {path} is a symlink, which a run will not write through; remove it and rerun"
            ) from None
        raise RunHalted(f"cannot open the lock file {path} ({exc}); check the folder's permissions") from None
    handle = os.fdopen(fd, "r+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            try:
                info = json.loads(holder)
                holder = f"pid {info['pid']} on {info['host']}, running since {info['since']}"
            except (ValueError, KeyError, TypeError):
                pass
            raise RunHalted(f"this job is already running ({holder}); lock file {path}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            )
        )
        handle.flush()
        yield
    finally:
        handle.close()
