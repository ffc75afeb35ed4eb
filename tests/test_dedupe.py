"""dedupe.py: identical requests are sent once per run and once across runs; copies say whose answer they are."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import polars as pl
from helpers.formats import strict_object

from batchrunner.queries import estimate_job
from batchrunner.retries import RetryPolicy
from batchrunner.runner import RunSettings, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec


def texts_csv(tmp_path: Path, texts: list[str], name: str = "texts.csv") -> str:
    pl.DataFrame({"ticket_id": [f"T-{i}" for i in range(len(texts))], "text": texts}).write_csv(tmp_path / name)
    return name


def with_duplicates(n: int, distinct: int) -> list[str]:
    """n texts of which `distinct` differ; the copies scattered among them."""
    return [f"question {(i * 13) % distinct}" for i in range(n)]  # 13 is prime to the counts used


async def test_a_third_duplicates_send_only_the_distinct_requests(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """100 rows, 70 distinct texts: 70 requests; every row answered; each copy names the row that paid, costs
    nothing, and the summary's saving is what the paying rows cost."""
    async with Sandbox(SandboxConfig(latency_s=0.01)) as sandbox:
        spec = load_spec(
            write_spec(
                input=texts_csv(tmp_path, with_duplicates(100, 70)), prompt="{text}", api={"base_url": sandbox.base_url}
            )
        )
        outcome = await run_job(spec)
    summary = outcome.report.summary
    assert sandbox.stats.requests == 70
    assert summary.ok == 100 and summary.deduped == 30
    output = pl.read_parquet(spec.output)
    assert output.height == 100 and (output["status"] == "ok").all()
    copies = output.filter(pl.col("deduped_from").is_not_null())
    assert copies.height == 30 and (copies["cost_usd"] == 0).all() and (copies["attempts"] == 0).all()
    paid = output.filter(pl.col("deduped_from").is_null())
    cost_of = dict(zip(paid["ticket_id"], paid["cost_usd"], strict=True))
    text_of = dict(zip(output["ticket_id"], output["text"], strict=True))
    answer_of = dict(zip(paid["ticket_id"], paid["response"], strict=True))
    for copy in copies.iter_rows(named=True):
        assert text_of[copy["deduped_from"]] == copy["text"] and answer_of[copy["deduped_from"]] == copy["response"]
    assert summary.dedupe_saved_usd == sum((cost_of[r] for r in copies["deduped_from"]), Decimal(0))
    assert summary.cost_usd == sandbox.stats.charged_usd
    assert any(line.startswith("deduplicated: 30 rows") for line in summary.lines(wall_s=1, pending=0))


async def test_rows_appended_later_are_answered_from_the_checkpoint(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Tomorrow's rows whose requests today's run answered are copied from the checkpoint: only new texts are sent."""
    source = texts_csv(tmp_path, [f"question {i}" for i in range(20)])
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(input=source, prompt="{text}", api={"base_url": sandbox.base_url}))
        await run_job(spec)
        assert sandbox.stats.requests == 20
        grown = [f"question {i}" for i in range(20)] + [f"question {i}" for i in range(10)] + ["new a", "new b"]
        texts_csv(tmp_path, grown)
        estimate = await estimate_job(spec)
        outcome = await run_job(spec)
    assert estimate["rows"] == 2 and estimate["models"]["openai/gpt-4o-mini"]["deduplicated_rows"] == 10
    assert sandbox.stats.requests == 22 and outcome.report.summary.deduped == 10
    output = pl.read_parquet(spec.output)
    assert output.height == 32 and output.filter(pl.col("deduped_from").is_not_null()).height == 10


async def test_dedupe_false_sends_every_row(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """With dedupe: false every row is sent."""
    async with Sandbox() as sandbox:
        spec = load_spec(
            write_spec(
                input=texts_csv(tmp_path, ["same"] * 6),
                prompt="{text}",
                dedupe=False,
                api={"base_url": sandbox.base_url},
            )
        )
        await run_job(spec)
    assert sandbox.stats.requests == 6


async def test_copies_of_a_failed_request_fail_with_it(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """A request that fails fails for each row asking it, once paid for: the copies say so and cost nothing."""
    config = SandboxConfig(down_models={"openai/gpt-4o-mini"})
    async with Sandbox(config) as sandbox:
        spec = load_spec(
            write_spec(
                input=texts_csv(tmp_path, ["a", "b", "a", "a", "b"]),
                prompt="{text}",
                retry={"max_attempts": 2},
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec, RunSettings(retry=RetryPolicy.immediate(max_attempts=2)))
    assert sandbox.stats.requests == 4  # two distinct requests, two attempts each
    output = pl.read_parquet(spec.output)
    assert (output["status"] == "failed").all() and outcome.report.summary.failed == 5
    assert output.filter(pl.col("deduped_from").is_not_null())["attempts"].to_list() == [0, 0, 0]


async def test_batch_mode_submits_each_distinct_request_once(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """The Batch API gets the distinct requests; the copies are recorded when their batch is collected."""
    async with Sandbox() as sandbox:
        spec = load_spec(
            write_spec(
                input=texts_csv(tmp_path, with_duplicates(40, 25)),
                prompt="{text}",
                mode="batch",
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec)
    submitted = sum(len(batch.requests) for batch in sandbox.batches.batches.values())
    assert submitted == 25 and outcome.report.summary.ok == 40 and outcome.report.summary.deduped == 15


async def test_a_stop_while_the_paid_request_is_in_flight_leaves_its_copies_pending(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """The budget stops the run between a request's paid answer and its repair: the request's copies stay
    pending (no record, no copy of an unfinished answer), and the summary's saving counts only real copies."""
    triage = strict_object({"category": {"type": "string", "enum": ["bug", "billing"]}, "urgency": {"type": "integer"}})
    config = SandboxConfig(faults={"schema_violation": 1.0}, latency_s=0.01)
    async with Sandbox(config) as sandbox:
        spec = load_spec(
            write_spec(
                input=texts_csv(tmp_path, with_duplicates(80, 20)),
                prompt="{text}",
                response_format=triage,
                concurrency=4,
                api={"base_url": sandbox.base_url},
            )
        )
        outcome = await run_job(spec, RunSettings(max_cost_usd=Decimal("0.0003")))
    assert outcome.report.halted and "budget" in outcome.report.halted
    with sqlite3.connect(spec.checkpoint_path()) as db:
        records = {row[0]: row[1:] for row in db.execute("SELECT row_id, status, deduped_from, cost_usd FROM results")}
    stopped = [row for row, (status, _, cost) in records.items() if status == "pending" and Decimal(cost) > 0]
    assert stopped, "a paid request was stopped before its repair"
    copies = {row: payer for row, (_, payer, _) in records.items() if payer is not None}
    assert all(records[payer][0] != "pending" for payer in copies.values()), "a copy of an unfinished answer"
    text_of = dict(enumerate(with_duplicates(80, 20)))
    stopped_texts = {text_of[int(row.removeprefix("T-"))] for row in stopped}
    waiting = [f"T-{i}" for i, text in text_of.items() if text in stopped_texts and f"T-{i}" not in stopped]
    assert waiting and all(row not in records for row in waiting), "the stopped request's copies stay unrecorded"
    summary = outcome.report.summary
    saved = sum((Decimal(records[payer][2]) for payer in copies.values()), Decimal(0))
    assert summary.deduped == len(copies) and summary.dedupe_saved_usd == saved
    assert summary.cost_usd == sandbox.stats.charged_usd
