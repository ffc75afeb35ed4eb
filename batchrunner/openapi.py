"""OpenRouter's own request and response schemas, and validation against them.

The schemas are a subset of OpenRouter's published OpenAPI document, packaged as
`schemas/openrouter.json` (regenerate with scripts/extract_openapi_subset.py). The spec
uses them to refuse a bad `params` or `provider` before a request is sent, and the sandbox
uses them to refuse what OpenRouter would refuse.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import jsonschema

# Request fields OpenRouter documents that its OpenAPI document does not (yet) list;
# they pass through unchanged ("SDK users ask for extra_body-style passthrough").
DOCUMENTED_EXTRA_FIELDS = frozenset(
    {"verbosity", "include_reasoning", "web_search_options", "structured_outputs", "transforms", "usage"}
)


@functools.cache
def _document() -> dict[str, Any]:
    text = resources.files("batchrunner").joinpath("schemas", "openrouter.json").read_text(encoding="utf-8")
    return json.loads(text)


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = {**_document(), "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema)


def schema(name: str) -> dict[str, Any]:
    """One named schema of the document, e.g. `ChatRequest`."""
    return _document()["components"]["schemas"][name]


def request_fields() -> frozenset[str]:
    """Every top-level field a chat request may carry."""
    return frozenset(schema("ChatRequest")["properties"]) | DOCUMENTED_EXTRA_FIELDS


def validation_errors(name: str, instance: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """(path, message) for each way `instance` breaks schema `name`; empty when it conforms."""
    errors = []
    for error in _validator(name).iter_errors(instance):
        best = jsonschema.exceptions.best_match([error])
        errors.append((tuple(best.absolute_path), best.message))
    return sorted(errors, key=lambda e: [str(p) for p in e[0]])
