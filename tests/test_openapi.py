"""OpenRouter's packaged schemas: what a request may carry, and validation against them."""

from __future__ import annotations

from batchrunner import openapi


def test_request_fields_include_documented_extras() -> None:
    """ChatRequest's own fields plus the ones OpenRouter documents outside its OpenAPI document."""
    fields = openapi.request_fields()
    assert {"messages", "model", "models", "provider", "response_format", "max_tokens", "plugins"} <= fields
    assert {"transforms", "verbosity", "usage"} <= fields


def test_validation_names_the_path_of_each_problem() -> None:
    """A wrong type and a bad enum value are each reported with their path."""
    errors = dict(
        openapi.validation_errors(
            "ChatRequest",
            {"messages": [{"role": "user", "content": "x"}], "temperature": "hot", "provider": {"sort": "cheapest"}},
        )
    )
    assert set(errors) == {("temperature",), ("provider", "sort")}
    assert (
        openapi.validation_errors("ChatRequest", {"messages": [{"role": "user", "content": "x"}], "model": "a/b"}) == []
    )


def test_chat_result_schema_accepts_its_own_example() -> None:
    """The packaged ChatResult schema is self-consistent: its documented example validates."""
    assert openapi.validation_errors("ChatResult", openapi.schema("ChatResult")["example"]) == []
