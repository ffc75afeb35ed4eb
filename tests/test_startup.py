"""The calls a run makes before its first completion (GET /key, GET /models): asked again when the server
is busy or drops the connection, and a server's limits are never taken for OpenRouter's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.scripted import Reply, Scripted

from batchrunner.retries import RetryPolicy
from batchrunner.runner import RunSettings, run_job
from batchrunner.spec import load_spec

MODEL = "openai/gpt-4o-mini"
PRICED = {"id": MODEL, "pricing": {"prompt": "0.00000015", "completion": "0.0000006"}}
BUSY = {"error": {"code": 429, "message": "too many requests"}}
NO_WAIT = RetryPolicy(max_attempts=5, base_delay_s=0.0, max_delay_s=0.0)  # waits only what the server asks


async def test_key_and_models_are_asked_again_after_a_429_a_5xx_and_a_dropped_connection(
    write_spec: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """GET /key answered 429 (retry-after-ms: 300), then 200, and GET /models answered 503, then dropped, then
    200: the run waits what the 429 asked, reads the key's rate and the model's price (a budget runs)."""
    caplog.set_level(logging.INFO, logger="batchrunner")
    gets = {
        "/key": [Reply(429, BUSY, {"retry-after-ms": "300"}), Reply(200, {"data": {"limit_remaining": 40}})],
        "/models": [
            Reply(503, {"error": {"code": 503, "message": "busy"}}),
            Reply(drop=True),
            Reply(200, {"data": [PRICED]}),
        ],
    }
    async with Scripted(gets=gets) as server:
        spec = load_spec(write_spec(budget_usd=1, api={"base_url": server.base_url}))
        outcome = await run_job(spec, RunSettings(retry=NO_WAIT))
    assert outcome.report.stop is None and outcome.report.summary.ok == 12
    assert server.gets_of("/key") == 2 and server.gets_of("/models") == 3
    key_times = [at for path, at in server.got if path == "/key"]
    assert key_times[1] - key_times[0] >= 0.3, "the 429's retry-after-ms was waited"
    assert "rate limit: 40 requests/s (40.00 credits remaining" in caplog.text


async def test_a_server_that_is_not_openrouter_is_not_given_openrouters_rate(
    write_spec: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A non-OpenRouter server whose GET /key keeps answering 429: asked a few times, then the run goes on with
    no rate limit assumed (only concurrency), not OpenRouter's surge limit."""
    caplog.set_level(logging.INFO, logger="batchrunner")
    async with Scripted(gets={"/key": [Reply(429, BUSY)], "/models": [Reply(200, {"data": [PRICED]})]}) as server:
        spec = load_spec(write_spec(api={"base_url": server.base_url}))
        outcome = await run_job(spec, RunSettings(retry=NO_WAIT))
    assert outcome.report.stop is None and outcome.report.summary.ok == 12
    assert 1 < server.gets_of("/key") <= 5, "asked a few times, not once, not forever"
    assert "rate limit: none" in caplog.text and "surge" not in caplog.text
