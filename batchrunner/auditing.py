"""`batchrunner audit JOB`: the job's answered rows looked up by generation id (GET /generation), each compared with
what OpenRouter kept (audit.py, pure), and what was learned kept in the checkpoint's `audits` table.

The lookups go at the job's rate (the same GET /key credit rule and pacer a run uses; slower after a 429) and are
asked again after a 429, a 5xx or a dropped connection, as a run's start-up calls are. OpenRouter writes a
generation's record some time after the answer: a 404 is asked again a few times within the audit (after
`LAG_WAITS_S`, all the lagging ids together), then left "unknown" for the next audit, never called a mismatch.
Every lookup's result is committed at once, so an audit stopped half-way (Ctrl-C, the server gone) keeps what it
learned and the next one asks only what is left.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from batchrunner import interrupts
from batchrunner.audit import Audit, KeptRecord, RecordedRow, Tolerance, audit, usd_text
from batchrunner.client import Client
from batchrunner.connect import Connection
from batchrunner.errors import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_STOPPED,
    ApiError,
    FatalApiError,
    Problem,
    RateLimited,
    RequestRejected,
    RunHalted,
    SpecError,
    TransientError,
    first_line,
)
from batchrunner.limits import Pacer
from batchrunner.offline import existing_checkpoint
from batchrunner.retries import RetryPolicy
from batchrunner.runner import NOT_ASKED_AGAIN, plan_limits, start_up_retry
from batchrunner.sandbox import SandboxConfig
from batchrunner.spec import JobSpec
from batchrunner.store import Store

log = logging.getLogger("batchrunner")

LAG_WAITS_S = (1.0, 2.0, 4.0)  # a generation not found is asked again after each of these, then left for later
MOST_IN_FLIGHT = 8  # lookups at once: the rate limit paces them; this only keeps a slow server from piling up


@dataclass(frozen=True)
class AuditSettings:
    """What one audit may change: which rows (a seeded sample), the tolerance, where (the sandbox), the waits."""

    sample: int | None = None  # audit this many rows, drawn at random (seeded), instead of all
    seed: int = 0
    tolerance: Tolerance = field(default_factory=Tolerance)
    sandbox: SandboxConfig | None = None
    lag_waits_s: tuple[float, ...] = LAG_WAITS_S
    retry: RetryPolicy | None = None  # the waits after a 429 or a 5xx (the spec's `retry:` when None)

    def __post_init__(self) -> None:
        if self.sample is not None and self.sample < 1:
            raise SpecError(Problem("--sample", f"{self.sample} rows: give 1 or more"))


@dataclass
class AuditOutcome:
    """An audit's result: every sampled row's verdict (this audit's lookups and earlier audits' together), what
    this audit asked, and why it stopped early if it did."""

    job: str
    audit: Audit
    tolerance: Tolerance
    rows_answered: int  # rows of this server with a generation id (before sampling)
    sampled: int | None  # the sample's size, when one was asked
    asked: int = 0  # generations this audit looked up (each counted once, however often it was asked)
    known_before: int = 0  # rows whose record an earlier audit had found: not asked again
    stopped: str | None = None  # why the audit stopped before asking everything (Ctrl-C, the server gone)

    @property
    def exceeds(self) -> bool:
        return self.audit.exceeds(self.tolerance)

    @property
    def exit_code(self) -> int:
        """3 stopped early, else 1 when the drift exceeds the tolerance, else 0."""
        if self.stopped is not None:
            return EXIT_STOPPED
        return EXIT_SOME_FAILED if self.exceeds else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        total = self.audit.total
        return {
            "job": self.job,
            "rows_answered": self.rows_answered,
            "sample": self.sampled,
            "asked": self.asked,
            "known_before": self.known_before,
            "tolerance": str(self.tolerance),
            "allowed_drift_usd": usd_text(self.tolerance.allowed_usd(total.kept_usd)),
            "exceeds_tolerance": self.exceeds,
            "stopped": self.stopped,
            "total": total.to_json(),
            "models": {model: self.audit.models[model].to_json() for model in sorted(self.audit.models)},
            "differing_rows": [item.to_json() for item in self.audit.differing()],
            "unknown_generations": [item.row.generation_id for item in self.audit.rows if item.kept is None],
        }


async def audit_job(spec: JobSpec, settings: AuditSettings | None = None) -> AuditOutcome:
    """Audit the job's answered rows (or a seeded sample of them) against OpenRouter's generation records.
    SpecError (exit 2) for a job without a checkpoint; a stop (Ctrl-C, the server gone) returns what was
    learned, with `stopped` saying why."""
    settings = settings or AuditSettings()
    checkpoint = existing_checkpoint(spec)
    server = spec.server(sandbox=settings.sandbox is not None)
    with Store.open(checkpoint, job=spec.name) as store:
        rows = [RecordedRow.from_record(record) for record in store.audit_rows(server)]
        answered = len(rows)
        if settings.sample is not None and settings.sample < len(rows):
            # the rows come sorted by generation id: the same seed draws the same rows, whatever was audited
            rows = sorted(random.Random(settings.seed).sample(rows, settings.sample), key=lambda r: r.generation_id)
        kept: dict[str, KeptRecord | None] = {}
        for generation_id, (state, text) in store.audited().items():
            if state == "found" and text is not None:
                kept[generation_id] = KeptRecord.from_json(json.loads(text))
        todo = list(dict.fromkeys(row.generation_id for row in rows if row.generation_id not in kept))
        outcome = AuditOutcome(
            spec.name,
            Audit(),
            settings.tolerance,
            answered,
            settings.sample,
            known_before=sum(1 for row in rows if row.generation_id in kept),
        )
        if todo:
            outcome.asked = len(todo)
            outcome.stopped = await _look_up(spec, settings, store, todo, kept)
    outcome.audit = audit(rows, kept)
    return outcome


async def _look_up(
    spec: JobSpec, settings: AuditSettings, store: Store, todo: list[str], kept: dict[str, KeptRecord | None]
) -> str | None:
    """Look every id of `todo` up, into `kept` and the checkpoint; the ids still without a record are kept as
    "unknown". Returns why it stopped early, or None."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    with interrupts.caught() as caught:

        def stopping(_signal: object) -> None:  # in the signal handler: hand it to the loop, which it wakes
            loop.call_soon_threadsafe(stop.set)

        stop_listening = caught.listen(stopping)
        try:
            async with Connection(spec, sandbox=settings.sandbox, timeout_s=60) as connection:
                limits, _ = await plan_limits(
                    spec, connection.client, connection.key, count_free_usage=False, retry=settings.retry
                )
                lookups = _Lookups(connection.client, limits.pacer, store, start_up_retry(spec, settings.retry), stop)
                lagging = await lookups.ask_all(todo, kept)
                for wait_s in settings.lag_waits_s:
                    if not lagging or lookups.stopped is not None:
                        break
                    log.info("%d generation(s) not recorded yet; asking again in %g s", len(lagging), wait_s)
                    if await _sleep_or_stop(wait_s, stop):
                        lookups.stopped = lookups.stopped or _stopped_by(caught)
                        break
                    lagging = await lookups.ask_all(lagging, kept)
                for generation_id in lagging:
                    store.record_audit(generation_id, "unknown", None)
                stopped = lookups.stopped
        except (ApiError, RunHalted) as exc:  # GET /key, before any lookup: the server is gone, or refuses the key
            stopped = f"could not start the lookups: {first_line(exc)}"
        finally:
            stop_listening()
        if stop.is_set() and stopped is None:
            stopped = _stopped_by(caught)
    return stopped


def _stopped_by(caught: interrupts.Interrupts) -> str:
    name = caught.received.name if caught.received is not None else "a stop"
    return f"{name}: stopped; rerun the audit to ask the rest"


async def _sleep_or_stop(wait_s: float, stop: asyncio.Event) -> bool:
    """Wait `wait_s`, or less if the audit is stopped meanwhile; whether it was."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=wait_s)
    except TimeoutError:
        return False
    return True


class _Lookups:
    """GET /generation for many ids at the job's pace, a few at once; each result committed as it comes."""

    def __init__(self, client: Client, pacer: Pacer, store: Store, retry: RetryPolicy, stop: asyncio.Event) -> None:
        self.client = client
        self.pacer = pacer
        self.store = store
        self.retry = retry
        self.stop = stop
        self.stopped: str | None = None

    async def ask_all(self, ids: list[str], kept: dict[str, KeptRecord | None]) -> list[str]:
        """Look each id up; returns the ids the server has no record of yet (a 404), in their order."""
        queue = list(reversed(ids))
        missing: set[str] = set()

        async def worker() -> None:
            while queue and self.stopped is None and not self.stop.is_set():
                generation_id = queue.pop()
                found = await self._ask(generation_id)
                if found is None:
                    missing.add(generation_id)
                elif found is not _STOPPED:
                    kept[generation_id] = found
                    self.store.record_audit(generation_id, "found", json.dumps(found.to_json()))

        await asyncio.gather(*(worker() for _ in range(min(MOST_IN_FLIGHT, len(ids)))))
        return [generation_id for generation_id in ids if generation_id in missing]

    async def _ask(self, generation_id: str) -> KeptRecord | None:
        """One lookup, asked again after a 429, a 5xx or a dropped connection; None for a 404 (no record yet),
        _STOPPED when the audit must stop (the server gone or refusing, sets `stopped`)."""
        attempt = 0
        while True:
            await self.pacer.acquire()
            try:
                return KeptRecord.from_generation(await self.client.generation(generation_id))
            except RequestRejected as exc:
                if exc.status == 404:
                    return None
                log.warning("generation %s: %s; left for the next audit", generation_id, first_line(exc))
                return None
            except FatalApiError as exc:
                self.stopped = f"the server refused the lookups ({first_line(exc)})"
                return _STOPPED
            except TransientError as exc:
                attempt += 1
                if isinstance(exc, RateLimited):
                    self.pacer.slow_down()
                if exc.code in NOT_ASKED_AGAIN or attempt >= self.retry.max_attempts:
                    self.stopped = f"the server stopped answering ({first_line(exc)}); rerun the audit to ask the rest"
                    return _STOPPED
                delay_s = self.retry.delay_s(attempt, exc.retry_after_s)
                if await _sleep_or_stop(delay_s, self.stop):
                    return _STOPPED


_STOPPED: Any = KeptRecord(None, None, None)  # a lookup cut short: nothing learned, nothing recorded


__all__ = ["AuditOutcome", "AuditSettings", "audit_job"]
