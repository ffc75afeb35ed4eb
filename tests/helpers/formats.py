"""Structured-answer formats for test jobs."""

from __future__ import annotations

from typing import Any


def strict_object(properties: dict[str, Any], name: str = "t") -> dict[str, Any]:
    """A strict json_schema response_format: an object with these properties, all required, nothing else."""
    schema = {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}
