"""The reference pages generated from the code (scripts/docs_reference.py) are the ones committed, and the docs'
links stay inside a clone."""

from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "scripts" / "docs_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_reference_pages_are_current() -> None:
    stale = []
    for path, text in _generator().pages().items():
        committed = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        if committed != text.splitlines():
            diff = difflib.unified_diff(committed, text.splitlines(), "committed", "generated", n=0, lineterm="")
            stale.append(f"{path.relative_to(ROOT)}:\n" + "\n".join(list(diff)[:12]))
    assert not stale, "run python scripts/docs_reference.py; the pages differ from the code:\n" + "\n".join(stale)


def test_every_output_column_is_described() -> None:
    from batchrunner.records import RESULT_SCHEMA

    text = (ROOT / "docs" / "reference" / "output.md").read_text(encoding="utf-8")
    assert all(f"| `{name}` |" in text for name in RESULT_SCHEMA)


def test_relative_links_resolve_in_a_clone() -> None:
    """README and docs link only to files the repository holds (no ../shared/..., which a clone lacks)."""
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists() or not path.is_relative_to(ROOT):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
