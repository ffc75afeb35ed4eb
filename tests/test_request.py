"""Request fingerprints: the same request keeps its key, any change that shapes it changes it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from batchrunner.dataset import Row
from batchrunner.request import RequestBuilder
from batchrunner.spec import load_spec

ROW = Row(0, "T-0", {"ticket_id": "T-0", "subject": "s", "text": "hello"})


def key(write_spec: Callable[..., Path], row: Row = ROW, model: str = "openai/gpt-4o-mini", **changes: object) -> str:
    builder = RequestBuilder(load_spec(write_spec(**changes)))
    return builder.fingerprint(builder.prompt(row), model)


def test_fingerprint_is_stable(write_spec: Callable[..., Path]) -> None:
    """Two builders from the same spec give the same key (across processes: no hash randomisation)."""
    assert key(write_spec) == key(write_spec)
    assert len(key(write_spec)) == 32


def test_everything_that_shapes_the_request_changes_it(write_spec: Callable[..., Path]) -> None:
    """Prompt, params, provider, response_format and fallbacks each change the key; concurrency does not."""
    base = key(write_spec)
    assert key(write_spec, prompt="Other {text}") != base
    assert key(write_spec, params={"temperature": 1, "max_tokens": 50}) != base
    assert key(write_spec, provider={"sort": "price"}) != base
    assert key(write_spec, fallbacks=["a/b"]) != base
    assert key(write_spec, response_format={"type": "json_object"}) != base
    assert key(write_spec, concurrency=99) == base


def test_only_rows_whose_prompt_changes_get_a_new_key(write_spec: Callable[..., Path]) -> None:
    """A column the template does not use does not affect the key; one it uses does."""
    base = key(write_spec)
    assert key(write_spec, row=Row(5, "T-0", {**ROW.values, "subject": "changed"})) == base
    assert key(write_spec, row=Row(0, "T-0", {**ROW.values, "text": "changed"})) != base


def test_each_requested_model_has_its_own_key(write_spec: Callable[..., Path]) -> None:
    """The same row asked of two models has two keys."""
    assert key(write_spec, models=["a/one", "b/two"], model="a/one") != key(
        write_spec, models=["a/one", "b/two"], model="b/two"
    )


def test_cached_system_prompt_is_marked_and_valid(write_spec: Callable[..., Path]) -> None:
    """cache_system_prompt marks the system message with cache_control, in a shape ChatRequest accepts."""
    from batchrunner import openapi

    builder = RequestBuilder(load_spec(write_spec(system="Shared instructions.", cache_system_prompt=True)))
    body = builder.body(builder.prompt(ROW), "openai/gpt-4o-mini")
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "Shared instructions.", "cache_control": {"type": "ephemeral"}}
    ]
    assert body["messages"][1] == {"role": "user", "content": "Ticket T-0: hello"}
    assert openapi.validation_errors("ChatRequest", body) == []
