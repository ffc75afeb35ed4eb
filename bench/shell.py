"""How the benches start batchrunner: as a user's shell would, with Python's bytecode cache.

A user's installed batchrunner runs from cached bytecode (pip compiles what it installs; a checkout
writes `__pycache__` on its first run). A machine that sets PYTHONDONTWRITEBYTECODE (this one does)
would instead compile every module of batchrunner on every start, adding ~0.1 s to each measured
process that no user pays; so the benches compile the package once and start it without that setting.
"""

from __future__ import annotations

import compileall
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "batchrunner"


def user_env(**extra: str) -> dict[str, str]:
    """The environment for a measured batchrunner process: this one's, bytecode cache on, plus `extra`."""
    compileall.compile_dir(PACKAGE, quiet=1)  # writes __pycache__ even where the setting forbids it
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **extra}
