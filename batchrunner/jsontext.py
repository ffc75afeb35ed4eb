"""JSON for other programs to read: strict (RFC 8259), whatever the values (pure).

Python's json writes float("inf") and NaN as `Infinity` and `NaN`, which no other parser accepts (JavaScript's
JSON.parse, jq, Go's encoding/json): an unlimited rate (`rate_rps: inf`) made `estimate --json` unreadable
outside Python. Everything batchrunner prints or writes as JSON for a script, a browser or a log collector goes
through `dumps`: a non-finite number becomes null (unknown, unlimited: the field's meaning says which), and
allow_nan=False makes one missed here an error at once rather than a file nobody else can read. (The
checkpoint's own JSON, read back only by batchrunner, and request bodies are not written by `dumps`; `non_finite`
finds what a request must not hold.)
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every non-finite float, in dicts, lists and tuples however deep, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def non_finite(value: Any, at: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Where `value` holds NaN or an infinity (YAML's .nan and .inf, a float from Python), as paths of keys and
    indexes: a request holding one is not JSON (json writes `NaN`, orjson `null`), so the spec refuses it and a
    body holding one is written as json writes it."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [at]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in non_finite(item, (*at, str(key)))]
    if isinstance(value, list | tuple):
        return [found for index, item in enumerate(value) for found in non_finite(item, (*at, index))]
    return []


def dumps(value: Any, **options: Any) -> str:
    """json.dumps of `value` as strict JSON: non-finite numbers as null (`options` as json.dumps takes them)."""
    return json.dumps(finite(value), allow_nan=False, **options)
