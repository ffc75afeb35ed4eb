"""Structured answers: the schema checked up front, answers parsed and validated, typed columns. Pure.

An answer is accepted as JSON on its own or wrapped in a markdown code fence. A valid
answer to a `json_schema` job becomes one typed output column per top-level property; a
`json_object` job gets its answer as JSON text in a `parsed` column.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # polars is imported where a column type is made: spec.py (and `status`) check schemas without it
    import polars as pl

FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n(.*?)\n?\s*```\s*$", re.DOTALL)


@dataclass(frozen=True)
class Mode:
    """What a job's response_format asks of its answers."""

    kind: str  # "text", "json_object" or "json_schema"
    schema: dict[str, Any] | None = None

    @classmethod
    def of(cls, response_format: dict[str, Any] | None) -> Mode:
        kind = (response_format or {}).get("type", "text")
        if kind == "json_schema":
            schema = ((response_format or {}).get("json_schema") or {}).get("schema")
            return cls("json_schema", schema if isinstance(schema, dict) else {})
        return cls(kind if kind == "json_object" else "text")

    @property
    def structured(self) -> bool:
        return self.kind != "text"

    def errors(self, value: Any) -> Any:
        """The schema's most telling complaint about `value`, or None; the validator is built once per schema
        (building one per answer cost more than validating)."""
        return _best_error(json.dumps(self.schema, sort_keys=True), value)


@functools.lru_cache(maxsize=64)
def _validator(schema_text: str) -> Any:
    import jsonschema  # only jobs with a schema pay for it

    return jsonschema.Draft202012Validator(json.loads(schema_text))


def _best_error(schema_text: str, value: Any) -> Any:
    import jsonschema

    return jsonschema.exceptions.best_match(_validator(schema_text).iter_errors(value))


class InvalidAnswer(ValueError):
    """An answer that is not the JSON the job asked for; the message says what is wrong."""


def schema_problems(schema: Any) -> list[str]:
    """Why `schema` is not a usable JSON Schema (empty when it is)."""
    if not isinstance(schema, dict):
        return ["json_schema.schema must be a JSON Schema object"]
    import jsonschema  # only jobs with a schema pay for it

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return [f"json_schema.schema at {where}: {exc.message}"]
    return []


def strict_mode_warnings(schema: dict[str, Any], path: str = "schema") -> list[str]:
    """Where a schema breaks strict structured outputs' rules: closed objects, every property required."""
    warnings = []
    properties = schema.get("properties")
    if schema.get("type") == "object" or isinstance(properties, dict):
        if schema.get("additionalProperties") is not False:
            warnings.append(f"{path}: strict mode needs additionalProperties: false")
        missing = sorted(set(properties or {}) - set(schema.get("required") or []))
        if missing:
            warnings.append(f"{path}: strict mode needs every property required; not required: {', '.join(missing)}")
        for name, sub in (properties or {}).items():
            if isinstance(sub, dict):
                warnings.extend(strict_mode_warnings(sub, f"{path}.{name}"))
    if isinstance(schema.get("items"), dict):
        warnings.extend(strict_mode_warnings(schema["items"], f"{path}[]"))
    return warnings


def parse_answer(text: str, mode: Mode, *, finish_reason: str | None = None) -> Any:
    """The answer's JSON value, validated against the schema; InvalidAnswer otherwise."""
    match = FENCE.match(text)
    body = match.group(1) if match else text
    try:
        value = json.loads(body)
    except ValueError as exc:
        if finish_reason == "length":
            raise InvalidAnswer(f"cut off at max_tokens before the JSON was complete ({exc})") from None
        raise InvalidAnswer(f"not JSON ({exc})") from None
    if mode.kind == "json_object" and not isinstance(value, dict):
        raise InvalidAnswer(f"expected a JSON object, got {type(value).__name__}")
    if mode.kind == "json_schema" and mode.schema:
        error = mode.errors(value)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise InvalidAnswer(f"fails the schema at {where}: {error.message}")
    return value


def repair_prompt(error: str) -> str:
    """What the model is told when its answer did not validate."""
    return (
        f"Your previous answer was not valid: {error}. "
        "Reply again with only the JSON value, complete, satisfying the schema, and nothing else."
    )


# -- typed columns --------------------------------------------------------------------------


def column_types(schema: dict[str, Any]) -> dict[str, pl.DataType]:
    """One polars type per top-level property of an object schema, in schema order."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    return {name: polars_type(sub, schema) for name, sub in (properties or {}).items()}


def resolve_ref(node: Any, root: dict[str, Any]) -> dict[str, Any]:
    """`node`, or the schema its local `$ref` ("#/$defs/...") points to within `root`."""
    if isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
        target: Any = root
        for part in node["$ref"][2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return target if isinstance(target, dict) else {}
    return node if isinstance(node, dict) else {}


def _kind(node: dict[str, Any]) -> str | None:
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return kinds[0] if len(kinds) == 1 else None
    if kind is None and isinstance(node.get("properties"), dict):
        return "object"
    if kind is None and node.get("enum") and all(isinstance(v, str) for v in node["enum"]):
        return "string"
    return kind


def polars_type(node: Any, root: dict[str, Any]) -> pl.DataType:
    """string → String (an all-string enum → Enum), integer → Int64, number → Float64, boolean →
    Boolean, array → List, object with properties → Struct; anything whose shape varies → JSON text."""
    import polars as pl

    node = resolve_ref(node, root)
    kind = _kind(node)
    if kind == "string":
        enum = node.get("enum")
        if enum and all(isinstance(v, str) for v in enum):
            return pl.Enum(list(dict.fromkeys(enum)))
        return pl.String()
    if kind == "integer":
        return pl.Int64()
    if kind == "number":
        return pl.Float64()
    if kind == "boolean":
        return pl.Boolean()
    if kind == "array" and isinstance(node.get("items"), dict):
        return pl.List(polars_type(node["items"], root))
    if kind == "object" and isinstance(node.get("properties"), dict) and node["properties"]:
        return pl.Struct({name: polars_type(sub, root) for name, sub in node["properties"].items()})
    return pl.String()  # JSON text: free-form objects, unions, arrays of anything


def _instance(dtype: Any) -> pl.DataType:
    """polars may hand back a data type class (pl.String) where an instance (pl.String()) is meant."""
    return dtype() if isinstance(dtype, type) else dtype


def typed_value(value: Any, dtype: pl.DataType) -> Any:
    """A parsed JSON value shaped for its column: JSON text where the column holds JSON text."""
    import polars as pl

    if value is None:
        return None
    if isinstance(dtype, pl.String) and not isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(dtype, pl.List) and isinstance(value, list):
        return [typed_value(v, _instance(dtype.inner)) for v in value]
    if isinstance(dtype, pl.Struct) and isinstance(value, dict):
        return {field.name: typed_value(value.get(field.name), _instance(field.dtype)) for field in dtype.fields}
    if isinstance(dtype, pl.Float64) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
