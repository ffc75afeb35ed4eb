"""One real request to OpenRouter, skipped unless OPENROUTER_API_KEY is set (it costs a fraction of a cent)."""

from __future__ import annotations

import os

import pytest

from batchrunner.client import Client
from batchrunner.spec import OPENROUTER_BASE_URL

pytestmark = pytest.mark.skipif(not os.environ.get("OPENROUTER_API_KEY"), reason="OPENROUTER_API_KEY is not set")


async def test_live_chat_completion_reports_usage_and_cost() -> None:
    """A real answer parses into a Completion with tokens, a cost and a generation id."""
    async with Client(OPENROUTER_BASE_URL, api_key=os.environ["OPENROUTER_API_KEY"], timeout_s=60) as client:
        completion = await client.chat(
            {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 5}
        )
        key = await client.key_info()
    assert completion.text and completion.usage.prompt_tokens > 0
    assert completion.usage.cost_usd is not None and completion.generation_id
    assert "limit_remaining" in key


async def test_live_two_row_batch_is_submitted_and_read_back() -> None:
    """A two-request batch is accepted by the real Batch API, parses, and can be read back (and cancelled,
    so the test costs nothing if it has not run yet)."""
    requests = [
        {"custom_id": f"live-{i}", "body": {"messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 5}}
        for i in range(2)
    ]
    async with Client(OPENROUTER_BASE_URL, api_key=os.environ["OPENROUTER_API_KEY"], timeout_s=60) as client:
        submitted = await client.submit_batch("openai/gpt-4o-mini", requests)
        again = await client.batch(submitted["id"])
        listed = await client.batches()
        if again["status"] not in ("completed", "failed", "expired", "cancelled"):
            await client.cancel_batch(submitted["id"])
    assert again["id"] == submitted["id"] and any(item["id"] == submitted["id"] for item in listed)
