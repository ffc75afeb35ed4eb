"""Mutation-test the money module: how many deliberate bugs in batchrunner/costs.py do its tests catch?

Line coverage says a line ran; it does not say a wrong price, a flipped comparison or a dropped discount
would fail a test. mutmut plants such bugs (mutants) in costs.py one at a time and runs tests/test_costs.py
against each (settings under [tool.mutmut] in pyproject.toml). The score is killed / total: a mutant that
survives, or that no test even reaches, counts against it. Run it from the repo root:

    pip install -e '.[test,mutation]'
    python scripts/mutation.py [--min-score 90]

It works in a temporary copy of the repo (mutmut writes a mutants/ folder), prints the score and the diff of
every mutant not killed, and exits 1 when the score is below --min-score.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPIED = ("batchrunner", "tests", "pyproject.toml")  # what mutmut and tests/test_costs.py need


def mutmut(workdir: Path, *args: str) -> str:
    """Run one mutmut command in `workdir`; its output, or exit with it if the command failed."""
    done = subprocess.run(
        [sys.executable, "-m", "mutmut", *args], cwd=workdir, capture_output=True, text=True, encoding="utf-8"
    )
    if done.returncode != 0:
        sys.exit(f"mutmut {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-score", type=float, default=90.0, help="the lowest passing score, in %% (default 90)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batchrunner-mutation-") as tmp:
        workdir = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "mutants")
        for name in COPIED:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, workdir / name, ignore=ignore)
            else:
                shutil.copy2(source, workdir / name)
        started = time.monotonic()
        mutmut(workdir, "run")
        elapsed = time.monotonic() - started
        mutmut(workdir, "export-cicd-stats")
        stats = json.loads((workdir / "mutants" / "mutmut-cicd-stats.json").read_text())
        # `results` lists every mutant that was not killed: survived, no tests, timeout, ...
        for line in mutmut(workdir, "results").splitlines():
            name = line.strip().rpartition(": ")[0]
            if name:
                print(mutmut(workdir, "show", name))
    killed, total = stats["killed"], stats["total"]
    score = 100 * killed / total if total else 0.0
    print(f"mutation score: {killed}/{total} killed = {score:.1f}% (minimum {args.min_score:g}%) in {elapsed:.0f}s")
    return 0 if score >= args.min_score else 1


if __name__ == "__main__":
    sys.exit(main())
