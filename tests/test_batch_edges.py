"""Edges of the Batch API executor found by a hostile review of the row flow: each test failed before its fix."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchrunner.runner import run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string"}},
    "required": ["label"],
    "additionalProperties": False,
}


def rows_csv(tmp_path: Path, n: int) -> str:
    path = tmp_path / f"rows{n}.csv"
    pl.DataFrame({"ticket_id": [f"T-{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)]}).write_csv(path)
    return path.name


async def test_a_fallback_run_live_keeps_its_batch_bill_and_its_place_in_the_chain(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """A pair whose batch answer was paid for and given up on goes live to its fallback (fallback_to_realtime) with
    that bill and on the fallback, not restarted on the requested model with the batch bill dropped."""
    requested, fallback = "openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"
    async with Sandbox(SandboxConfig(faults={"invalid_json": 1.0}, no_batch_models={fallback})) as sandbox:
        spec = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 3),
                models=[requested],
                fallbacks=[fallback],
                mode="batch",
                repair={"same_model": 0},
                batch={"fallback_to_realtime": True},
                response_format={"type": "json_schema", "json_schema": {"name": "t", "strict": True, "schema": SCHEMA}},
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec)
    output = pl.read_parquet(spec.output)
    assert output["status"].to_list() == ["failed"] * 3
    assert sandbox.stats.by_model[requested] == 3, "the requested model was asked in its batch only, not again live"
    assert sandbox.stats.by_model[fallback] == 3
    assert output["attempts"].to_list() == [2] * 3
    assert sum(output["cost_usd"].to_list()) == sandbox.stats.charged_usd > 0
    assert outcome.report.summary.cost_usd == sandbox.stats.charged_usd


async def test_a_stop_while_batches_are_polled_ends_the_run_at_once(
    write_spec: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop (Ctrl-C) while the run waits between looks at its batches ends the wait at once: it slept out the
    whole poll interval (up to max_poll_s, 5 minutes) before stopping."""
    from batchrunner.batch import BatchExecutor
    from batchrunner.halt import StopReason

    look = BatchExecutor._look

    async def look_then_stop(self: BatchExecutor, opened: Any) -> Any:
        batch = await look(self, opened)
        asyncio.get_running_loop().call_later(0.2, halts[0].stop, StopReason.INTERRUPTED, "Ctrl-C")
        return batch

    execute = BatchExecutor.execute
    halts: list[Any] = []

    async def keeping_halt(self: BatchExecutor, work: Any, answerer: Any, sinks: Any, halt: Any) -> Any:
        halts.append(halt)
        return await execute(self, work, answerer, sinks, halt)

    monkeypatch.setattr(BatchExecutor, "_look", look_then_stop)
    monkeypatch.setattr(BatchExecutor, "execute", keeping_halt)
    async with Sandbox(SandboxConfig(batch_turnaround_s=3600)) as sandbox:
        spec = load_spec(
            write_spec(
                input=rows_csv(tmp_path, 3),
                mode="batch",
                batch={"poll_s": 60, "max_poll_s": 60},
                api={"base_url": sandbox.base_url},
            )
        )
        started = time.monotonic()
        outcome = await asyncio.wait_for(run_job(spec), 30)
    assert outcome.report.stop is not None
    assert time.monotonic() - started < 10, "the stop waited out the poll interval"
