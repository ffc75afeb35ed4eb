"""Scoring functions for the `python:` metric's tests (importable as helpers.graders)."""

from __future__ import annotations

from typing import Any


def same_length(row: dict[str, Any], answer: Any) -> float:
    """1 when the answer is as long as the row's reference, else the ratio of the shorter to the longer."""
    want, got = len(str(row["expected"])), len(str(answer or ""))
    return min(want, got) / max(want, got, 1)


def explodes(row: dict[str, Any], answer: Any) -> float:
    raise RuntimeError("grader bug")


def out_of_range(row: dict[str, Any], answer: Any) -> float:
    return 7.0
