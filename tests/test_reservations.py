"""What each request reserves against the budget before it goes: its own worst case, whatever it is.

Each test runs a job against the sandbox with a budget far above what it needs, records every
reservation the run makes (costs.Budget.reserve) beside every body the sandbox received, and checks
each reservation against that body's worst case computed here from its bytes: the prompt's UTF-8
bytes (no tokenizer makes more tokens than bytes) at the prompt price, the body's own max_tokens at
the completion price, plus what web search may add. A little slack is allowed for the per-message
role markers the bound adds, never enough to hide a missing doubling or a character count.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from helpers.formats import strict_object

from batchrunner.runner import RunSettings, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.sandbox.catalog import MODELS
from batchrunner.spec import load_spec

ROOMY_BUDGET_USD = Decimal(100)
MARKER_TOKENS = 16  # the most a message's role markers may add, per message, and once per request
PREAMBLE_TOKENS = 256  # the most a provider's template around a schema or tools may add

# an answer of about 500 tokens: cut off at max_tokens 150, and at 300 again
LONG_ANSWER = strict_object(
    {f"category_of_part_{i}": {"type": "string", "enum": ["bug", "billing"]} for i in range(60)}
)


def one_row(tmp_path: Path, text: str) -> str:
    pl.DataFrame({"ticket_id": ["T-0"], "text": [text]}).write_csv(tmp_path / "one.csv")
    return "one.csv"


def prompt_bytes(body: dict[str, Any]) -> int:
    """The prompt's bytes: its messages' text, and the JSON of the schema and tools rendered into it."""
    fields = [json.dumps(body[name], ensure_ascii=False) for name in ("response_format", "tools") if name in body]
    return sum(len(message["content"].encode()) for message in body["messages"]) + sum(len(f.encode()) for f in fields)


def worst_case_bounds(body: dict[str, Any], *, extra_usd: Decimal = Decimal(0)) -> tuple[Decimal, Decimal]:
    """The least and the most a correct reservation of `body` can be, at the sandbox's prices of its model."""
    listed = MODELS[body["model"].removesuffix(":online")]
    prompt, completion = Decimal(listed["prompt"]), Decimal(listed["completion"])
    max_tokens = body.get("max_completion_tokens") or body["max_tokens"]
    least = prompt_bytes(body) * prompt + max_tokens * completion + extra_usd
    preamble = sum(PREAMBLE_TOKENS for name in ("response_format", "tools") if name in body)
    return least, least + (MARKER_TOKENS * (len(body["messages"]) + 1) + preamble) * prompt


async def run_one(spec_path: Path) -> tuple[Any, Sandbox]:
    async with Sandbox(SandboxConfig(record_bodies=True)) as sandbox:
        spec = load_spec(spec_path)
        spec = spec.model_copy(update={"api": spec.api.model_copy(update={"base_url": sandbox.base_url})})
        outcome = await run_job(spec, RunSettings(max_cost_usd=ROOMY_BUDGET_USD))
    return outcome, sandbox


async def test_a_cut_off_repair_reserves_its_longer_prompt_at_twice_max_tokens(
    write_spec: Callable[..., Path], tmp_path: Path, reservations: list[Decimal]
) -> None:
    """Each repair of a cut-off structured answer reserves its own body: the conversation so far at twice the room."""
    spec_path = write_spec(
        input=one_row(tmp_path, "the app crashes " * 20),
        prompt="{text}",
        response_format=LONG_ANSWER,
        params={"max_tokens": 150},
        concurrency=1,
    )
    outcome, sandbox = await run_one(spec_path)
    bodies = sandbox.stats.bodies
    assert len(bodies) >= 2 and len(reservations) == len(bodies), "the first answer was cut off and repaired"
    assert [body["max_tokens"] for body in bodies[:2]] == [150, 300]
    assert prompt_bytes(bodies[1]) > prompt_bytes(bodies[0]), "the repair carries the answer and what was wrong"
    for body, reserved in zip(bodies, reservations, strict=True):
        least, most = worst_case_bounds(body)
        assert least <= reserved <= most, (body["max_tokens"], least, reserved, most)
    assert outcome.report.summary.cost_usd == sandbox.stats.charged_usd


async def test_a_non_ascii_prompt_is_reserved_at_its_byte_length(
    write_spec: Callable[..., Path], tmp_path: Path, reservations: list[Decimal]
) -> None:
    """CJK text and emoji take 3 and 4 bytes a character: the reservation counts bytes, not characters."""
    text = "服务器在上传文件时崩溃了，请尽快修复。" * 30 + "🔥" * 200
    assert len(text.encode()) > 3 * len(text)
    spec_path = write_spec(input=one_row(tmp_path, text), prompt="{text}", params={"max_tokens": 1}, concurrency=1)
    _, sandbox = await run_one(spec_path)
    [body] = sandbox.stats.bodies
    least, most = worst_case_bounds(body)
    assert least <= reservations[0] <= most


@pytest.mark.parametrize(
    ("model", "plugins", "search_usd"),
    [
        ("openai/gpt-4o-mini:online", None, Decimal("0.02")),  # 5 results at $4 per 1,000
        ("openai/gpt-4o-mini", [{"id": "web", "max_results": 3}], Decimal("0.012")),
        ("openai/gpt-4o-mini", [{"id": "web"}], Decimal("0.02")),
    ],
)
async def test_web_search_is_part_of_each_requests_reservation(
    write_spec: Callable[..., Path],
    tmp_path: Path,
    reservations: list[Decimal],
    model: str,
    plugins: list[dict[str, Any]] | None,
    search_usd: Decimal,
) -> None:
    """A `:online` model or the web plugin may add its search results' price to a request: it is reserved."""
    params: dict[str, Any] = {"max_tokens": 5, **({"plugins": plugins} if plugins else {})}
    spec_path = write_spec(input=one_row(tmp_path, "hello"), models=[model], prompt="{text}", params=params)
    _, sandbox = await run_one(spec_path)
    [body] = sandbox.stats.bodies
    least, most = worst_case_bounds(body, extra_usd=search_usd)
    assert least <= reservations[0] <= most
