"""Request fingerprints: the same request keeps its key, any change that shapes it changes it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchrunner import openapi
from batchrunner.dataset import Row
from batchrunner.media import EncodedBody, Media, encode_body
from batchrunner.request import (
    MOST_TOKENS_PER_IMAGE,
    RequestBuilder,
    choices,
    least_prompt_tokens,
    media_tally,
    most_field_tokens,
    most_prompt_tokens,
)
from batchrunner.spec import BODY_KEYS, REQUEST_KEYS, REQUEST_SHAPING_KEYS, RUN_ONLY_KEYS, JobSpec, load_spec

ROW = Row(0, "T-0", {"ticket_id": "T-0", "subject": "s", "text": "hello"})


def key(write_spec: Callable[..., Path], row: Row = ROW, model: str = "openai/gpt-4o-mini", **changes: object) -> str:
    builder = RequestBuilder(load_spec(write_spec(**changes)))
    return builder.fingerprint(builder.prompt(row), model)


KEY_IN_A_PROCESS = """
import sys
from batchrunner.dataset import Row
from batchrunner.request import RequestBuilder
from batchrunner.spec import load_spec
builder = RequestBuilder(load_spec(sys.argv[1]))
print(builder.fingerprint(builder.prompt(Row(0, "T-0", {"ticket_id": "T-0", "subject": "s", "text": "hello"})), sys.argv[2]))
"""


def test_fingerprint_is_stable(write_spec: Callable[..., Path]) -> None:
    """The same request keeps its key in other processes with other string-hash seeds (a key built from hash()
    or from a set's order would change), and two builders in one process agree."""
    shaped = {
        "params": {"temperature": 0, "max_tokens": 50, "top_p": 0.9, "seed": 7, "stop": ["x", "y"]},
        "provider": {"order": ["openai", "azure"], "ignore": ["deepinfra", "together"]},
        "fallbacks": ["anthropic/claude-3.5-haiku", "google/gemini-2.0-flash-001"],
    }
    here = key(write_spec, **shaped)
    assert key(write_spec, **shaped) == here and len(here) == 32
    elsewhere = {
        subprocess.run(
            [sys.executable, "-c", KEY_IN_A_PROCESS, str(write_spec(**shaped)), "openai/gpt-4o-mini"],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in (1, 2)
    }
    assert elsewhere == {here}


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


def test_text_fingerprints_are_those_earlier_versions_stored(tmp_path: Path) -> None:
    """Multimodal prompts changed how parts are fingerprinted, not text: a text job's key is still the one
    checkpoints written before hold (computed with the tree before content parts existed), so nothing is re-asked."""
    (tmp_path / "in.csv").write_text("id,text\n1,hi\n")
    (tmp_path / "job.yaml").write_text(
        "name: fp\ninput: in.csv\noutput: out.parquet\nmodels: [openai/gpt-4o-mini]\n"
        "system: Be brief.\nprompt: Say {text}\nparams: {max_tokens: 5}\n"
    )
    builder = RequestBuilder(load_spec(tmp_path / "job.yaml"))
    prompt = builder.prompt(Row(0, "1", {"id": "1", "text": "hi"}))
    assert builder.fingerprint(prompt, "openai/gpt-4o-mini") == "3b693096d5dac67130a7c9982f93676b"


def media_builder(tmp_path: Path, **changes: object) -> RequestBuilder:
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"a" * 40)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"b" * 40)
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4 /Type /Page >>")
    spec = {
        "name": "m",
        "input": "in.csv",
        "output": "out.parquet",
        "models": ["openai/gpt-4o-mini"],
        "prompt": "Label {title}",
        "images": ["photo"],
        "files": ["scan"],
        "image_detail": "low",
        **changes,
    }
    (tmp_path / "in.csv").write_text("title,photo,scan\nx,a.png,doc.pdf\n")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return RequestBuilder(load_spec(tmp_path / "job.yaml"))


def media_row(photo: object = "a.png", scan: object = "doc.pdf") -> Row:
    return Row(0, "0", {"title": "x", "photo": photo, "scan": scan})


def test_the_shorthand_adds_parts_after_the_text(tmp_path: Path) -> None:
    """images:/files: append an image part (with image_detail) and a file part (named after the file) to the
    user message, after its text; the body validates against ChatRequest once its files are streamed in."""
    builder = media_builder(tmp_path)
    prompt, problem = builder.prompt_of(media_row())
    assert problem is None
    text, image, document = prompt[0]["content"]
    assert text == {"type": "text", "text": "Label x"}
    assert image["image_url"]["detail"] == "low" and isinstance(image["image_url"]["url"], Media)
    assert document["file"]["filename"] == "doc.pdf" and isinstance(document["file"]["file_data"], Media)
    encoded = encode_body(builder.body(prompt, "openai/gpt-4o-mini"))
    body = json.loads(asyncio.run(collect(encoded)))
    assert openapi.validation_errors("ChatRequest", body) == []
    assert body["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")


async def collect(encoded: EncodedBody) -> bytes:
    return b"".join([chunk async for chunk in encoded.chunks()])


def test_media_fingerprints_follow_content_not_paths(tmp_path: Path) -> None:
    """The same image under another name (or as bytes) keeps the key; other content, or another detail, changes it."""
    builder = media_builder(tmp_path)
    (tmp_path / "copy.png").write_bytes((tmp_path / "a.png").read_bytes())

    def key(row: Row, of: RequestBuilder = builder) -> str:
        return of.fingerprint(of.prompt(row), "openai/gpt-4o-mini")

    base = key(media_row())
    assert key(media_row(photo="copy.png")) == base
    assert key(media_row(photo=str(tmp_path / "a.png"))) == base
    assert key(media_row(photo=(tmp_path / "a.png").read_bytes())) == base
    assert key(media_row(photo="b.png")) != base
    assert key(media_row(), media_builder(tmp_path, image_detail="high")) != base


def test_a_row_whose_file_cannot_be_sent_carries_its_problem(tmp_path: Path) -> None:
    """Every problem of the row is named; its key differs from a good row's, and changes once the file is there."""
    builder = media_builder(tmp_path)
    requests = list(builder.for_rows([media_row(photo="gone.png", scan="http://x/doc.pdf")]))
    assert len(requests) == 1
    problem = requests[0].problem or ""
    assert "photo: gone.png: no such file" in problem and "scan: http://x/doc.pdf is not https" in problem
    assert problem.endswith("; nothing was sent")
    (tmp_path / "gone.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"c" * 40)
    again = next(builder.for_rows([media_row(photo="gone.png", scan="doc.pdf")]))
    assert again.problem is None and again.fingerprint != requests[0].fingerprint


def test_media_tally_counts_what_prompts_carry(tmp_path: Path) -> None:
    """Images (and low-detail ones), PDFs with their pages, and URL PDFs whose pages are unknown are counted."""
    builder = media_builder(tmp_path)
    tally = media_tally(builder.prompt(media_row()))
    assert (tally.images, tally.low_detail_images, tally.files, tally.pages) == (1, 1, 1, 1)
    tally = media_tally(builder.prompt(media_row(scan="https://x.example/doc.pdf")))
    assert (tally.files, tally.pages, tally.unknown_pages) == (1, 0, 1)
    assert most_prompt_tokens(builder.prompt(media_row())) > MOST_TOKENS_PER_IMAGE


def test_a_stream_asks_other_servers_for_its_usage(write_spec: Callable[..., Path]) -> None:
    """vLLM, LiteLLM and OpenAI-style servers report a stream's tokens only when asked (stream_options.include_usage);
    OpenRouter and the sandbox always report them and get the body as the spec wrote it."""
    spec = load_spec(write_spec(params={"max_tokens": 20, "stream": True}))
    for server, asked in [("http://127.0.0.1:8000/v1", True), ("", False), ("sandbox", False)]:
        builder = RequestBuilder(spec, server=server)
        body = builder.body(builder.prompt(ROW), "openai/gpt-4o-mini")
        assert ("stream_options" in body) is asked and body.get("stream_options", {"include_usage": True}) == {
            "include_usage": True
        }
    unstreamed = RequestBuilder(load_spec(write_spec()), server="http://127.0.0.1:8000/v1")
    assert "stream_options" not in unstreamed.body(unstreamed.prompt(ROW), "openai/gpt-4o-mini")


@pytest.mark.parametrize(
    ("body", "field_tokens", "answers"),
    [
        ({"messages": []}, 0, 1),
        ({"tools": [{"type": "function"}]}, len('[{"type": "function"}]') + 256, 1),
        (
            {"response_format": {"type": "json_object"}, "tool_choice": "auto"},
            len('{"type": "json_object"}') + 256 + len('"auto"') + 256,
            1,
        ),
        ({"tools": None, "n": 3}, 0, 3),
        ({"n": 1}, 0, 1),
        ({"n": True}, 0, 1),  # a bool is not a count
        ({"n": "4"}, 0, 1),
        ({"response_format": {"schema": "é"}}, len('{"schema": "é"}'.encode()) + 256, 1),  # bytes, not characters
    ],
)
def test_what_beside_the_messages_a_worst_case_counts(body: dict[str, Any], field_tokens: int, answers: int) -> None:
    """Tools and schemas count at their JSON's bytes plus a preamble each; `n` answers are each billed (a bool or
    text is no count)."""
    assert most_field_tokens(body) == field_tokens
    assert choices(body) == answers


@pytest.mark.parametrize(
    ("text", "least"),
    [("", 0), ("x" * 31, 0), ("x" * 32, 1), ("é" * 32, 2), ("🔥" * 80, 10)],
)
def test_a_prompts_fewest_tokens_are_its_bytes_over_32(text: str, least: int) -> None:
    """The bound a prompt is refused by (past the context even at its fewest tokens) counts UTF-8 bytes over 32."""
    assert least_prompt_tokens([{"role": "user", "content": text}]) == least


def test_what_shapes_a_request_is_said_once_and_names_the_specs_keys() -> None:
    """spec.py's request-shaping keys and run-only keys are JobSpec's own keys, and no key is both."""
    assert set(JobSpec.model_fields) >= REQUEST_SHAPING_KEYS | RUN_ONLY_KEYS
    assert not REQUEST_SHAPING_KEYS & RUN_ONLY_KEYS
    assert set(BODY_KEYS) <= set(REQUEST_KEYS)


SHAPING_CHANGES: list[dict[str, Any]] = [
    {"endpoint": "completions"},
    {"cache_system_prompt": True},
    {"server_fallbacks": True, "fallbacks": ["openai/gpt-4o"]},
    {"params": {"max_tokens": 6}},
    {"provider": {"order": ["openai"]}},
    {"response_format": {"type": "json_object"}},
    {"fallbacks": ["openai/gpt-4o"]},
    {"system": "Be brief."},
    {"prompt": "Tell {text}"},
]
RUN_ONLY_CHANGES: list[dict[str, Any]] = [
    {"concurrency": 3},
    {"timeout_s": 9},
    {"unreachable_timeout_s": 9},
    {"rate_limit": {"requests_per_second": 2}},
    {"free_requests_per_day": 9},
    {"retry": {"max_attempts": 2}},
    {"budget_usd": 3},
    {"prices": {"openai/gpt-4o-mini": {"prompt_per_mtok_usd": 1, "completion_per_mtok_usd": 2}}},
    {"batch": {"poll_s": 5}},
    {"mode": "batch"},
]


@pytest.mark.parametrize(
    ("changes", "shapes"),
    [(c, True) for c in SHAPING_CHANGES] + [(c, False) for c in RUN_ONLY_CHANGES],
    ids=[next(iter(c)) for c in SHAPING_CHANGES] + [f"run-only {next(iter(c))}" for c in RUN_ONLY_CHANGES],
)
def test_a_request_shaping_key_changes_the_fingerprint_and_a_run_only_key_does_not(
    tmp_path: Path, changes: dict[str, Any], shapes: bool
) -> None:
    """Each request-shaping key (spec.py) asks a pair anew when changed; each run-only key leaves its answer stored."""
    assert set(changes) <= (REQUEST_SHAPING_KEYS if shapes else RUN_ONLY_KEYS)
    (tmp_path / "in.csv").write_text("id,text\n1,hi\n")
    base = {
        "name": "fp",
        "input": "in.csv",
        "output": "out.parquet",
        "models": ["openai/gpt-4o-mini"],
        "prompt": "Say {text}",
        "params": {"max_tokens": 5},
    }

    def key(spec: dict[str, Any]) -> str:
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        builder = RequestBuilder(load_spec(tmp_path / "job.yaml"))
        return builder.fingerprint(builder.prompt(Row(0, "1", {"id": "1", "text": "hi"})), "openai/gpt-4o-mini")

    assert (key(base) != key({**base, **changes})) is shapes
