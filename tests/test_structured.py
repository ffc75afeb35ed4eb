"""Structured answers: parsing, validation, typed columns, and the schema's own checks."""

from __future__ import annotations

import polars as pl
import pytest

from batchrunner.structured import (
    InvalidAnswer,
    Mode,
    column_types,
    parse_answer,
    schema_problems,
    strict_mode_warnings,
    typed_value,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["bug", "billing"]},
        "score": {"type": "integer"},
        "confidence": {"type": "number"},
        "urgent": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "detail": {"type": "object", "properties": {"note": {"type": "string"}, "n": {"type": "integer"}}},
        "extra": {"type": "object"},
        "either": {"type": ["string", "integer"]},
        "maybe": {"type": ["string", "null"]},
        "ref": {"$ref": "#/$defs/level"},
    },
    "required": ["label"],
    "$defs": {"level": {"type": "integer"}},
}
MODE = Mode.of({"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}})


def test_valid_answers_parse_with_or_without_a_code_fence() -> None:
    """Plain JSON and JSON inside a ```json fence are both accepted."""
    assert parse_answer('{"label": "bug"}', MODE) == {"label": "bug"}
    assert parse_answer('```json\n{"label": "billing", "score": 2}\n```', MODE) == {"label": "billing", "score": 2}


@pytest.mark.parametrize(
    ("text", "finish_reason", "expected"),
    [
        ('{"label": "bu', "stop", "not JSON"),
        ('{"label": "bu', "length", "cut off at max_tokens"),
        ('{"label": "other"}', "stop", "fails the schema at label"),
        ('{"score": 1}', "stop", "'label' is a required property"),
    ],
)
def test_invalid_answers_say_what_is_wrong(text: str, finish_reason: str, expected: str) -> None:
    """Broken JSON, a cut-off answer and a schema violation are each named."""
    with pytest.raises(InvalidAnswer, match=expected):
        parse_answer(text, MODE, finish_reason=finish_reason)


def test_json_object_mode_needs_an_object() -> None:
    """json_object accepts any object, and refuses other JSON values."""
    mode = Mode.of({"type": "json_object"})
    assert parse_answer('{"a": [1]}', mode) == {"a": [1]}
    with pytest.raises(InvalidAnswer, match="expected a JSON object"):
        parse_answer("[1, 2]", mode)


def test_column_types_follow_the_schema() -> None:
    """Each JSON Schema type maps to its polars type; shapes that vary become JSON text."""
    types = column_types(SCHEMA)
    assert types == {
        "label": pl.Enum(["bug", "billing"]),
        "score": pl.Int64(),
        "confidence": pl.Float64(),
        "urgent": pl.Boolean(),
        "tags": pl.List(pl.String()),
        "detail": pl.Struct({"note": pl.String(), "n": pl.Int64()}),
        "extra": pl.String(),
        "either": pl.String(),
        "maybe": pl.String(),
        "ref": pl.Int64(),
    }


def test_values_are_shaped_for_their_columns() -> None:
    """Free-form values become JSON text, integers in number columns become floats, structs keep their fields."""
    assert typed_value({"k": 1}, pl.String()) == '{"k": 1}'
    assert typed_value(3, pl.Float64()) == 3.0
    assert typed_value({"note": "x"}, pl.Struct({"note": pl.String(), "n": pl.Int64()})) == {"note": "x", "n": None}
    frame = pl.DataFrame(
        [{"detail": typed_value({"note": "x", "n": 2}, column_types(SCHEMA)["detail"])}],
        schema={"detail": column_types(SCHEMA)["detail"]},
    )
    assert frame["detail"].struct.field("n").to_list() == [2]


def test_broken_schemas_are_refused_and_strict_rules_warned() -> None:
    """A schema that is not JSON Schema is a problem; open objects and optional properties are warnings."""
    assert schema_problems({"type": "objekt"})
    assert schema_problems({"type": "object"}) == []
    warnings = strict_mode_warnings(SCHEMA)
    assert any("additionalProperties: false" in w for w in warnings)
    assert any("not required: confidence" in w for w in warnings)
    strict = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    assert strict_mode_warnings(strict) == []
