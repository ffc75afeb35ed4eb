"""The package's shape: no function so long that its parts have no names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "batchrunner"
MAX_FUNCTION_LINES = 80  # from the `def` line to the body's last line, decorators not counted


def long_functions(root: Path, most_lines: int) -> list[str]:
    """Every function (methods and nested ones too) under `root` longer than `most_lines`, as path:line name (n)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > most_lines:
                    found.append(f"{relative}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_the_package_is_over_80_lines() -> None:
    """Every function in batchrunner/ is at most 80 lines long."""
    assert long_functions(PACKAGE, MAX_FUNCTION_LINES) == []


def test_a_long_function_is_found(tmp_path: Path) -> None:
    """The count catches a function one line over the limit, nested in a class, and not one at the limit."""
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    (tmp_path / "over.py").write_text(f"class A:\n    async def over(self) -> None:\n{body}\n        x = 0\n")
    (tmp_path / "at.py").write_text(f"class A:\n    def at(self) -> None:\n{body}\n")
    assert long_functions(tmp_path, MAX_FUNCTION_LINES) == ["over.py:2 over (81 lines)"]


def _imports(path: Path) -> set[str]:
    """The modules a file imports at run time (imports under `if TYPE_CHECKING:` are for mypy only)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for child in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_row_flow_and_its_money_do_no_io() -> None:
    """flow.py and accounts.py are pure: no asyncio, no HTTP, no clock, no client, store or driver imported."""
    io = {"asyncio", "aiohttp", "time", "batchrunner.client", "batchrunner.store", "batchrunner.live"}
    io |= {"batchrunner.batch", "batchrunner.clock", "batchrunner.limits", "batchrunner.breaker"}
    for name in ("flow.py", "accounts.py"):
        assert not _imports(PACKAGE / name) & io, name


def test_the_batch_executor_imports_nothing_of_the_live_one() -> None:
    """The Batch API's executor drives the flow itself: live.py (the live driver and pool) is not its dependency."""
    assert "batchrunner.live" not in _imports(PACKAGE / "batch.py")
