"""The Batch API executor: the same pairs, policy, sinks and halt as the live pool, sent as batches.

Pairs are grouped per requested model into batches of at most 5,000 requests and 200 MB.
Before each submit call the batch's custom ids and the checkpoint keys they stand for are
committed to the checkpoint; the batch id is committed as soon as the answer comes back. A
run that finds a batch from an earlier run collects it; one whose submit answer was lost
(a kill, a timeout) is reconciled with the workspace's batches (same model, same number of
requests, submitted since), so nothing is submitted twice. Batches are polled with backoff
until they end; each result is an event of its pair's flow (flow.py), exactly as a live
answer is: what the flow asks again (a transient error, an invalid structured answer, the
next fallback) goes into a later batch, and an expired or cancelled batch's pairs are asked
again. A batch has no counterpart of a live pair's waits (Retry-After, the breaker's pauses,
the budget's waiting per request): the next batch is the retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from batchrunner.accounts import Accounts
from batchrunner.client import Client, Completion, parse_completion
from batchrunner.costs import Pricing, Usage, charge, format_usd, saving_usd, to_decimal
from batchrunner.errors import ApiError, Problem, RequestRejected, SpecError, TransientError, first_line
from batchrunner.executor import Answerer, Execution, Executor, count_resumed
from batchrunner.flow import Ask, RowFlow, Verdict, Wait
from batchrunner.halt import Halt, StopReason
from batchrunner.pending import Batch, Todo
from batchrunner.records import ResultSink, RowResult
from batchrunner.store import Store

log = logging.getLogger("batchrunner")

MAX_REQUESTS = 5000
MAX_BYTES = 190 * 1024 * 1024  # under the API's 200 MB, for the envelope
ENDED = ("completed", "failed", "expired", "cancelled")
RECONCILE_WINDOW_S = 600.0  # a lost submission is looked for among batches created since it, less this


def custom_id(key: tuple[str, str, str]) -> str:
    """A pair's id in a batch, from its checkpoint key."""
    return hashlib.sha256("\x1f".join(key).encode()).hexdigest()[:32]


Key = tuple[str, str, str]


@dataclass
class _Open:
    """A batch this run waits for: its record, and the reservations made for it."""

    intent_id: str
    batch_id: str | None
    model: str
    keys: dict[str, list[str]]  # custom id -> checkpoint key
    reserved: dict[str, Decimal] = field(default_factory=dict)
    progress: str = "submitted"  # its status and requests done, as last seen
    cursor: str | None = None  # where the paged download of its results got to (None: the start)


@dataclass
class _Run:
    """One execute() call: each pair's flow, and what the run shares (the answerer's budget, the sinks, the halt)."""

    answerer: Answerer
    sinks: ResultSink
    halt: Halt
    flows: dict[Key, RowFlow] = field(default_factory=dict)

    @property
    def accounts(self) -> Accounts:
        return self.answerer.rules.pricer.accounts

    def ask(self, key: Key) -> Ask | None:
        """The request a pair's flow asks next, with no wait (the next batch is its retry); None when the flow
        finished it instead (a request refused unsent, its last model given up on): its result is kept."""
        flow = self.flows[key]
        while True:
            action = flow.next()
            if isinstance(action, Ask):
                return action
            if isinstance(action, Wait):
                flow.waited()
                continue
            self.if_finished(key)
            return None

    def keep_bills(self) -> None:
        """The run ends with pairs unfinished (it stopped, or left them in batches for the next run): one this run
        paid for (an answer to repair, an error to ask again) is kept pending with its bill, as a live pair is,
        so nothing paid for drops out of the checkpoint; the next run starts it from that bill."""
        for key, flow in list(self.flows.items()):
            flow.stop()
            self.if_finished(key)

    def if_finished(self, key: Key) -> None:
        """Keep the result of a pair whose flow has finished, and forget the flow."""
        flow = self.flows[key]
        if flow.finished:
            if flow.result is not None:
                self.sinks.add(flow.result)
            del self.flows[key]

    def feed(self, key: Key, answer: Completion | ApiError) -> Verdict:
        """One result of a batch as an event of its pair's flow; a result that finishes the pair is kept."""
        flow = self.flows[key]
        if isinstance(answer, ApiError):
            verdict = flow.failed(answer)
        else:
            verdict = flow.answered(answer)
            pricing = self.accounts.pricing.get(answer.model or flow.model) or self.accounts.pricing.get(flow.model)
            if pricing is not None and verdict.paid is not None:  # what it costs live: the discount, for the summary
                self.accounts.saved_usd += saving_usd(pricing.cost_usd(answer.usage), verdict.paid)
        if verdict.halting is not None:
            self.halt.stop(verdict.halting.reason, verdict.halting.message, verdict.halting.error)
        self.if_finished(key)
        return verdict


class _Continuing:
    """The run's answerer for the pairs a batch hands to the live executor (fallback_to_realtime): each continues
    its flow, with what its batches were billed and the model of the chain it had come to."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.answerer = run.answerer
        self.rules = run.answerer.rules
        self.sending = run.answerer.sending

    def answer(self, todo: Todo, flow: RowFlow | None = None) -> Awaitable[RowResult | None]:
        return self.answerer.answer(todo, self.run.flows.pop(todo.request.key, flow))

    async def reserve(self, worst_usd: Decimal) -> bool:
        return await self.answerer.reserve(worst_usd)

    def settle(self, reserved_usd: Decimal, actual_usd: Decimal) -> None:
        self.answerer.settle(reserved_usd, actual_usd)


class BatchExecutor:
    """Submit, poll, collect, and submit again what must be asked again, until every pair is done."""

    def __init__(
        self,
        client: Client,
        store: Store,
        *,
        poll_s: float = 5.0,
        max_poll_s: float = 300.0,
        wait: bool = True,
        realtime: Executor | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.wait = wait  # False: submit and return (--no-wait); the next run collects
        self.submitted: list[str] = []  # batch ids submitted by this run
        self.realtime = realtime  # an executor for the rows of a model the Batch API refuses (fallback_to_realtime)
        self.live_models: set[str] = set()

    async def execute(self, work: Iterable[Batch], answerer: Answerer, sinks: ResultSink, halt: Halt) -> Execution:
        started = time.monotonic()
        run = _Run(answerer, sinks, halt)
        resumed = 0
        for batch in work:
            resumed += count_resumed(batch, sinks)
            for todo in batch.todo:
                run.flows[todo.request.key] = answerer.rules.flow(todo)
                run.if_finished(todo.request.key)  # its media cannot go in a batch (or at all): failed, unsent
        try:
            await self._run(run)
        finally:
            run.keep_bills()
        return Execution(resumed, time.monotonic() - started)

    async def _run(self, run: _Run) -> None:
        """The pairs' flows through the Batch API: reopen what earlier runs left, collect, submit, until done."""
        halt = run.halt
        listed = await self._listing(run)
        if listed is None:
            return
        try:
            waiting = await self._reopen(run, listed)
        except ApiError as exc:  # an earlier run's batch cannot be matched or read: stop before submitting more
            halt.stop(StopReason.BATCH_API, f"{first_line(exc)}; nothing new was submitted", exc)
            return
        out = {cid for opened in waiting for cid in opened.keys}  # pairs already in a batch at the API
        queued = [key for key in run.flows if custom_id(key) not in out]
        still_open: list[_Open] = []
        if not self.wait:  # a --no-wait run first collects what has ended (paying nothing new for it), then
            # submits what is left and returns: the batches still running stay at the API for the next run
            still_open, again = await self._collect_ended(waiting, run)
            queued, waiting = queued + again, []
        await self._rounds(run, queued, waiting, still_open)
        if not self.wait and (self.submitted or still_open):
            log.info(
                "%d batches submitted, %d still running from earlier runs; run the job again to collect them (most "
                "batches finish within minutes, all within 24 hours)",
                len(self.submitted),
                len(still_open),
            )

    async def _listing(self, run: _Run) -> list[dict[str, Any]] | None:
        """The workspace's batches, asked before anything is submitted (does this key reach the Batch API, and is
        it OpenRouter's?); [] when there is nothing to do; None when the run stopped (it says why)."""
        if not run.flows and not self.store.open_batches():
            return []
        try:
            listed = await self.client.batches()
        except ApiError as exc:
            run.halt.stop(
                StopReason.BATCH_API,
                f"the Batch API does not answer for this key ({first_line(exc)}); nothing was submitted: "
                "use mode: live, or try again later",
                exc,
            )
            return None
        if not self._openrouters(listed):
            raise SpecError(
                Problem(
                    "mode",
                    f"{self.client.base_url}/batches answered, but not as OpenRouter's Batch API does (its "
                    "batches have OpenAI's fields, input_file_id, or it is not OpenRouter): batch mode needs "
                    "OpenRouter's Batch API; use mode: live (nothing was submitted)",
                )
            )
        return listed

    async def _rounds(self, run: _Run, queued: list[Key], waiting: list[_Open], still_open: list[_Open]) -> None:
        """Submit what is queued, collect, and submit again what the flows ask again, until nothing is left."""
        halt = run.halt
        while (queued or waiting) and not halt.stopping:
            later: list[Key] = []  # what the budget cannot cover until batches are collected
            live: list[Key] = []  # rows of models the Batch API refused (fallback_to_realtime)
            for model, chunk in self._chunks(queued, run):
                if model in self.live_models:
                    live += [key for key, _ in chunk]
                elif later or halt.stopping:
                    later += [key for key, _ in chunk]
                else:
                    opened, rest, refused = await self._submit(model, chunk, run)
                    if opened is not None:
                        waiting.append(opened)
                    later += rest
                    live += refused
            if live and not halt.stopping and self.realtime is not None:
                todos = [run.flows[key].todo for key in live if key in run.flows]
                await self.realtime.execute([Batch(todos, rows=len(todos))], _Continuing(run), run.sinks, halt)
            if later and not self.wait and still_open:  # the budget is held by batches still running at the API
                log.info(
                    "%d pairs wait for budget held by %d batches still running; a later run submits them",
                    len(later),
                    len(still_open),
                )
                return
            if later and not waiting:  # nothing in flight: does the next request fit now?
                if not await self._fits(run, later):
                    return
                queued = later
                continue
            if not self.wait:
                return
            queued = await self._collect(waiting, run) + later
            waiting = []

    @staticmethod
    async def _fits(run: _Run, later: list[Key]) -> bool:
        """Whether the first pair waiting for budget fits now (live rows may have settled meanwhile); False when
        it does not and nothing can free any: the run is stopped, saying the budget is spent."""
        for key in later:
            if key in run.flows and (ask := run.ask(key)) is not None:
                if not await run.answerer.reserve(ask.reserve_usd):
                    return False
                run.answerer.settle(ask.reserve_usd, Decimal(0))
                return True
        return True

    # -- submitting ---------------------------------------------------------------------------

    def _chunks(self, keys: list[Key], run: _Run) -> Iterable[tuple[str, list[tuple[Key, Ask]]]]:
        """Per model being asked (a pair's fallback once its model gave up), runs of at most MAX_REQUESTS
        requests and MAX_BYTES."""
        by_model: dict[str, list[tuple[Key, Ask]]] = {}
        for key in keys:
            if key in run.flows and (ask := run.ask(key)) is not None:
                by_model.setdefault(ask.model, []).append((key, ask))
        for model, asks in by_model.items():
            chunk: list[tuple[Key, Ask]] = []
            size = 0
            for key, ask in asks:
                length = len(json.dumps(ask.body, ensure_ascii=False).encode()) + 80
                if chunk and (len(chunk) >= MAX_REQUESTS or size + length > MAX_BYTES):
                    yield model, chunk
                    chunk, size = [], 0
                chunk.append((key, ask))
                size += length
            if chunk:
                yield model, chunk

    async def _submit(
        self, model: str, chunk: list[tuple[Key, Ask]], run: _Run
    ) -> tuple[_Open | None, list[Key], list[Key]]:
        """Submit what of `chunk` the budget covers now: (the batch, or None), the pairs left for later, and
        the pairs of a model the Batch API refused when they are to run live instead."""
        opened = _Open(f"intent-{uuid.uuid4().hex}", None, model, {})
        requests = []
        budget = run.accounts.budget
        rest: list[Key] = []
        for position, (key, ask) in enumerate(chunk):
            if budget is not None and not budget.reserve(ask.reserve_usd):
                rest = [k for k, _ in chunk[position:]]  # settles only when batches are collected: it waits
                break
            cid = custom_id(key)
            opened.keys[cid] = list(key)
            opened.reserved[cid] = ask.reserve_usd
            requests.append({"custom_id": cid, "body": {**ask.body, "model": model}})
        if not requests:
            return None, rest, []
        held = sum(opened.reserved.values(), Decimal(0))  # counted by every later run's budget until collected
        self.store.record_batch(opened.intent_id, model, opened.keys, time.time(), reserved_usd=held)  # see _reopen
        try:
            submitted = await self.client.submit_batch(model, requests)
        except ApiError as exc:
            for reserved in opened.reserved.values():
                run.answerer.settle(reserved, Decimal(0))
            return None, *self._refused(opened, exc, rest, run)
        opened.batch_id = submitted["id"]
        self.store.batch_submitted(opened.intent_id, opened.batch_id)
        self.submitted.append(opened.batch_id)
        log.info("submitted batch %s: %d requests to %s", opened.batch_id, len(requests), model)
        return opened, rest, []

    def _refused(self, opened: _Open, exc: ApiError, rest: list[Key], run: _Run) -> tuple[list[Key], list[Key]]:
        """A submit call that failed: (the pairs left for later, the pairs to run live). No answer at all: the
        batch may have arrived, the next run looks for it. Refused: its rows run live (fallback_to_realtime)
        or the run stops."""
        model = opened.model
        if isinstance(exc, TransientError):
            log.warning(
                "submitting a batch of %d for %s failed (%s); it is looked for on the next run",
                len(opened.keys),
                model,
                exc,
            )
            run.halt.stop(
                StopReason.BATCH_API,
                f"submitting a batch for {model} got no answer ({first_line(exc)}); the next run looks for it "
                "among the workspace's batches before submitting anything",
            )
            return rest, []
        self.store.batch_state(opened.intent_id, "requeued")
        if self.realtime is not None:
            log.warning("the Batch API refused %s (%s): its rows run as live requests", model, first_line(exc))
            self.live_models.add(model)
            return [], [_key(k) for k in opened.keys.values()] + rest
        run.halt.stop(
            StopReason.BATCH_API,
            f"the Batch API refused a batch for {model} ({first_line(exc)}); set batch: {{fallback_to_realtime: "
            "true}} to run its rows live, or use mode: live",
            exc,
        )
        return rest, []

    def _openrouters(self, listed: list[dict[str, Any]]) -> bool:
        """Whether the Batch API that answered is OpenRouter's: its URL, the sandbox's word, or batches in
        OpenRouter's shape (an OpenAI-style server's have input_file_id; its submit then fails run after run)."""
        if any("input_file_id" in item for item in listed):
            return False
        return self.client.openrouter or self.client.sandbox or any("request_counts" in item for item in listed)

    async def _reopen(self, run: _Run, listed: list[dict[str, Any]]) -> list[_Open]:
        """Batches an earlier run submitted and did not collect, their reservations held against this run's budget
        again; a submission whose answer was lost is matched with the workspace's batches (every page: same
        model and size, created since), or else known never to have gone, once the listing has had time to show it."""
        records = self.store.open_batches()
        known = {r["batch_id"] for r in records if r["batch_id"]}
        reopened = []
        budget = run.accounts.budget
        for record in records:
            batch_id = record["batch_id"] or self._match(record, listed, known)
            if batch_id is None:
                continue
            opened = _Open(record["intent_id"], batch_id, record["model"], record["keys"], cursor=record["cursor"])
            held = record["reserved_usd"]
            if held and budget is not None:  # committed at the API: it counts whatever the budget says now
                budget.reserved_usd += held
                opened.reserved = {cid: held / len(opened.keys) for cid in opened.keys}
            reopened.append(opened)
        return reopened

    def _match(self, record: dict[str, Any], listed: list[dict[str, Any]], known: set[str]) -> str | None:
        """The batch a submission whose answer was lost became; None when it never arrived (its requests are
        submitted again). TransientError when it cannot be told yet, or which of several it is."""
        candidates = [
            item
            for item in listed
            if item.get("model") == record["model"]
            and request_count(item, "total") == record["requests"]
            and float(item.get("created_at") or 0) >= record["created_s"] - RECONCILE_WINDOW_S
            and item["id"] not in known
        ]
        if len(candidates) == 1:
            batch_id = str(candidates[0]["id"])
            known.add(batch_id)
            self.store.batch_submitted(record["intent_id"], batch_id)
            log.info("found batch %s, whose submission's answer was lost", batch_id)
            return batch_id
        if not candidates and time.time() - record["created_s"] > RECONCILE_WINDOW_S:
            log.warning(
                "a batch for %s submitted at %s is not among the workspace's %d batches (every page read): "
                "it never arrived; its requests are submitted again",
                record["model"],
                time.strftime("%H:%M:%S", time.localtime(record["created_s"])),
                len(listed),
            )
            self.store.batch_state(record["intent_id"], "requeued")  # it never reached the API
            return None
        if not candidates:
            raise TransientError(
                f"a batch submitted for {record['model']} at {record['created_s']:.0f} (its answer was lost) "
                f"is not among the workspace's {len(listed)} batches yet; rerun in "
                f"{RECONCILE_WINDOW_S / 60:.0f} minutes: if it still is not there, it never arrived and is "
                "submitted again",
                code="lost_batch",
            )
        raise TransientError(
            f"{len(candidates)} batches could be the one submitted for {record['model']} at "
            f"{record['created_s']:.0f}; cancel the wrong ones with `batchrunner cancel` and rerun",
            code="ambiguous_batch",
        )

    # -- collecting ---------------------------------------------------------------------------

    async def _collect_ended(self, waiting: list[_Open], run: _Run) -> tuple[list[_Open], list[Key]]:
        """One look at each open batch, no waiting: those that ended are collected (a --no-wait run's first step);
        returns the batches still open and the pairs to ask again."""
        still: list[_Open] = []
        again: list[Key] = []
        for opened in waiting:
            if run.halt.stopping:
                still.append(opened)
                continue
            batch = await self._look(opened)
            if batch is None or batch["status"] not in ENDED:
                still.append(opened)
                continue
            again += await self._take(opened, batch, run)
        return still, again

    async def _look(self, opened: _Open) -> dict[str, Any] | None:
        """The batch as the API has it now, its progress noted; None if it cannot be read now."""
        assert opened.batch_id is not None
        try:
            batch = await self.client.batch(opened.batch_id)
        except ApiError as exc:
            log.warning("could not read batch %s (%s); trying again", opened.batch_id, exc)
            return None
        if batch["status"] not in ENDED:
            total = request_count(batch, "total")
            opened.progress = f"{batch['status']} {finished(batch)}/{total if total is not None else len(opened.keys)}"
        return batch

    async def _collect(self, waiting: list[_Open], run: _Run) -> list[Key]:
        """Poll until every batch ends; feed each result to its flow; return the pairs to ask again."""
        again: list[Key] = []
        delay = self.poll_s
        while waiting and not run.halt.stopping:
            waiting, ended = await self._collect_ended(waiting, run)
            again += ended
            if waiting and not run.halt.stopping:
                states_seen = ", ".join(f"{o.batch_id} {o.progress}" for o in waiting)
                log.info("waiting for %d batches (%s); next look in %.0f s", len(waiting), states_seen, delay)
                stopped = asyncio.ensure_future(run.halt.wait())  # a stop ends the wait between looks at once
                try:
                    await asyncio.wait({stopped}, timeout=delay)
                finally:
                    stopped.cancel()
                delay = min(self.max_poll_s, delay * 2)
        return again

    async def _results(self, opened: _Open, batch: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        """An ended batch's results: inline when the batch carries them, else page by page from
        GET /batches/{id}/results, from where an earlier download stopped (its cursor is in the checkpoint)."""
        inline = batch.get("results")
        if isinstance(inline, list) and (
            inline or not finished(batch)
        ):  # an empty list for a batch that answered: paged
            yield [r for r in inline if isinstance(r, dict)]
            return
        if batch["status"] != "completed":  # failed, expired, cancelled: no result rows to read
            return
        assert opened.batch_id is not None
        while True:
            page = await self.client.batch_results(opened.batch_id, opened.cursor)
            yield page.items
            if page.next_cursor is None:
                return
            opened.cursor = page.next_cursor
            self.store.batch_cursor(opened.intent_id, opened.cursor)  # after the page's answers are committed

    def _taken(self, opened: _Open, cid: str, run: _Run) -> Key | None:
        """The pair a result or a missing result stands for, taken off the batch with its flow told the request
        it was (an earlier run's batch: its model); None when no flow waits for it (answered already: a download
        resumed, or the spec was edited since), its reservation freed."""
        key = _key(opened.keys[cid])
        reserved = opened.reserved.pop(cid, Decimal(0))
        flow = run.flows.get(key)
        if flow is None:
            run.answerer.settle(reserved, Decimal(0))
            return None
        flow.sent(opened.model, reserved)
        return key

    async def _take(self, opened: _Open, batch: dict[str, Any], run: _Run) -> list[Key]:
        """One ended batch's results into the checkpoint and the summary; the pairs to ask again. A batch that
        failed fails its pairs with its message (or asks them again, if the fault is passing); a cancelled one
        has no result rows, but what it billed is recorded against the job."""
        again: list[Key] = []
        seen: set[str] = set()
        stale = 0
        async for page in self._results(opened, batch):
            for result in page:
                cid = result.get("custom_id")
                if not isinstance(cid, str) or cid not in opened.keys or cid in seen:
                    continue
                seen.add(cid)
                reserved = opened.reserved.get(cid, Decimal(0))
                if (key := self._taken(opened, cid, run)) is None:
                    stale += 1
                    continue
                run.answerer.settle(reserved, run.feed(key, _answer(result)).cost_usd)
                if key in run.flows:
                    again.append(key)
        again += self._unanswered(opened, batch, seen, run)
        if stale:
            log.info(
                "batch %s: %d answers are not kept: answered already (an earlier download), or for requests the "
                "spec no longer makes (it was edited since the batch was submitted)",
                opened.batch_id,
                stale,
            )
        self.store.batch_state(opened.intent_id, "collected" if batch["status"] == "completed" else "requeued")
        log.info(
            "batch %s %s: %d answered, %d to ask again",
            opened.batch_id,
            batch["status"],
            len(opened.keys) - len(again),
            len(again),
        )
        return again

    def _unanswered(self, opened: _Open, batch: dict[str, Any], seen: set[str], run: _Run) -> list[Key]:
        """The pairs an ended batch has no result for: failed with a failed batch's message (or asked again, if
        it is passing), else asked again; a cancelled batch's bill for what finished before the cancel is kept."""
        billed = _batch_cost(batch, run.accounts.pricing.get(opened.model)) if batch["status"] == "cancelled" else None
        if billed:  # requests that finished before the cancel: billed, with no rows to carry the cost
            self.store.batch_cost(opened.intent_id, billed)
            log.warning(
                "batch %s was cancelled: %s was billed for requests that had finished",
                opened.batch_id,
                format_usd(billed),
            )
        failure = _batch_failure(batch)
        again: list[Key] = []
        for cid in list(opened.keys):
            if cid in seen:
                continue
            reserved = opened.reserved.get(cid, Decimal(0))
            if (key := self._taken(opened, cid, run)) is None:
                continue
            run.answerer.settle(reserved, Decimal(0))
            if failure is not None:
                run.feed(key, failure)
            if key in run.flows:
                again.append(key)
        if billed and run.accounts.budget is not None:
            run.answerer.settle(Decimal(0), billed)
        return again


def request_count(batch: dict[str, Any], name: str) -> int | None:
    """One of a batch's request_counts (total, completed, failed), if the API gave it as a number."""
    counts = batch.get("request_counts")
    value = counts.get(name) if isinstance(counts, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def finished(batch: dict[str, Any]) -> int:
    """How many of a batch's requests have finished, answered or failed."""
    return (request_count(batch, "completed") or 0) + (request_count(batch, "failed") or 0)


def _key(key_list: list[str]) -> tuple[str, str, str]:
    return (key_list[0], key_list[1], key_list[2])


TRANSIENT_FAILURE = (
    "timeout",
    "timed out",
    "temporar",
    "try again",
    "overloaded",
    "unavailable",
    "rate limit",
    "capacity",
)


def _batch_failure(batch: dict[str, Any]) -> ApiError | None:
    """What a `failed` batch says went wrong, as each of its pairs' error: passing (ask again) or not (the pair
    goes to its fallbacks, then fails with the message)."""
    if batch["status"] != "failed":
        return None
    found = batch.get("error")
    message = str(found.get("message") or "") if isinstance(found, dict) else ""
    text = f"the batch failed: {message or 'no reason given'}"
    if any(word in message.lower() for word in TRANSIENT_FAILURE):
        return TransientError(text, code="batch_failed")
    return RequestRejected(text, code="batch_failed")


def _batch_cost(batch: dict[str, Any], pricing: Pricing | None = None) -> Decimal | None:
    """A batch's usage.cost, as the decimal it was written as. With BYOK (usage.is_byok) that is only OpenRouter's
    fees, and the batch object does not say what the providers billed: their part is counted as its tokens at the
    model's live price (`pricing`), the most it can be, a batch's price being lower."""
    usage = batch.get("usage")
    cost = to_decimal(usage.get("cost")) if isinstance(usage, dict) else None
    if isinstance(usage, dict) and usage.get("is_byok") is True:
        tokens = [usage.get(name) for name in ("prompt_tokens", "completion_tokens")]
        prompt, completion = (n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0 for n in tokens)
        fees = cost if cost is not None and cost >= 0 else None
        cost = charge(Usage(prompt, completion, cost_usd=fees, is_byok=True), pricing).cost_usd
    return cost if cost is not None and cost > 0 else None


def _answer(result: dict[str, Any]) -> Any:
    """A batch result as the client would have given it: a Completion, or the ApiError it classifies as."""
    response = result.get("response")
    if isinstance(response, dict) and isinstance(response.get("body"), dict):
        try:
            return parse_completion(response["body"], status=int(response.get("status_code") or 200))
        except ApiError as exc:
            return exc
    found = result.get("error")
    error: dict[str, Any] = found if isinstance(found, dict) else {}
    message = str(error.get("message") or "the batch gave no answer")
    if str(error.get("type") or "").startswith(("invalid_request", "not_found")):
        return RequestRejected(message, code=str(error.get("type")))
    return TransientError(message, code=str(error.get("type") or "batch_error"))
