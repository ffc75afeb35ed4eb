"""The Batch API executor: the same pairs, policy, sinks and halt as the live pool, sent as batches.

Pairs are grouped per requested model into batches of at most 5,000 requests and 200 MB.
Before each submit call the batch's custom ids and the checkpoint keys they stand for are
committed to the checkpoint; the batch id is committed as soon as the answer comes back. A
run that finds a batch from an earlier run collects it; one whose submit answer was lost
(a kill, a timeout) is reconciled with the workspace's batches (same model, same number of
requests, submitted since), so nothing is submitted twice. Batches are polled with backoff
until they end; each result goes through the row policy (policy.RowPolicy.take), exactly as
a live answer would: what must be asked again (a transient error, an invalid structured
answer) goes into a later batch, and an expired or cancelled batch's pairs are asked again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from batchrunner.client import Client, parse_completion
from batchrunner.costs import Pricing, Usage, charge, format_usd, to_decimal
from batchrunner.errors import ApiError, Problem, RequestRejected, SpecError, TransientError, first_line
from batchrunner.executor import Execution, count_resumed
from batchrunner.halt import Halt, StopReason
from batchrunner.pending import Batch, Todo
from batchrunner.policy import RowPolicy, RowState
from batchrunner.records import ResultSink
from batchrunner.store import Store

log = logging.getLogger("batchrunner")

MAX_REQUESTS = 5000
MAX_BYTES = 190 * 1024 * 1024  # under the API's 200 MB, for the envelope
ENDED = ("completed", "failed", "expired", "cancelled")
RECONCILE_WINDOW_S = 600.0  # a lost submission is looked for among batches created since it, less this


def custom_id(key: tuple[str, str, str]) -> str:
    """A pair's id in a batch, from its checkpoint key."""
    return hashlib.sha256("\x1f".join(key).encode()).hexdigest()[:32]


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
        realtime: Any = None,
    ) -> None:
        self.client = client
        self.store = store
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.wait = wait  # False: submit and return (--no-wait); the next run collects
        self.submitted: list[str] = []  # batch ids submitted by this run
        self.realtime = realtime  # an executor for the rows of a model the Batch API refuses (fallback_to_realtime)
        self.live_models: set[str] = set()

    async def execute(self, work: Iterable[Batch], policy: Any, sinks: ResultSink, halt: Halt) -> Execution:
        started = time.monotonic()
        assert isinstance(policy, RowPolicy), "batches need the row policy's take()"
        todos: dict[tuple[str, str, str], Todo] = {}
        resumed = 0
        for batch in work:
            resumed += count_resumed(batch, sinks)
            for todo in batch.todo:
                failed = policy.refused(todo)  # its media cannot go in a batch (or at all): failed, unsent
                if failed is not None:
                    sinks.add(failed)
                else:
                    todos[todo.request.key] = todo
        states = {key: policy.begin(todo) for key, todo in todos.items()}
        listed: list[dict[str, Any]] | None = None
        if todos or self.store.open_batches():
            try:
                listed = await self.client.batches()  # before anything is submitted: does this key reach it?
            except ApiError as exc:
                halt.stop(
                    StopReason.BATCH_API,
                    f"the Batch API does not answer for this key ({first_line(exc)}); nothing was submitted: "
                    "use mode: live, or try again later",
                    exc,
                )
                return Execution(resumed, time.monotonic() - started)
            if not self._openrouters(listed):
                raise SpecError(
                    Problem(
                        "mode",
                        f"{self.client.base_url}/batches answered, but not as OpenRouter's Batch API does (its "
                        "batches have OpenAI's fields, input_file_id, or it is not OpenRouter): batch mode needs "
                        "OpenRouter's Batch API; use mode: live (nothing was submitted)",
                    )
                )
        try:
            waiting = await self._reopen(todos, listed or [], policy)
        except ApiError as exc:  # an earlier run's batch cannot be matched or read: stop before submitting more
            halt.stop(StopReason.BATCH_API, f"{first_line(exc)}; nothing new was submitted", exc)
            return Execution(resumed, time.monotonic() - started)
        out = {cid for opened in waiting for cid in opened.keys}  # pairs already in a batch at the API
        queued = [key for key in todos if custom_id(key) not in out]
        still_open: list[_Open] = []
        if not self.wait:  # a --no-wait run first collects what has ended (paying nothing new for it), then
            # submits what is left and returns: the batches still running stay at the API for the next run
            still_open, again = await self._collect_ended(waiting, todos, states, policy, sinks, halt)
            queued, waiting = queued + again, []
        while (queued or waiting) and not halt.stopping:
            later: list[tuple[str, str, str]] = []  # what the budget cannot cover until batches are collected
            live: list[tuple[str, str, str]] = []  # rows of models the Batch API refused (fallback_to_realtime)
            for model, chunk in self._chunks(queued, todos, states, policy):
                if model in self.live_models:
                    live += [key for key, _ in chunk]
                elif later or halt.stopping:
                    later += [key for key, _ in chunk]
                else:
                    opened, rest, refused = await self._submit(model, chunk, policy, halt)
                    if opened is not None:
                        waiting.append(opened)
                    later += rest
                    live += refused
            if live and not halt.stopping:
                await self.realtime.execute([Batch([todos[key] for key in live], rows=len(live))], policy, sinks, halt)
            if later and not self.wait and still_open:  # the budget is held by batches still running at the API
                log.info(
                    "%d pairs wait for budget held by %d batches still running; a later run submits them",
                    len(later),
                    len(still_open),
                )
                break
            if later and not waiting:  # nothing in flight: does the next request fit now?
                first, state = todos[later[0]], states[later[0]]
                model = policy.model_of(first, state)
                reserved = await policy.reserve(policy.body(first, state) | {"model": model}, model)
                if reserved is None:  # it does not: the policy stopped the run, saying the budget is spent
                    break
                policy.settle(reserved, Decimal(0))  # it does (live rows settled meanwhile): go round again
                queued = later
                continue
            if not self.wait:
                break
            queued = await self._collect(waiting, todos, states, policy, sinks, halt) + later
            waiting = []
        if not self.wait and (self.submitted or still_open):
            log.info(
                "%d batches submitted, %d still running from earlier runs; run the job again to collect them (most "
                "batches finish within minutes, all within 24 hours)",
                len(self.submitted),
                len(still_open),
            )
        return Execution(resumed, time.monotonic() - started)

    # -- submitting ---------------------------------------------------------------------------

    def _chunks(
        self,
        keys: list[tuple[str, str, str]],
        todos: dict[tuple[str, str, str], Todo],
        states: dict[tuple[str, str, str], RowState],
        policy: RowPolicy,
    ) -> Iterable[tuple[str, list[tuple[tuple[str, str, str], dict[str, Any]]]]]:
        """Per model being asked (a pair's fallback once its model gave up), runs of at most MAX_REQUESTS
        requests and MAX_BYTES."""
        by_model: dict[str, list[tuple[str, str, str]]] = {}
        for key in keys:
            by_model.setdefault(policy.model_of(todos[key], states[key]), []).append(key)
        for model, model_keys in by_model.items():
            chunk: list[tuple[tuple[str, str, str], dict[str, Any]]] = []
            size = 0
            for key in model_keys:
                body = policy.body(todos[key], states[key])
                body.pop("model", None)
                length = len(json.dumps(body, ensure_ascii=False).encode()) + 80
                if chunk and (len(chunk) >= MAX_REQUESTS or size + length > MAX_BYTES):
                    yield model, chunk
                    chunk, size = [], 0
                chunk.append((key, body))
                size += length
            if chunk:
                yield model, chunk

    async def _submit(
        self,
        model: str,
        chunk: list[tuple[tuple[str, str, str], dict[str, Any]]],
        policy: RowPolicy,
        halt: Halt,
    ) -> tuple[_Open | None, list[tuple[str, str, str]], list[tuple[str, str, str]]]:
        """Submit what of `chunk` the budget covers now: (the batch, or None), the pairs left for later, and
        the pairs of a model the Batch API refused when they are to run live instead."""
        opened = _Open(f"intent-{uuid.uuid4().hex}", None, model, {})
        requests = []
        for position, (key, body) in enumerate(chunk):
            reserved = policy.try_reserve({**body, "model": model}, model)
            if reserved is None:  # settles only when batches are collected: the rest waits for that
                rest = [k for k, _ in chunk[position:]]
                break
            cid = custom_id(key)
            opened.keys[cid] = list(key)
            opened.reserved[cid] = reserved
            requests.append({"custom_id": cid, "body": {**body, "model": model}})
        else:
            rest = []
        if not requests:
            return None, rest, []
        held = sum(opened.reserved.values(), Decimal(0))  # counted by every later run's budget until collected
        self.store.record_batch(opened.intent_id, model, opened.keys, time.time(), reserved_usd=held)  # see _reopen
        try:
            submitted = await self.client.submit_batch(model, requests)
        except ApiError as exc:
            for reserved in opened.reserved.values():
                policy.settle(reserved, Decimal(0))
            if isinstance(exc, TransientError):
                log.warning(
                    "submitting a batch of %d for %s failed (%s); it is looked for on the next run",
                    len(requests),
                    model,
                    exc,
                )
                halt.stop(
                    StopReason.BATCH_API,
                    f"submitting a batch for {model} got no answer ({first_line(exc)}); the next run looks for it "
                    "among the workspace's batches before submitting anything",
                )
                return None, rest, []
            self.store.batch_state(opened.intent_id, "requeued")
            if self.realtime is not None:
                log.warning("the Batch API refused %s (%s): its rows run as live requests", model, first_line(exc))
                self.live_models.add(model)
                return None, [], [(k[0], k[1], k[2]) for k in opened.keys.values()] + rest
            halt.stop(
                StopReason.BATCH_API,
                f"the Batch API refused a batch for {model} ({first_line(exc)}); set batch: {{fallback_to_realtime: "
                "true}} to run its rows live, or use mode: live",
                exc,
            )
            return None, rest, []
        opened.batch_id = submitted["id"]
        self.store.batch_submitted(opened.intent_id, opened.batch_id)
        self.submitted.append(opened.batch_id)
        log.info("submitted batch %s: %d requests to %s", opened.batch_id, len(requests), model)
        return opened, rest, []

    def _openrouters(self, listed: list[dict[str, Any]]) -> bool:
        """Whether the Batch API that answered is OpenRouter's: its URL, the sandbox's word, or batches in
        OpenRouter's shape (an OpenAI-style server's have input_file_id; its submit then fails run after run)."""
        if any("input_file_id" in item for item in listed):
            return False
        return self.client.openrouter or self.client.sandbox or any("request_counts" in item for item in listed)

    async def _reopen(
        self, todos: dict[tuple[str, str, str], Todo], listed: list[dict[str, Any]], policy: RowPolicy
    ) -> list[_Open]:
        """Batches an earlier run submitted and did not collect, their reservations held against this run's budget
        again; a submission whose answer was lost is matched with the workspace's batches (every page: same
        model and size, created since), or else known never to have gone, once the listing has had time to show it."""
        records = self.store.open_batches()
        if not records:
            return []
        known = {r["batch_id"] for r in records if r["batch_id"]}
        reopened = []
        for record in records:
            batch_id = record["batch_id"]
            if batch_id is None:
                candidates = [
                    item
                    for item in listed
                    if item.get("model") == record["model"]
                    and request_count(item, "total") == record["requests"]
                    and float(item.get("created_at") or 0) >= record["created_s"] - RECONCILE_WINDOW_S
                    and item["id"] not in known
                ]
                if len(candidates) == 1:
                    batch_id = candidates[0]["id"]
                    known.add(batch_id)
                    self.store.batch_submitted(record["intent_id"], batch_id)
                    log.info("found batch %s, whose submission's answer was lost", batch_id)
                elif not candidates and time.time() - record["created_s"] > RECONCILE_WINDOW_S:
                    log.warning(
                        "a batch for %s submitted at %s is not among the workspace's %d batches (every page read): "
                        "it never arrived; its requests are submitted again",
                        record["model"],
                        time.strftime("%H:%M:%S", time.localtime(record["created_s"])),
                        len(listed),
                    )
                    self.store.batch_state(record["intent_id"], "requeued")  # it never reached the API
                    continue
                elif not candidates:
                    raise TransientError(
                        f"a batch submitted for {record['model']} at {record['created_s']:.0f} (its answer was lost) "
                        f"is not among the workspace's {len(listed)} batches yet; rerun in "
                        f"{RECONCILE_WINDOW_S / 60:.0f} minutes: if it still is not there, it never arrived and is "
                        "submitted again",
                        code="lost_batch",
                    )
                else:
                    raise TransientError(
                        f"{len(candidates)} batches could be the one submitted for {record['model']} at "
                        f"{record['created_s']:.0f}; cancel the wrong ones with `batchrunner cancel` and rerun",
                        code="ambiguous_batch",
                    )
            opened = _Open(record["intent_id"], batch_id, record["model"], record["keys"], cursor=record["cursor"])
            held = record["reserved_usd"]
            if held and policy.budget is not None:  # committed at the API: it counts whatever the budget says now
                policy.budget.reserved_usd += held
                opened.reserved = {cid: held / len(opened.keys) for cid in opened.keys}
            reopened.append(opened)
        return reopened

    # -- collecting ---------------------------------------------------------------------------

    async def _collect_ended(
        self,
        waiting: list[_Open],
        todos: dict[tuple[str, str, str], Todo],
        states: dict[tuple[str, str, str], RowState],
        policy: RowPolicy,
        sinks: ResultSink,
        halt: Halt,
    ) -> tuple[list[_Open], list[tuple[str, str, str]]]:
        """One look at each open batch, no waiting: those that ended are collected (a --no-wait run's first step);
        returns the batches still open and the pairs to ask again."""
        still: list[_Open] = []
        again: list[tuple[str, str, str]] = []
        for opened in waiting:
            if halt.stopping:
                still.append(opened)
                continue
            batch = await self._look(opened)
            if batch is None or batch["status"] not in ENDED:
                still.append(opened)
                continue
            again += await self._take(opened, batch, todos, states, policy, sinks)
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

    async def _collect(
        self,
        waiting: list[_Open],
        todos: dict[tuple[str, str, str], Todo],
        states: dict[tuple[str, str, str], RowState],
        policy: RowPolicy,
        sinks: ResultSink,
        halt: Halt,
    ) -> list[tuple[str, str, str]]:
        """Poll until every batch ends; feed each result to the policy; return the pairs to ask again."""
        again: list[tuple[str, str, str]] = []
        delay = self.poll_s
        while waiting and not halt.stopping:
            waiting, ended = await self._collect_ended(waiting, todos, states, policy, sinks, halt)
            again += ended
            if waiting and not halt.stopping:
                states_seen = ", ".join(f"{o.batch_id} {o.progress}" for o in waiting)
                log.info("waiting for %d batches (%s); next look in %.0f s", len(waiting), states_seen, delay)
                await asyncio.sleep(delay)
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

    async def _take(
        self,
        opened: _Open,
        batch: dict[str, Any],
        todos: dict[tuple[str, str, str], Todo],
        states: dict[tuple[str, str, str], RowState],
        policy: RowPolicy,
        sinks: ResultSink,
    ) -> list[tuple[str, str, str]]:
        """One ended batch's results into the checkpoint and the summary; the pairs to ask again. A batch that
        failed fails its pairs with its message (or asks them again, if the fault is passing); a cancelled one
        has no result rows, but what it billed is recorded against the job."""
        again: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        stale = 0
        failure = _batch_failure(batch)
        async for page in self._results(opened, batch):
            for result in page:
                cid = result.get("custom_id")
                if not isinstance(cid, str) or cid not in opened.keys or cid in seen:
                    continue
                seen.add(cid)
                key = _key(opened.keys[cid])
                reserved = opened.reserved.pop(cid, Decimal(0))
                todo = todos.get(key)
                if todo is None:  # answered already (a download resumed), or the spec was edited since
                    policy.settle(reserved, Decimal(0))
                    stale += 1
                    continue
                row, cost = policy.take(todo, states[key], _answer(result))
                policy.settle(reserved, cost)
                if row is None:
                    again.append(key)
                else:
                    sinks.add(row)
        billed = _batch_cost(batch, policy.pricing.get(opened.model)) if batch["status"] == "cancelled" else None
        if billed:  # requests that finished before the cancel: billed, with no rows to carry the cost
            self.store.batch_cost(opened.intent_id, billed)
            log.warning(
                "batch %s was cancelled: %s was billed for requests that had finished",
                opened.batch_id,
                format_usd(billed),
            )
        for cid, key_list in opened.keys.items():  # no result for these: the batch ended without them
            if cid in seen:
                continue
            key = _key(key_list)
            reserved = opened.reserved.pop(cid, Decimal(0))
            todo = todos.get(key)
            if todo is None:
                policy.settle(reserved, Decimal(0))
                continue
            if failure is not None:
                row, _ = policy.take(todo, states[key], failure)
                policy.settle(reserved, Decimal(0))
                if row is not None:
                    sinks.add(row)
                    continue
            else:
                policy.settle(reserved, Decimal(0))
            again.append(key)
        if billed and policy.budget is not None:
            policy.settle(Decimal(0), billed)
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
