"""JSON for other programs to read: strict (RFC 8259), whatever the values (pure).

Python's json writes float("inf") and NaN as `Infinity` and `NaN`, which no other parser accepts (JavaScript's
JSON.parse, jq, Go's encoding/json): an unlimited rate (`rate_rps: inf`) made `estimate --json` unreadable
outside Python. Everything batchrunner prints or writes as JSON for a script, a browser or a log collector goes
through `dumps`: a non-finite number becomes null (unknown, unlimited: the field's meaning says which), and
allow_nan=False makes one missed here an error at once rather than a file nobody else can read. (The
checkpoint's own JSON, read back only by batchrunner, and request bodies, whose bytes are fingerprinted, are
not this module's.)
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


def dumps(value: Any, **options: Any) -> str:
    """json.dumps of `value` as strict JSON: non-finite numbers as null (`options` as json.dumps takes them)."""
    return json.dumps(finite(value), allow_nan=False, **options)
