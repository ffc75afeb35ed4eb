"""Hostile reproductions of broken promises, found by attacking this session's fixes of issue #23 (a reply cut
off mid-body, a silent reply to a stream request, tools and n in a request's worst case, a price too low, a second
Ctrl-C, a stop during start-up): each failed on the code it was written against."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import run_pairs, run_started, run_until
from helpers.scripted import Reply, Scripted, answer

from batchrunner.client import Client
from batchrunner.costs import PriceTable
from batchrunner.errors import TransientError
from batchrunner.runner import run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec

MODEL = "openai/gpt-4o-mini"
PRICES = PriceTable([{"id": MODEL, "pricing": {"prompt": "0.000001", "completion": "0.000004"}}])
UNPRICED = {"/models": [Reply(200, {"data": [{"id": MODEL, "object": "model"}]})]}


def one_row(tickets_csv: Path) -> None:
    tickets_csv.write_text("ticket_id,subject,text\nT-0,s,t\n")


async def _truncated_body(request: Any, response: Any) -> None:
    """A 200 whose Content-Length says 10,000 bytes: 40 are sent, then the connection closes (the answer was made)."""
    await response.write(b'{"id":"gen-1","model":"x","choices":[{"')
    await asyncio.sleep(0.05)
    request.transport.close()


async def _stream_cut(request: Any, response: Any) -> None:
    """A stream that has answered three tokens when its connection closes (the tokens were generated)."""
    for _ in range(3):
        await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"tok "}}]}\n\n')
        await asyncio.sleep(0.01)
    request.transport.close()


@pytest.mark.parametrize(
    ("reply", "stream"),
    [
        (
            Reply(200, headers={"Content-Type": "application/json", "Content-Length": "10000"}, write=_truncated_body),
            False,
        ),
        (Reply(200, headers={"Content-Type": "text/event-stream"}, write=_stream_cut), True),
    ],
    ids=["truncated-body", "stream-cut"],
)
async def test_a_reply_cut_off_mid_body_is_counted_as_maybe_billed(
    write_spec: Callable[..., Path], tickets_csv: Path, reply: Reply, stream: bool
) -> None:
    """Breaks 'a reply given up on may have been billed, and is counted': a 200 whose body (or stream) stops
    half-way was answered and billed by the server, but is charged $0 and retried (paid twice, counted once)."""
    one_row(tickets_csv)
    params: dict[str, Any] = {"max_tokens": 100, **({"stream": True} if stream else {})}
    spec = load_spec(write_spec(params=params))
    async with Scripted([reply, Reply(200, answer(cost_usd=0.00002))]) as server:
        report = await run_pairs(spec, server, pricing=PRICES)  # type: ignore[arg-type]
    [result] = report.results
    assert len(server.bodies) == 2 and result.attempts == 2
    assert result.cost_source == "estimated" and result.cost_usd > Decimal("0.00002")


async def test_a_silent_reply_to_a_stream_request_times_out_after_timeout_s() -> None:
    """Breaks 'silent streams time out after timeout_s': a stream request answered with JSON headers and then
    silence is waited on until stream_max_s (3600 s by default), not timeout_s."""

    async def silent(request: Any, response: Any) -> None:
        await response.write(b" ")
        await asyncio.sleep(1.2)
        await response.write(b'{"choices":[{"index":0,"message":{"content":"late"},"finish_reason":"stop"}]}')

    reply = Reply(200, headers={"Content-Type": "application/json"}, write=silent)
    async with Scripted([reply]) as server, Client(server.base_url, timeout_s=0.5, stream_max_s=30) as client:
        started = time.monotonic()
        with pytest.raises(TransientError):
            await client.chat({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True})
        assert time.monotonic() - started < 2


TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "word " * 20_000, "parameters": {}}}]


@pytest.mark.parametrize(
    ("params", "billed", "budget"),
    [
        (
            {"max_tokens": 50, "tools": TOOLS},
            answer(prompt_tokens=25_000, completion_tokens=2, cost_usd=0.025008),
            "0.02",
        ),
        ({"max_tokens": 50, "n": 10}, answer(prompt_tokens=10, completion_tokens=500, cost_usd=0.00201), "0.002"),
    ],
    ids=["100KB-of-tools", "n-10"],
)
async def test_what_a_request_asks_for_is_reserved_against_the_budget(
    write_spec: Callable[..., Path], params: dict[str, Any], billed: dict[str, Any], budget: str
) -> None:
    """Breaks 'budgets hold': servers bill tool definitions as prompt tokens and `n` answers as n answers, but a
    request's worst case counts only its messages at one max_tokens answer, so 4 requests in flight spend ~5x the
    budget (100 KB of tools: $0.025 a request, reserved at $0.00027; n: 10 sent as a non-OpenRouter parameter)."""
    async with Scripted([Reply(200, billed) for _ in range(12)], gets=UNPRICED) as server:
        spec = write_spec(
            budget_usd=float(budget),
            prices={MODEL: {"prompt_per_mtok_usd": 1, "completion_per_mtok_usd": 4}},
            params=params,
            api={"base_url": server.base_url},
        )
        outcome = await run_job(load_spec(spec))
    spent = pl.read_parquet(outcome.output_path)["cost_usd"].sum()
    assert spent <= Decimal(budget), f"{len(server.bodies)} requests sent, ${spent} recorded on a ${budget} budget"


async def test_a_cost_above_the_reservation_stops_the_run_after_the_requests_in_flight(
    write_spec: Callable[..., Path],
) -> None:
    """With `prices:` for a server that lists none, a stale (low) spec price makes reservations short; the server's
    true usage.cost (9x, under the 10x ceiling) is the bill. The first answer shows it: the run stops at once, and
    what it spends past the budget is the requests already in flight (it went on sending before: 12 requests)."""
    billed = [Reply(200, answer(prompt_tokens=10, completion_tokens=50, cost_usd=0.0019)) for _ in range(12)]
    async with Scripted(billed, gets=UNPRICED) as server:
        spec = write_spec(
            budget_usd=0.002,
            prices={MODEL: {"prompt_per_mtok_usd": 1, "completion_per_mtok_usd": 4}},
            params={"max_tokens": 50},
            api={"base_url": server.base_url},
        )
        outcome = await run_job(load_spec(spec))
    assert len(server.bodies) == 4, "only the requests in flight when the first answer came"
    assert outcome.report.halted and "times what the model's prices allow" in outcome.report.halted
    assert pl.read_parquet(outcome.output_path)["cost_usd"].sum() == 4 * Decimal("0.0019")


def test_a_second_ctrl_c_records_the_requests_on_the_wire(
    write_spec: Callable[..., Path], tmp_path: Path, sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> None:
    """Breaks 'a request given up on while on the wire counts at its worst case' for the second Ctrl-C: 4 requests
    the server received (and bills) leave nothing in the checkpoint, so `status` says $0 and a rerun buys them again."""
    sandbox = sandbox_in_thread(SandboxConfig(latency_s=3.0))
    job = write_spec(params={"max_tokens": 20}, concurrency=4)
    process = run_started(job, sandbox, requests=4)
    process.send_signal(signal.SIGINT)
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=30)
    assert sandbox.stats.requests == 4
    with sqlite3.connect(job.parent / "out" / "result.checkpoint.sqlite") as db:
        kept = db.execute("SELECT attempts, cost_source FROM results").fetchall()
    assert len(kept) == 4 and all(row == (1, "estimated") for row in kept), kept


def test_sigterm_while_start_up_waits_on_a_retry_after_stops_cleanly(
    write_spec: Callable[..., Path], scripted_in_thread: Callable[..., Scripted]
) -> None:
    """Breaks 'run unattended and stop cleanly (an exit code and one sentence)': SIGTERM while GET /models waits out
    a Retry-After kills the process by the signal (returncode -15), saying nothing."""
    busy = Reply(429, {"error": {"code": 429, "message": "busy"}}, headers={"Retry-After": "300"})
    server = scripted_in_thread(gets={"/models": [busy]})
    job = write_spec(api={"base_url": server.base_url})
    env = {**os.environ, "OPENROUTER_API_KEY": ""}
    process = run_until(job, env, lambda: server.gets_of("/models") >= 1)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 3, (process.returncode, stderr[-500:])
    assert "SIGTERM" in stderr
