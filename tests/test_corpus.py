"""A corpus of hostile and careless specs and inputs (tests/corpus/): each one ends in exit 2 or 3 with a
message that names the field or file, never a traceback, and sends nothing.

Each case is a spec file whose first line says what to expect: `# expect: EXIT TEXT`; an optional
`# setup: NAME` line prepares what a file cannot hold (a damaged checkpoint, an environment). Add a
case whenever a new way to break the tool is found.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchrunner.cli import main
from batchrunner.store import Store

CORPUS = Path(__file__).resolve().parent / "corpus"
CASES = sorted(CORPUS.glob("*.yaml"))


def expectation(case: Path) -> tuple[int, str, str | None]:
    lines = case.read_text().splitlines()
    exit_code, text = lines[0].removeprefix("# expect: ").split(" ", 1)
    setup = lines[1].removeprefix("# setup: ") if lines[1].startswith("# setup: ") else None
    return int(exit_code), text, setup


def prepare(folder: Path, setup: str | None) -> dict[str, str]:
    """Make what the case needs besides its files; return the environment to run it in."""
    out = folder / "out"
    out.mkdir(exist_ok=True)
    env = {"OPENROUTER_API_KEY": "", "OPENROUTER_BASE_URL": ""}
    if setup == "garbage-checkpoint":
        (out / "garbage.sqlite").write_bytes(b"not a database at all, just bytes " * 200)
    elif setup == "newer-checkpoint":
        Store.open(out / "newer.sqlite").close()
        db = sqlite3.connect(out / "newer.sqlite")
        db.execute("PRAGMA user_version=999")
        db.commit()
        db.close()
    elif setup == "truncated-checkpoint":
        Store.open(out / "truncated.sqlite").close()
        data = (out / "truncated.sqlite").read_bytes()
        (out / "truncated.sqlite").write_bytes(data[:300])
    elif setup == "symlinked-checkpoint":
        (folder / "precious.txt").write_text("keep me")
        (out / "linked.sqlite").symlink_to(folder / "precious.txt")
    elif setup == "key-with-newline":
        env["OPENROUTER_API_KEY"] = "sk-or-v1-abc\nX-Injected: yes"
    return env


@pytest.mark.parametrize("case", CASES, ids=[case.stem for case in CASES])
def test_each_hostile_case_is_an_exit_code_and_a_sentence(case: Path, tmp_path: Path) -> None:
    """The case is refused (exit 2) or stopped (exit 3) with a message naming what to fix; no traceback, no request."""
    exit_code, text, setup = expectation(case)
    shutil.copytree(CORPUS / "data", tmp_path / "data")
    spec = tmp_path / case.name
    shutil.copy(case, spec)
    env = prepare(tmp_path, setup)
    commands = [["run", str(spec)] + ([] if setup == "key-with-newline" else ["--sandbox"])]
    if setup and setup.endswith("checkpoint"):  # every command that opens the checkpoint says the same
        commands += [["status", str(spec)], ["export", str(spec)], ["estimate", str(spec), "--sandbox"]]
    for command in commands:
        result = CliRunner().invoke(main, command, env=env)
        output = result.stdout + result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit), (command, result.exception)
        assert "Traceback" not in output, (command, output)
        assert result.exit_code == exit_code, (command, output)
        assert text in result.stderr, (command, output)
    assert not (tmp_path / "out" / "result.checkpoint.sqlite").exists() or setup, "nothing was sent"
    if setup == "symlinked-checkpoint":
        assert (tmp_path / "precious.txt").read_text() == "keep me"
