"""One run of a job, start to finish, in four phases, each a function of its own:

- plan (`plan_run`): everything that can refuse the job without the server (preflight.py, the key), before
  the lock, the checkpoint or a connection is opened;
- open (`open_run`, then `recall`): holding the job's lock, connected (connect.py), the server's terms (the
  rate, the prices, the budget), the checkpoint and what it recalls of earlier runs (rerun.py);
- execute (`execute_run`): the pairs still to answer (pending.py) handed to an executor (executor.py) with the
  answerer (live.py; each pair's rules are its flow, flow.py), the result sinks and the run's one halt (halt.py); then the judges' grades;
- write (`write_run`): the output rebuilt from the checkpoint at every exit, complete or not; the summary.

What a run may change beside its spec is one `RunSettings`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import polars as pl

from batchrunner import interrupts, jsontext, snapshots
from batchrunner.adaptive import Aimd
from batchrunner.breaker import Breaker
from batchrunner.client import Client
from batchrunner.connect import Connection
from batchrunner.costs import Budget, PriceTable, format_usd
from batchrunner.dataset import Dataset
from batchrunner.dedupe import Dedupe
from batchrunner.errors import (
    ApiError,
    FatalApiError,
    OutputError,
    Problem,
    RequestRejected,
    RunHalted,
    SpecError,
    TransientError,
)
from batchrunner.executor import Executor
from batchrunner.files import summary_path, write_text_atomically
from batchrunner.halt import Halt, Stop, StopReason
from batchrunner.judging import items as judge_items
from batchrunner.judging import judge_spec
from batchrunner.keylog import KeyLog
from batchrunner.limits import SURGE_LIMIT_RPS, FreeUsage, Limits, rate_from_key, state_dir
from batchrunner.live import InFlight, LiveAnswerer, LiveExecutor
from batchrunner.lock import job_lock, lock_path
from batchrunner.output import export, extend, remove_leftovers
from batchrunner.output import results as results_of
from batchrunner.pending import Batch, pending
from batchrunner.pool import Pool
from batchrunner.pool import pool_of as make_pool
from batchrunner.preflight import check_endpoints, check_models, check_output, prepare, select_rows
from batchrunner.progress import Progress
from batchrunner.records import KeptResults, ResultSink, RowResult, Sinks, Summary
from batchrunner.request import RequestBuilder
from batchrunner.rerun import JobState, LastRun, forget, job_state, last_run, mark_complete, unread_state
from batchrunner.retries import RetryPolicy
from batchrunner.sandbox import SandboxConfig
from batchrunner.spec import JobSpec, RateLimit
from batchrunner.store import COMMIT_INTERVAL_S, Store
from batchrunner.urls import Location, ObjectURL

log = logging.getLogger("batchrunner")
T = TypeVar("T")
UNREACHABLE = (
    "unreachable",
    "connection",
    "timeout",
)  # a server that does not answer at all: stop before the first row
NOT_ASKED_AGAIN = ("unreachable", "timeout")  # start-up calls to a server that cannot be reached are not repeated
START_UP_ATTEMPTS = 4  # GET /key, /models and the endpoints, each: the first try and up to three more


@dataclass
class RunReport:
    summary: Summary
    total: int  # (row, model) pairs the run set out to do
    wall_s: float
    stop: Stop | None = None  # why the run ended early, if it did (halt.py)
    resumed: int = 0  # pairs already answered by an earlier run, for the spec as it is now
    results: list[RowResult] = field(default_factory=list)  # only with keep_results
    judging: Summary | None = None  # the judge metrics' grades, when the job has any
    batch_saved_usd: Decimal | None = None  # batch mode: the discount against live prices
    concurrency: tuple[int, int] | None = None  # concurrency: auto, the limit it ended at and the most it reached

    @property
    def pending(self) -> int:
        return self.total - self.resumed - self.summary.done

    @property
    def halted(self) -> str | None:
        """Why dispatch stopped, if it did."""
        return self.stop.message if self.stop is not None and self.stop.stops_dispatch else None

    @property
    def deferred(self) -> str | None:
        """Why some rows were left for a later run without stopping it (free models out for the day)."""
        return self.stop.message if self.stop is not None and not self.stop.stops_dispatch else None

    @property
    def halt_error(self) -> ApiError | None:
        return self.stop.error if self.stop is not None else None


@dataclass
class Outcome:
    report: RunReport
    output_path: Location
    output_rows: int | None  # None when the output could not be written (the checkpoint has the answers)
    sandbox_url: str | None = None
    unsaved: int = 0  # answers the checkpoint could not take (in its spill file, for the next run, or lost)


@dataclass(frozen=True)
class RunSettings:
    """How one run goes, beside what its spec says: the command line's options and the seams tests drive.

    One object, not fourteen keywords, so each phase takes what it reads and a caller names only what it changes.
    """

    limit: int | None = None  # only the first rows of the input
    sandbox: SandboxConfig | None = None  # answered by an in-process sandbox instead of the spec's base URL
    retry: RetryPolicy | None = None  # instead of the spec's `retry:` (tests: no waiting)
    progress_factory: Callable[..., Progress] | None = None  # the progress display, given the pairs to do
    on_start: Callable[[str | None], None] | None = None  # told the sandbox's URL (or None) once connected
    credit_refresh_s: float = 5.0  # how often the key's credits are read again while the run spends them
    fresh: bool = False  # delete every stored answer first
    where: str | None = None  # only the input rows this SQL WHERE clause selects (--where)
    ids: frozenset[str] | None = None  # only the input rows with these ids (--ids)
    retry_failed: bool = False  # only the pairs whose last attempt failed (--retry-failed)
    hard_exit: bool = True  # a second Ctrl-C or SIGTERM ends the process (the CLI); else the run returns (the API)
    flush_s: float = COMMIT_INTERVAL_S  # how often the checkpoint commits
    breaker: Breaker | None = None  # instead of the answerer's own circuit breaker
    max_cost_usd: Decimal | None = None  # --max-cost: wins over the spec's budget_usd
    executor: Executor | None = None  # instead of the live pool (or, in batch mode, the Batch API)
    keep_results: bool = False  # every RowResult kept in the report (tests)
    wait: bool = True  # batch mode: wait for the batches to end (False: --no-wait)


@dataclass(frozen=True)
class Plan:
    """A job that nothing could refuse before it is opened: what every later phase reads and none changes."""

    spec: JobSpec
    settings: RunSettings
    dataset: Dataset
    connection: Connection  # made (the key checked), not yet connected
    requests: RequestBuilder
    rows: int  # input rows the run reads (--limit, --where, --ids)
    source: Dataset  # what the run reads: the input, or the rows --where and --ids select (the output is all rows)

    @property
    def total(self) -> int:
        """The (row, model, sample) pairs the run sets out to do."""
        return self.rows * len(self.spec.models) * self.spec.samples

    @property
    def partial(self) -> bool:
        """The run reads a part of the job (--limit, --where, --ids, --retry-failed): it can never be the complete
        run a later one skips reading after, and its keys cover only what it read."""
        settings = self.settings
        return (
            settings.limit is not None
            or settings.where is not None
            or settings.ids is not None
            or (settings.retry_failed)
        )

    @property
    def sandbox_url(self) -> str | None:
        return self.connection.sandbox.base_url if self.connection.sandbox else None


@dataclass(frozen=True)
class ServerTerms:
    """What start-up learned from the server: the rate, the key's credits, the prices, the budget."""

    limits: Limits
    key_info: dict[str, Any] | None
    prices: PriceTable
    budget: Budget | None


@dataclass
class Opened:
    """The run's checkpoint and what it has recorded: the write phase reads it at every exit, however the
    phases after the open one ended, so what they learn is kept here as soon as it is known."""

    store: Store
    state: JobState | None  # the job as rerun.py records it; None with --limit or when it cannot be known
    known: LastRun | None = None  # what the last complete run left that still holds
    keylog: KeyLog | None = None  # each row's keys, kept for the output
    settled: str | None = None  # the state recorded with this run, in which earlier runs' answers are taken (recall)
    summary: Summary = field(default_factory=Summary)
    judging: Summary = field(default_factory=Summary)  # grading's cost, reported apart from the answers' own
    results: KeptResults = field(default_factory=KeptResults)


async def run_job(spec: JobSpec, settings: RunSettings | None = None) -> Outcome:
    """Run `spec` as `settings` say (by default: against the spec's server, with the live worker pool).

    Four phases: plan (refuse the job before anything is opened), open (the lock, the server's terms, the
    checkpoint), execute (answer the pairs left, then grade them) and write (the output, rebuilt from the
    checkpoint at every exit, complete or not; the summary). Pairs already answered are not sent again.
    """
    plan = plan_run(spec, settings if settings is not None else RunSettings())
    report: RunReport | None = None
    with interrupts.caught(hard_exit=plan.settings.hard_exit) as caught, job_lock(lock_path(spec.checkpoint_path())):
        if removed := remove_leftovers(spec.output):  # a killed run's or export's; none is live while we hold the lock
            log.info("removed what a killed run left beside %s: %s", spec.output, ", ".join(removed))
        async with plan.connection:
            terms, opened = await open_run(plan, caught)
            try:
                recall(plan, opened)
                report = await execute_run(plan, terms, opened, caught)
            finally:
                written = write_run(plan, opened, report, caught)
    assert report is not None
    return Outcome(report, spec.output, written, plan.sandbox_url, opened.store.spilled + opened.store.lost)


def plan_run(spec: JobSpec, settings: RunSettings) -> Plan:
    """Everything that can refuse the job without the server (SpecError, exit 2): checked before the lock, the
    checkpoint or a connection is opened, so a refused job leaves nothing behind."""
    if settings.sandbox is not None and spec.mode == "batch" and not settings.wait:
        raise SpecError(
            Problem(
                "--no-wait",
                "the built-in sandbox ends with this run, and the batches it holds with it, so the next run could "
                "never collect them: drop --no-wait, or start `batchrunner sandbox --port 8080` and point "
                "OPENROUTER_BASE_URL at it (without --sandbox)",
            )
        )
    if spec.mode != "batch" and not settings.wait:  # ignored, the job ran live at twice a batch's price
        raise SpecError(
            Problem(
                "--no-wait",
                "goes with batch mode, which submits and leaves the answers to the next run; a live run has no "
                "batch to wait for: add --mode batch (or `mode: batch` in the spec), or drop --no-wait",
            )
        )
    if settings.fresh and settings.retry_failed:  # --fresh deletes the failures --retry-failed would retry
        raise SpecError(
            Problem(
                "--retry-failed",
                "retries the failed rows the checkpoint holds, and --fresh deletes the checkpoint first: use one",
            )
        )
    if spec.executor == "ray":
        from batchrunner.cluster import ray_module

        ray_module(spec)  # Ray is installed (an optional extra), or the job is refused now, naming the fix
    dataset = prepare(spec)
    check_output(spec, dataset)
    if spec.id_column is None:
        log.warning(
            "no id_column: rows are known by their position, so a row inserted, deleted or reordered in the input "
            "re-sends every row after it; set id_column to a column that identifies each row"
        )
    connection = Connection(spec, sandbox=settings.sandbox)  # checks the key: refused before anything is opened
    requests = RequestBuilder(spec, server=connection.server)
    rows = dataset.rows if settings.limit is None else min(settings.limit, dataset.rows)
    source = dataset
    if settings.where is not None or settings.ids is not None:
        source = select_rows(dataset, spec, limit=settings.limit, where=settings.where, ids=settings.ids)
        rows = source.rows
    return Plan(spec, settings, dataset, connection, requests, rows, source)


async def open_run(plan: Plan, caught: interrupts.Interrupts) -> tuple[ServerTerms, Opened]:
    """Ask the server its terms (given up on at the first Ctrl-C: nothing has been sent), then open the
    checkpoint, once nothing else can refuse the job: only another job's checkpoint still can."""
    if plan.settings.on_start is not None:
        plan.settings.on_start(plan.sandbox_url)
    terms = await _unless_interrupted(ask_terms(plan), caught)
    store = Store.open(plan.spec.checkpoint_path(), server=plan.requests.server, job=plan.spec.name)
    state = job_state(plan.spec, plan.requests, plan.dataset) if not plan.partial else None
    return terms, Opened(store, state)


async def ask_terms(plan: Plan) -> ServerTerms:
    """The key, the model list and the endpoints, asked for at once (one round trip, not three); the key's
    verdict still comes first, then the models' and the endpoints', as when asked in turn."""
    spec, settings, connection = plan.spec, plan.settings, plan.connection
    checked = asyncio.ensure_future(check_on_server(spec, connection, settings.max_cost_usd, settings.retry))
    try:
        limits, key_info = await plan_limits(
            spec, connection.client, connection.key, count_free_usage=settings.sandbox is None, retry=settings.retry
        )
    except BaseException:
        checked.cancel()
        await asyncio.gather(checked, return_exceptions=True)
        raise
    prices, budget, endpoints = await checked
    prices.add_tiers(endpoints)  # the flex (and priority) tiers' own prices, for answers they serve
    return ServerTerms(limits, key_info, prices, budget)


def recall(plan: Plan, opened: Opened) -> None:
    """What the checkpoint says of earlier runs (--fresh forgets it all): the last complete run's, which this
    run forgets until it ends the same way, and a key log for the rows this run will read."""
    store = opened.store
    if plan.settings.fresh:
        store.delete_all()
    opened.known = known = last_run(store, plan.spec, opened.state, plan.dataset)  # unchanged, or grown
    forget(store)  # until this run ends the same way
    opened.settled = settled_state(plan, opened)
    store.begin_run(opened.settled)
    if not plan.partial and (known is None or known.grown):  # each row's keys, kept for the output
        first = known.rows if known is not None and known.grown else 0
        opened.keylog = KeyLog(plan.spec.output, plan.spec.input, first_row=first, rows=plan.rows)


def settled_state(plan: Plan, opened: Opened) -> str | None:
    """The job's state, for the checkpoint to record with this run and for pending() to take the answers of runs
    in the same state by position (Store.settled); None when an answer this run stores may have a key computed
    for the job in another state (a batch made by an earlier run, collected by this one) or when the state is
    not known (media, judges). A run of a part of the job (--limit, --where, --ids, --retry-failed) has one too:
    its rows keep their places in the input, and their keys are the job's."""
    if plan.spec.mode == "batch":
        return None
    if opened.state is not None:
        return opened.state.unread
    return unread_state(plan.spec, plan.requests.server) if plan.partial else None


async def execute_run(plan: Plan, terms: ServerTerms, opened: Opened, caught: interrupts.Interrupts) -> RunReport:
    """Answer the pairs left through the executor, then grade the answers (judge metrics); the first Ctrl-C
    stops dispatch, a second records what is on the wire and quits."""
    spec, settings, store = plan.spec, plan.settings, opened.store
    halt = Halt()
    progress = settings.progress_factory(plan.total, summary=opened.summary) if settings.progress_factory else None
    policy = answerer_of(plan, terms, halt, progress)
    if policy.pool is not None:  # the summary's line per endpoint: the pool's own counts, as they grow
        opened.summary.endpoints = policy.pool.stats
    background = _background(plan, terms, store, halt, progress)
    restore = _stop_on_signal(halt, caught)
    caught.before_quitting(_last_words(policy, store, caught))
    try:
        executor = settings.executor or default_executor(
            spec, store, plan.connection.client, wait=settings.wait, connection=plan.connection
        )
        work, into = _work(plan, opened, progress)
        execution = await executor.execute(work, policy, into, halt)
        judged = await judge(spec, plan.dataset, plan.requests, store, policy, executor, opened.judging, opened.keylog)
    finally:
        restore()
        caught.before_quitting(None)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if progress is not None:
            progress.close()
    report = RunReport(opened.summary, plan.total, execution.wall_s, halt.outcome, execution.resumed, opened.results)
    report.judging = judged
    if spec.mode == "batch":
        report.batch_saved_usd = policy.accounts.saved_usd
    if policy.in_flight is not None:
        aimd = policy.in_flight.aimd
        report.concurrency = (aimd.allowed, aimd.reached)
        log.info("concurrency: auto ended at %d in flight (the most it reached: %d)", aimd.allowed, aimd.reached)
    else:
        concurrency_hint(spec, report, terms.limits.pacer.rate_rps)
    return report


def answerer_of(plan: Plan, terms: ServerTerms, halt: Halt, progress: Progress | None) -> LiveAnswerer:
    """How each pair is answered, with the server's terms and the run's retry and breaker."""
    client, sandbox = plan.connection.client, plan.settings.sandbox
    return LiveAnswerer(
        plan.spec,
        client,
        halt,
        requests=plan.requests,
        retry=plan.settings.retry,
        limits=terms.limits,
        breaker=plan.settings.breaker,
        pricing=terms.prices,
        budget=terms.budget,
        on_wait=progress.retry if progress is not None else None,
        # OpenRouter may answer through the user's own provider keys (BYOK), adding its fee to their bill
        byok_fee=client.openrouter or (sandbox is not None and sandbox.byok),
        in_flight=InFlight(Aimd(plan.spec.max_concurrency)) if plan.spec.adaptive else None,
        pool=pool_of(plan),
    )


def pool_of(plan: Plan) -> Pool | None:
    """The spec's pool of endpoints (api.endpoints), each with its own breaker and server watch; None for one
    server, whose path stays as it was."""
    clients = plan.connection.endpoint_clients
    return make_pool(plan.spec, clients) if clients else None


def default_executor(
    spec: JobSpec, store: Store, client: Client, *, wait: bool, connection: Connection | None = None
) -> Executor:
    """The live worker pool (with `workers: N`, in N processes; with `executor: ray`, in Ray actors), or in batch
    mode the Batch API (with the pool for what falls back to it)."""
    if spec.executor == "ray" and connection is not None:
        from batchrunner.cluster import RayExecutor  # Ray, an optional extra: imported when it is asked for

        sandbox_url = connection.base_url if connection.sandbox is not None else None
        return RayExecutor(
            spec, address=spec.ray_address, sandbox_url=sandbox_url, server=connection.server, grace_s=grace_s(spec)
        )
    if spec.workers > 1 and connection is not None:
        from batchrunner.processes import ProcessExecutor  # multiprocessing's machinery, when it is asked for

        sandbox_url = connection.base_url if connection.sandbox is not None else None
        return ProcessExecutor(spec.workers, sandbox_url=sandbox_url, server=connection.server, grace_s=grace_s(spec))
    if spec.mode != "batch":
        return LiveExecutor(spec.most_in_flight, grace_s=grace_s(spec))
    from batchrunner.batch import BatchExecutor  # batch mode's machinery, when it is asked for

    return BatchExecutor(
        client,
        store,
        poll_s=spec.batch.poll_s,
        max_poll_s=spec.batch.max_poll_s,
        wait=wait,
        realtime=LiveExecutor(spec.most_in_flight) if spec.batch.fallback_to_realtime else None,
    )


def _background(
    plan: Plan, terms: ServerTerms, store: Store, halt: Halt, progress: Progress | None
) -> list[asyncio.Task[None]]:
    """What runs beside the executor: the checkpoint's commits, the progress line, the key's credits."""

    def cannot_commit(exc: BaseException) -> None:
        halt.stop(StopReason.CHECKPOINT, f"cannot write the checkpoint ({exc}); free disk space and rerun")

    background = [asyncio.create_task(store.flush_every(plan.settings.flush_s, cannot_commit))]
    if progress is not None:
        background.append(asyncio.create_task(progress.heartbeat()))
    if terms.key_info is not None and terms.key_info.get("limit_remaining") is not None:
        client, refresh_s = plan.connection.client, plan.settings.credit_refresh_s
        background.append(asyncio.create_task(follow_credits(client, terms.limits, refresh_s)))
    return background


def _work(plan: Plan, opened: Opened, progress: Progress | None) -> tuple[Iterable[Batch], ResultSink]:
    """The pairs left to answer, and where their results go (the summary, the checkpoint, the progress line,
    the kept results; with dedupe, copies of a request wait for its answer)."""
    spec, store, known, keylog = plan.spec, opened.store, opened.known, opened.keylog
    sinks: list[ResultSink] = [opened.summary, store]
    if progress is not None:
        sinks.append(progress)
    if plan.settings.keep_results:
        sinks.append(opened.results)
    first = known.rows if known is not None and known.grown else 0
    record = keylog.record if keylog is not None else None
    limit = None if plan.source is not plan.dataset else plan.settings.limit  # a selection applied it already
    work: Iterable[Batch] = pending(
        plan.source,
        plan.requests,
        store,
        limit=limit,
        start=first,
        on_keys=record,
        failed_only=plan.settings.retry_failed,
        settled_state=opened.settled,
    )
    if known is not None:  # the rows the last complete run answered are not read again
        earlier = Batch([], collections.Counter(known.answered), known.rows)
        if known.grown:
            log.info("%d rows appended since the last complete run: only they are read", plan.rows - known.rows)
            work = itertools.chain([earlier], work)
        else:
            log.info("nothing to send: the input and the spec are as the last complete run left them")
            work = [earlier]
    into: ResultSink = Sinks(*sinks)
    if spec.dedupe:  # identical requests sent once: the copies wait for, or take, an answer
        dedupe = Dedupe(store, into)
        work, into = dedupe.work(work), dedupe
    return work, into


def write_run(plan: Plan, opened: Opened, report: RunReport | None, caught: interrupts.Interrupts) -> int | None:
    """The run's end, at every exit: the checkpoint told how it ended, the output rebuilt from it (complete or
    not) and the summary JSON; the output's rows, or None when it could not be written."""
    summary = opened.summary
    outcome = "unfinished" if report is None else "stopped" if report.stop else "finished"
    opened.store.end_run(outcome, ok=summary.ok, failed=summary.failed, cost_usd=summary.cost_usd)
    try:
        written = write_output(plan, opened, report)
        complete = report is not None and report.stop is None and report.pending == 0 and not plan.partial
        if written is not None and complete and plan.spec.evaluate is not None and summary.done:
            snapshot_run(plan, opened)
    finally:
        if opened.keylog is not None:
            opened.keylog.close()
    opened.store.close()
    if report is not None and report.stop is None and caught.received is not None:
        # after dispatch ended: the output was written in full all the same, and the run stops here
        message = f"{caught.received.name} while the output was being written (it was written in full)"
        report.stop = Stop(StopReason.INTERRUPTED, message)
    if report is not None:
        write_json(summary_path(plan.spec.output), {"job": plan.spec.name, **summary_json(report)})
    return written


def snapshot_run(plan: Plan, opened: Opened) -> None:
    """Keep what this complete evaluation run answered, to be compared with later (snapshots.py); a run whose
    record cannot be written is still a complete run (the answers are in the checkpoint)."""
    from batchrunner.evaluation import gather
    from batchrunner.output import score_columns

    try:
        frame = gather(results_of(plan.dataset, plan.requests, opened.store, row_index=True, keys=opened.keylog))
        scores = [name for name, dtype in score_columns(plan.spec).items() if dtype == pl.Float64()]
        kept = snapshots.record(plan.spec, frame, scores)
        log.info("recorded this run as %s, for `report --baseline run:%d` later", kept.label, kept.number)
    except (OSError, pl.exceptions.PolarsError) as exc:
        log.warning("could not record this run for later comparison (%s); its answers are in the checkpoint", exc)


def write_output(plan: Plan, opened: Opened, report: RunReport | None) -> int | None:
    """The output from the checkpoint: kept when it is the last complete run's and nothing changed, extended
    when rows were only appended, else written whole; a complete run is recorded (rerun.py). An output that
    cannot be written is logged (the answers are safe in the checkpoint) and None returned."""
    spec, dataset, requests, store = plan.spec, plan.dataset, plan.requests, opened.store
    known, keylog, summary = opened.known, opened.keylog, opened.summary
    started = time.monotonic()
    written: int | None = None
    try:
        if known is not None and known.output_unchanged and not known.grown and summary.done == 0:
            written = known.written  # the output is the file the last run wrote: not rewritten
            log.info("%s is unchanged since the last complete run: not rewritten", spec.output)
        elif known is not None and known.output_unchanged and known.grown:  # add the new rows' answers
            added = extend(dataset, requests, store, spec.output, start=known.rows, keys=keylog)
            if added is not None:
                written = known.written + added
                log.info("added %d rows to %s in %.1f s", added, spec.output, time.monotonic() - started)
        if written is None:
            written = export(dataset, requests, store, spec.output, keys=keylog)
            log.info("wrote %d rows to %s in %.1f s", written, spec.output, time.monotonic() - started)
        if report is not None and report.stop is None and report.pending == 0 and summary.failed == 0:
            answered = {model: plan.rows * spec.samples for model in spec.models}
            mark_complete(store, spec, opened.state, answered, written)
    except (OutputError, OSError) as exc:  # the answers are safe: say how to get the file
        log.error("%s; every answer is in the checkpoint: fix that and run `batchrunner export`", exc)
    return written


def summary_json(report: RunReport) -> dict[str, Any]:
    """The run's summary as the JSON file beside the output says it (grading and the batch discount apart)."""
    found = report.summary.to_json(
        wall_s=report.wall_s,
        pending=report.pending,
        resumed=report.resumed,
        stopped=report.stop.message if report.stop else None,
    )
    if report.batch_saved_usd is not None:
        found["batch_saved_usd"] = str(report.batch_saved_usd)
    if report.judging is not None:
        found["grading"] = report.judging.to_json(wall_s=report.wall_s, pending=0, resumed=0, stopped=None)
    if report.concurrency is not None:
        found["concurrency"] = {"ended_at": report.concurrency[0], "most": report.concurrency[1]}
    return found


async def judge(
    spec: JobSpec,
    dataset: Any,
    requests: RequestBuilder,
    store: Store,
    policy: LiveAnswerer,
    executor: Executor | None,
    judging: Summary,
    keys: KeyLog | None = None,
) -> Summary | None:
    """Grade the answers with each judge metric (judging.py): the same executor, policy settings, rate
    limit, budget, halt and checkpoint as the answers; grades already in the checkpoint are not asked again."""
    rules = spec.evaluate.judges() if spec.evaluate is not None else []
    if not rules:
        return None
    for rule in rules:
        if policy.halt.stopping:
            break
        store.flush()  # the answers to grade are read back from the checkpoint
        judged = judge_spec(spec, rule)
        graders = RequestBuilder(judged, server=requests.server)
        answers = judge_items(spec, results_of(dataset, requests, store, row_index=True, keys=keys), dataset.columns)
        log.info("judging %d answers with %s", answers.rows, judged.models[0])
        grader = policy.sibling(judged, graders)
        await (executor or LiveExecutor(spec.most_in_flight)).execute(
            pending(answers, graders, store), grader, Sinks(judging, store), policy.halt
        )
    return judging


def concurrency_hint(spec: JobSpec, report: RunReport, pace_rps: float) -> None:
    """Say so when `concurrency` and not the rate limit held the run back: by Little's law,
    requests in flight / latency is the most a run can do."""
    latencies = sorted(s for stats in report.summary.by_model.values() for s in stats.latencies_s)
    if report.summary.done < 4 * spec.most_in_flight or not latencies or report.wall_s <= 0 or math.isinf(pace_rps):
        return
    latency_s = latencies[len(latencies) // 2]
    ceiling_rps = spec.most_in_flight / latency_s if latency_s > 0 else float("inf")
    if ceiling_rps < 0.5 * pace_rps:
        wanted = min(4096, int(pace_rps * latency_s * 1.2) + 1)
        log.info(
            "concurrency %d held the run to about %.0f requests/s (answers take %.1f s); the rate limit allows %.0f/s: "
            "concurrency: %d would use it",
            spec.most_in_flight,
            ceiling_rps,
            latency_s,
            pace_rps,
            wanted,
        )


async def fetch_prices(client: Client, spec: JobSpec | None = None, retry: RetryPolicy | None = None) -> PriceTable:
    """Model prices from GET /models, to cost answers the server does not price and to budget; the spec's
    `prices:` for the models the server lists no price for (a listed price wins: it is what the server bills,
    and a price written in a spec can go stale, which would let a budget's reservations fall short)."""
    fallback = spec.pricing() if spec is not None else {}
    try:
        models = await ask_at_start(client.models, start_up_retry(spec, retry), "GET /models")
    except ApiError as exc:
        _halt_if_unreachable(client, exc)
        log.warning("could not read model prices (%s): costs the server does not report will be unknown", exc)
        models = []
    prices = PriceTable(models, fallback)
    for model in prices.overridden:
        if prices[model] != fallback[model]:
            log.warning(
                "%s: %s lists its own price for %s, and the server's price is used (it is what it bills); "
                "remove the model from `prices:`",
                spec.locate(f"prices.{model}") if spec is not None else "prices",
                client.base_url,
                model,
            )
    return prices


async def check_on_server(
    spec: JobSpec, connection: Connection, max_cost_usd: Decimal | None = None, retry: RetryPolicy | None = None
) -> tuple[PriceTable, Budget | None, dict[str, list[dict[str, Any]]]]:
    """The checks that need the server's lists, as `run` makes them before its first request (and `validate`
    with it): the models it lists, their endpoints, and a budget it can price. SpecError if one fails."""
    prices, endpoints = await asyncio.gather(
        fetch_prices(connection.client, spec, retry), fetch_endpoints(connection.client, spec, retry)
    )
    check_models(spec, prices, strict=connection.strict)
    check_endpoints(spec, endpoints)
    return prices, plan_budget(spec, prices, max_cost_usd, base_url=connection.client.base_url), endpoints


def grace_s(spec: JobSpec) -> float:
    """How long requests in flight may finish once the run stops: a whole answer is paid for anyway, so it
    is waited for; a stream is cancelled at once, which stops its billing (the tokens it had generated
    are paid for and not kept)."""
    return 0.0 if spec.params.get("stream") is True else 30.0


async def fetch_endpoints(
    client: Client, spec: JobSpec, retry: RetryPolicy | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Each model's endpoints (GET /models/{model}/endpoints), to check before the first request that one
    can serve the job; a model whose endpoints cannot be read (another server) is left out."""
    models = list(dict.fromkeys([*spec.models, *spec.fallbacks]))
    policy = start_up_retry(spec, retry)
    found = await asyncio.gather(
        *(
            ask_at_start(functools.partial(client.endpoints, model), policy, f"GET {model}'s endpoints")
            for model in models
        ),
        return_exceptions=True,
    )
    return {model: listed for model, listed in zip(models, found, strict=True) if isinstance(listed, list) and listed}


def _halt_if_unreachable(client: Client, exc: ApiError) -> None:
    """A server that does not answer at all stops the run before the first row."""
    if isinstance(exc, TransientError) and exc.code in UNREACHABLE:
        raise RunHalted(f"cannot reach {client.base_url} ({exc}); check the network or api.base_url") from exc


def start_up_retry(spec: JobSpec | None, retry: RetryPolicy | None = None) -> RetryPolicy:
    """How the start-up calls are asked again: START_UP_ATTEMPTS times, waiting as `retry` (the run's) or the
    spec's `retry:` says between them."""
    if retry is not None:
        return dataclasses.replace(retry, max_attempts=START_UP_ATTEMPTS)
    settings = spec.retry if spec is not None else None
    if settings is None:
        return RetryPolicy(max_attempts=START_UP_ATTEMPTS)
    return RetryPolicy(START_UP_ATTEMPTS, settings.base_delay_s, settings.max_delay_s)


async def ask_at_start(call: Callable[[], Awaitable[T]], retry: RetryPolicy, what: str) -> T:
    """A start-up call (GET /key, /models, a model's endpoints) asked again after a 429, a 5xx or a dropped
    connection, waiting what the server asked (Retry-After) or backing off, at most `retry.max_attempts`
    times in all; then its last error is raised. A server that cannot be reached at all (refused, or
    silent past the timeout) is not asked again: the run stops at once (see _halt_if_unreachable)."""
    attempt = 0
    while True:
        try:
            return await call()
        except TransientError as exc:
            attempt += 1
            if exc.code in NOT_ASKED_AGAIN or attempt >= retry.max_attempts:
                raise
            delay_s = retry.delay_s(attempt, exc.retry_after_s)
            log.info(
                "%s: %s; asking again in %.1f s (attempt %d of %d)", what, exc, delay_s, attempt + 1, retry.max_attempts
            )
            await asyncio.sleep(delay_s)


def plan_budget(
    spec: JobSpec, prices: PriceTable, max_cost_usd: Decimal | None, *, base_url: str | None = None
) -> Budget | None:
    """The run's budget (--max-cost wins over budget_usd); refused if a model has no price to budget with."""
    if not any(key in spec.params for key in ("max_tokens", "max_completion_tokens")):
        log.warning(
            "params.max_tokens is not set: OpenRouter then reserves the model's whole output against your balance "
            "for every request, which ends in 402s on a small balance; set max_tokens"
        )
    limit = max_cost_usd if max_cost_usd is not None else spec.budget_usd
    if limit is None:
        return None
    judges = [rule.judge.model for rule in (spec.evaluate.judges() if spec.evaluate else []) if rule.judge]
    wanted = {m for model in spec.models for m in spec.model_chain(model)} | set(judges)
    unpriced = sorted(m for m in wanted if m not in prices)
    if unpriced:
        named = ", ".join(m if (why := prices.unusable(m)) is None else f"{m} ({why})" for m in unpriced)
        raise SpecError(
            Problem(
                "budget_usd",
                f"no prices for {named} at {base_url or spec.base_url()}/models; a budget needs them: give them under `prices:` "
                "({MODEL: {prompt_per_mtok_usd: ..., completion_per_mtok_usd: ...}}), or remove the budget",
            )
        )
    log.info("budget: %s for this run", format_usd(limit))
    return Budget(limit)


def write_json(path: Location, data: dict[str, Any]) -> None:
    text = jsontext.dumps(data, indent=1, default=str) + "\n"  # strict JSON, for any reader
    if isinstance(path, ObjectURL):  # the summary of an s3:// output, beside it: one PUT, whole or absent
        from batchrunner import objectstore

        try:
            objectstore.put_text(path, text)
        except Exception as exc:  # the store's errors: the answers and the output are safe, only the summary is lost
            log.error(
                "could not write the summary %s (%s); the output and the checkpoint are written",
                path,
                objectstore.said(exc),
            )
    else:
        write_text_atomically(path, text)


async def plan_limits(
    spec: JobSpec,
    client: Client,
    api_key: str | None,
    *,
    count_free_usage: bool = True,
    retry: RetryPolicy | None = None,
) -> tuple[Limits, dict[str, Any] | None]:
    """The rate to run at, and why: the spec's, or OpenRouter's credit rule applied to GET /key (asked again
    after a 429, a 5xx or a dropped connection). When the key cannot be read, OpenRouter's surge limit is
    assumed only for OpenRouter; another server's limits are unknown, so none is assumed.

    A key the server rejects stops the job here, before any completion is requested.
    """
    key_info: dict[str, Any] | None = None
    if isinstance(spec.rate_limit, RateLimit):
        rps, why = spec.rate_limit.rps, "set by rate_limit in the spec"
    else:
        try:
            key_info = await ask_at_start(client.key_info, start_up_retry(spec, retry), "GET /key")
        except FatalApiError as exc:
            raise RunHalted(str(exc)) from exc
        except ApiError as exc:
            _halt_if_unreachable(client, exc)
            if isinstance(exc, RequestRejected) and exc.status == 404:  # not OpenRouter: vLLM, llama.cpp, a proxy
                rps, why = math.inf, f"{client.base_url} has no /key endpoint, so no rate limit could be read"
            elif client.openrouter:
                rps, why = SURGE_LIMIT_RPS, f"the key's limits could not be read ({exc}); assuming the surge limit"
            else:  # OpenRouter's limits are OpenRouter's: another server's are not known
                rps, why = math.inf, f"{client.base_url} did not say the key's limits ({exc}), and it is not OpenRouter"
        else:
            if not key_info and not client.openrouter:  # an answer of no shape we know (client.key_info): said nothing
                rps, why = (
                    math.inf,
                    f"{client.base_url} answered GET /key with nothing we read, and it is not OpenRouter",
                )
            else:
                rps, why = rate_from_key(key_info)
    if math.isinf(rps):
        log.info(
            "rate limit: none (%s); only concurrency limits the run: at most %d in flight", why, spec.most_in_flight
        )
    else:
        log.info("rate limit: %g requests/s (%s); at most %d in flight", rps, why, spec.most_in_flight)
    usage = (
        FreeUsage.load(state_dir(), api_key)
        if any(m.endswith(":free") for m in [*spec.models, *spec.fallbacks])
        else None
    )
    cap = spec.free_requests_per_day
    daily = (key_info or {}).get("free_model_daily_requests")
    if isinstance(daily, dict) and isinstance(daily.get("limit"), int):  # the server's own count beats ours
        cap = daily["limit"]
        if usage is not None and isinstance(daily.get("used"), int):
            usage.used = max(usage.used, daily["used"])
    return Limits(rps, free_cap=cap, free_usage=usage), key_info


async def follow_credits(client: Client, limits: Limits, every_s: float) -> None:
    """Re-read the key's credits as the run spends them, and re-apply the credit rule."""
    while True:
        await asyncio.sleep(every_s)
        try:
            info = await client.key_info()
        except ApiError as exc:
            log.debug("could not re-read the key's limits: %s", exc)
            continue
        rps, why = rate_from_key(info)
        if abs(rps - limits.pacer.limit_rps) > 0.05 * limits.pacer.limit_rps:
            log.info("rate limit now %g requests/s (%s)", rps, why)
        limits.pacer.set_limit(rps)


async def _unless_interrupted(work: Awaitable[T], caught: interrupts.Interrupts) -> T:
    """Start-up's questions to the server (which may wait out a Retry-After of minutes), given up on at the first
    Ctrl-C or SIGTERM: nothing has been sent yet, so the run stops at once, saying so."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()

    def give_up(_signum: signal.Signals) -> None:  # in the signal handler: the loop may be waiting in select
        loop.call_soon_threadsafe(task.cancel)

    stop_listening = caught.listen(give_up)
    try:
        return await task
    except asyncio.CancelledError:
        if caught.received is None or not task.cancelled():
            raise
        raise RunHalted(
            f"{caught.received.name} while the run was starting: nothing was sent; rerun the same command to start it"
        ) from None
    finally:
        stop_listening()


def _last_words(policy: LiveAnswerer, store: Store, caught: interrupts.Interrupts) -> Callable[[], None]:
    """A second Ctrl-C or SIGTERM: the requests on the wire are given up on (each recorded at its worst case: it
    may have been billed) and committed, then the process exits (interrupts.py bounds how long this may take)."""
    loop = asyncio.get_running_loop()

    async def record_and_quit() -> None:
        wire = list(policy.sending)
        for task in wire:
            task.cancel()
        if wire:
            await asyncio.wait(wire, timeout=1.0)
        with contextlib.suppress(Exception):
            store.flush()
        caught.quit()

    def last_words() -> None:  # in the signal handler: the loop may be waiting in select
        loop.call_soon_threadsafe(lambda: loop.create_task(record_and_quit()))

    return last_words


def _stop_on_signal(halt: Halt, caught: interrupts.Interrupts) -> Callable[[], None]:
    """First Ctrl-C or SIGTERM (interrupts.py): stop dispatching and finish what is in flight; a second quits at
    once. The halt is stopped on the event loop, woken from the signal handler. Returns what stops listening."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        halt.stop(
            StopReason.INTERRUPTED, f"{signum.name}: finishing requests in flight (press Ctrl-C again to quit at once)"
        )

    def wake(signum: signal.Signals) -> None:  # in the signal handler: the loop may be waiting in select
        loop.call_soon_threadsafe(on_signal, signum)

    return caught.listen(wake)
