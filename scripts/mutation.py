"""Mutation-test the pure modules: how many deliberate bugs in costs.py and flow.py do their tests catch?

Line coverage says a line ran; it does not say a wrong price, a flipped comparison, a dropped retry or a
fallback never taken would fail a test. mutmut plants such bugs (mutants) in one module at a time and runs
that module's table-driven tests against each (settings under [tool.mutmut] in pyproject.toml; the module
and its tests are set per target here): costs.py against tests/test_costs.py, flow.py (the row flow)
against its scenario table, tests/test_flow.py. The score is killed / total: a mutant that survives, or
that no test even reaches, counts against it. Run it from the repo root:

    pip install -e '.[test,mutation]'
    python scripts/mutation.py [--min-score 90] [costs] [flow]

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
COPIED = ("batchrunner", "tests", "pyproject.toml")  # what mutmut and the tests need
# target -> (the module mutated, the tests run against each mutant)
TARGETS = {
    "costs": ("batchrunner/costs.py", "tests/test_costs.py"),
    "flow": ("batchrunner/flow.py", "tests/test_flow.py"),
    "adaptive": ("batchrunner/adaptive.py", "tests/test_adaptive.py"),
    "gates": ("batchrunner/gates.py", "tests/test_gates.py"),
}


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
    parser.add_argument("targets", nargs="*", help=f"what to mutate, of {', '.join(TARGETS)} (default: all)")
    args = parser.parse_args()
    if unknown := set(args.targets) - set(TARGETS):
        parser.error(f"no target {', '.join(sorted(unknown))}: choose from {', '.join(TARGETS)}")
    failed = 0
    for target in args.targets or list(TARGETS):
        failed |= score(target, *TARGETS[target], args.min_score)
    return failed


def score(target: str, module: str, tests: str, min_score: float) -> int:
    """Mutate `module`, run `tests` against each mutant; print the survivors and the score; 1 if below."""
    with tempfile.TemporaryDirectory(prefix="batchrunner-mutation-") as tmp:
        workdir = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "mutants")
        for name in COPIED:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, workdir / name, ignore=ignore)
            else:
                shutil.copy2(source, workdir / name)
        config = workdir / "pyproject.toml"
        text = config.read_text()
        text = text.replace('only_mutate = ["batchrunner/costs.py"]', f'only_mutate = ["{module}"]')
        text = text.replace('selection = ["tests/test_costs.py"]', f'selection = ["{tests}"]')
        config.write_text(text)
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
    percent = 100 * killed / total if total else 0.0
    print(
        f"{target}: mutation score {killed}/{total} killed = {percent:.1f}% (minimum {min_score:g}%) in {elapsed:.0f}s"
    )
    return 0 if percent >= min_score else 1


if __name__ == "__main__":
    sys.exit(main())
