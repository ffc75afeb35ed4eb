"""The live executor over real loopback HTTP: answers on their own rows, once each, stopping with a grace."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import run_pairs

from batchrunner import preflight
from batchrunner.executor import Execution
from batchrunner.halt import Halt, StopReason
from batchrunner.live import LiveExecutor
from batchrunner.output import export
from batchrunner.pending import Todo, pending
from batchrunner.preflight import prepare
from batchrunner.records import KeptResults, RowResult
from batchrunner.request import RequestBuilder
from batchrunner.runner import RunReport, RunSettings, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import JobSpec, load_spec
from batchrunner.store import Store

REPO = Path(__file__).resolve().parent.parent


async def run(spec: JobSpec, sandbox: Sandbox, **options: Any) -> RunReport:
    return await run_pairs(spec, sandbox, **options)


async def test_answers_land_on_their_own_rows_when_they_complete_out_of_order(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Later rows answer first (latency falls with the row number), yet each answer is on its own row."""

    def latency(body: dict[str, Any]) -> float:
        number = int(body["messages"][-1]["content"].rsplit(" ", 1)[-1])
        return 0.02 * (12 - number)

    spec = load_spec(write_spec(concurrency=12))
    store = Store.open(tmp_path / "checkpoint.sqlite")
    async with Sandbox(SandboxConfig(latency_s=latency)) as sandbox:
        report = await run(spec, sandbox, store=store)
    finished = [r.row_index for r in report.results]
    assert finished != sorted(finished), "answers should have completed out of order"
    store.flush()
    export(prepare(spec), RequestBuilder(spec), store, tmp_path / "out.parquet")
    frame = pl.read_parquet(tmp_path / "out.parquet")
    assert frame["ticket_id"].to_list() == [f"T-{i}" for i in range(12)]
    for ticket_id, text, response in frame.select("ticket_id", "text", "response").iter_rows():
        assert f"Ticket {ticket_id}: {text}" in response


async def test_each_row_runs_once_per_model(write_spec: Callable[..., Path]) -> None:
    """With several models every row gets one result per model, and costs add up exactly."""
    spec = load_spec(write_spec(models=["openai/gpt-4o-mini", "meta-llama/llama-3.1-8b-instruct"]))
    async with Sandbox() as sandbox:
        report = await run(spec, sandbox)
    pairs = sorted((r.row_index, r.requested_model) for r in report.results)
    assert len(pairs) == len(set(pairs)) == 24
    assert report.summary.cost_usd == sandbox.stats.charged_usd


async def test_stop_finishes_requests_in_flight_and_leaves_the_rest_pending(write_spec: Callable[..., Path]) -> None:
    """stop() (Ctrl-C) lets in-flight answers land, sends nothing new, and reports pending rows."""
    spec = load_spec(write_spec(concurrency=2))
    async with Sandbox(SandboxConfig(latency_s=0.05)) as sandbox:
        halt = Halt()
        task = asyncio.create_task(run(spec, sandbox, halt=halt))
        while sandbox.stats.requests < 3:
            await asyncio.sleep(0.005)
        halt.stop(StopReason.INTERRUPTED, "interrupted")
        report = await task
    assert report.halted == "interrupted"
    assert report.summary.ok == sandbox.stats.statuses[200] == sandbox.stats.requests
    assert report.pending == 12 - report.summary.ok > 0


async def test_requests_in_flight_past_the_grace_period_are_abandoned(write_spec: Callable[..., Path]) -> None:
    """After stop(), requests still in flight when the grace period ends are cancelled; their rows stay pending."""
    spec = load_spec(write_spec(concurrency=2))
    async with Sandbox(SandboxConfig(latency_s=1.0)) as sandbox:
        halt = Halt()
        task = asyncio.create_task(run(spec, sandbox, halt=halt, grace_s=0.05))
        while sandbox.stats.requests < 2:
            await asyncio.sleep(0.005)
        halt.stop(StopReason.INTERRUPTED, "interrupted")
        report = await asyncio.wait_for(task, 0.8)
    assert report.summary.done == 0 and report.pending == 12


async def test_an_input_unreadable_midway_stops_the_run_instead_of_hanging(
    write_spec: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input edited into an unreadable file after it was checked stops the run with a reason, instead of hanging."""
    # polars parses ahead in parallel: the error may surface before the first batch or after it.
    lines = ["ticket_id,subject,text", *[f"{i},s,text {i}" for i in range(12_000)]]
    (tmp_path / "late.csv").write_text("\n".join(lines) + "\n")
    spec = load_spec(write_spec(input="late.csv", id_column=None, concurrency=32))
    async with Sandbox() as sandbox:
        real_prepare = prepare

        def prepare_then_edit(spec: JobSpec) -> Any:  # checked whole, then edited under the run
            dataset = real_prepare(spec)
            with (tmp_path / "late.csv").open("a") as late:
                late.write("12000,s,text,one field too many\n")
            return dataset

        monkeypatch.setattr(preflight, "prepare", prepare_then_edit)
        report = await asyncio.wait_for(run(spec, sandbox), 60)
    assert report.halted and "reading late.csv failed after" in report.halted
    read = int(report.halted.split("failed after ")[1].split()[0])
    assert report.summary.done >= read - 2 * spec.concurrency, "rows read before the bad one were answered"


def test_an_input_rewritten_with_other_columns_after_its_check_stops_the_run_without_a_traceback(
    write_spec: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input replaced, between its check and the send, by a file without a column the prompt names (another
    export landing as the cron run starts) stops the run naming the input, exit 3, as an unreadable one does:
    before, a KeyError from the prompt's rendering ("a bug in batchrunner") and a traceback from the output."""
    import batchrunner
    from batchrunner import runner

    spec_path = write_spec()
    real_prepare = runner.prepare

    def prepare_then_replace(spec: JobSpec) -> Any:
        dataset = real_prepare(spec)
        (tmp_path / "tickets.csv").write_text("ticket_id,body\nT-0,other\n")
        return dataset

    monkeypatch.setattr(runner, "prepare", prepare_then_replace)
    result = batchrunner.run(spec_path, sandbox=True)
    assert result.exit_code == 3
    assert result.stop is not None and "tickets.csv" in result.stop.message
    assert "bug" not in result.stop.message and "columns" in result.stop.message


def _prepared_then(monkeypatch: pytest.MonkeyPatch, edit: Callable[[], None]) -> None:
    """`edit` the input right after the run's checking pass (runner.prepare), before anything is sent."""
    from batchrunner import runner

    real_prepare = runner.prepare

    def prepare_then_edit(spec: JobSpec) -> Any:
        dataset = real_prepare(spec)
        edit()
        return dataset

    monkeypatch.setattr(runner, "prepare", prepare_then_edit)


@pytest.mark.parametrize("left", [1, 2, 0])  # lines of the file left: its header, one row, nothing
def test_an_input_cut_short_after_its_check_stops_the_run_with_exit_3(
    write_spec: Callable[..., Path], tickets_csv: Path, monkeypatch: pytest.MonkeyPatch, left: int
) -> None:
    """An input emptied or cut short between its check and the send (an export being rewritten as the cron run
    starts) stops the run naming the input, exit 3: before, the run exited 0, "every row answered" to a scheduler,
    with the rows it never read pending."""
    import batchrunner

    spec_path = write_spec()
    kept = "".join(tickets_csv.read_text().splitlines(keepends=True)[:left])
    _prepared_then(monkeypatch, lambda: tickets_csv.write_text(kept))
    result = batchrunner.run(spec_path, sandbox=True)
    assert result.exit_code == 3, result
    assert result.stop is not None and "tickets.csv" in result.stop.message
    assert "fewer rows than when it was checked" in result.stop.message


def test_rows_appended_after_the_check_wait_for_the_next_run_which_checks_them(
    write_spec: Callable[..., Path], tickets_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows appended between the check and the send were never checked (here a duplicate id): this run sends
    and writes only the rows it checked; the next run checks the new ones and refuses the duplicate, exit 2.
    Before: the duplicate was sent, paid for and written twice under one id."""
    import batchrunner

    spec_path = write_spec()
    checked = tickets_csv.read_text()
    first_id = checked.splitlines()[1].split(",")[0]
    _prepared_then(monkeypatch, lambda: tickets_csv.write_text(checked + f"{first_id},appended again\nT-new,new\n"))
    result = batchrunner.run(spec_path, sandbox=True)
    assert result.exit_code == 0 and result.summary.ok == 12
    output = pl.read_parquet(spec_path.parent / "out" / "result.parquet")
    assert output.height == 12 and output["ticket_id"].n_unique() == 12
    monkeypatch.undo()
    with pytest.raises(batchrunner.SpecError, match="ticket_id"):
        batchrunner.run(spec_path, sandbox=True)


class OneAtATime:
    """A second executor, written here to prove the seam is real: it answers every pair in turn, no pool."""

    def __init__(self) -> None:
        self.answered: list[str] = []

    async def execute(self, work: Any, policy: Any, sinks: Any, halt: Any) -> Execution:
        resumed = 0
        for batch in work:
            resumed += sum(batch.answered.values())
            for todo in batch.todo:
                if halt.stopping:
                    return Execution(resumed, 0.0)
                result = await policy.answer(todo)
                if result is not None:
                    self.answered.append(todo.request.row.id)
                    sinks.add(result)
        return Execution(resumed, 0.0)


async def test_a_job_runs_the_same_through_another_executor(write_spec: Callable[..., Path]) -> None:
    """The same job through a sequential executor: the same rows answered, checkpointed and written, the same
    output as the live pool gives; a rerun through it sends nothing; its budget stop comes through the same halt."""
    async with Sandbox() as sandbox:
        spec = load_spec(write_spec(api={"base_url": sandbox.base_url}))
        sequential = OneAtATime()
        first = await run_job(spec, RunSettings(executor=sequential))
        sequential_output = pl.read_parquet(spec.output)
        again = await run_job(spec, RunSettings(executor=OneAtATime()))
        live_spec = load_spec(write_spec(api={"base_url": sandbox.base_url}, output="live/result.parquet"))
        await run_job(live_spec)
        budgeted = await run_job(
            load_spec(write_spec(api={"base_url": sandbox.base_url}, output="budget/result.parquet")),
            RunSettings(executor=OneAtATime(), max_cost_usd=Decimal("0.0001")),
        )
    assert first.report.summary.ok == 12 and sequential.answered == [f"T-{i}" for i in range(12)]
    assert again.report.resumed == 12 and again.report.summary.done == 0
    live_output = pl.read_parquet(live_spec.output)
    assert sequential_output.drop("latency_s", "generation_id").equals(live_output.drop("latency_s", "generation_id"))
    assert budgeted.report.stop is not None and budgeted.report.stop.reason is StopReason.BUDGET


async def test_a_bug_while_preparing_rows_stops_the_run_saying_it_is_a_bug(write_spec: Callable[..., Path]) -> None:
    """An unexpected error from the work (not the input, not the checkpoint) still stops the run instead of leaving
    the workers waiting, and says it is a bug rather than blaming the input; what was answered is kept (pairs still
    queued are left pending, unpaid)."""
    spec = load_spec(write_spec())
    first = next(pending(prepare(spec), RequestBuilder(spec), None))

    def work() -> Any:
        yield first
        raise ValueError("an unexpected state")

    class Answer:
        def __init__(self) -> None:
            self.sending: set[asyncio.Task[Any]] = set()

        async def answer(self, todo: Todo) -> RowResult:
            return RowResult(todo.request.row.index, todo.request.row.id, 0, todo.request.requested_model, "ok")

    halt, kept = Halt(), KeptResults()
    await asyncio.wait_for(LiveExecutor(4).execute(work(), Answer(), kept, halt), 5)
    assert halt.outcome is not None and halt.outcome.reason is StopReason.INPUT
    assert "preparing the next rows failed (ValueError: an unexpected state); this is a bug" in halt.outcome.message
    assert "reading the input" not in halt.outcome.message
    assert 0 < len(kept) <= len(first.todo) and all(result.status == "ok" for result in kept)
