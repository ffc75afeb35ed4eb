"""The sandbox's Batch API, as OpenRouter documents it (judged by the official SDK's models).

    POST   /batches                202, the batch `validating`
    GET    /batches                newest first, a page at a time: ?limit=1..100 and ?cursor= (or the SDK's ?after=ID)
    GET    /batches/{id}           the batch; a completed one carries its results unless batch_inline_results is False
    GET    /batches/{id}/results   its result rows a page at a time, once it has a final status (409 before)
    POST   /batches/{id}/cancel    asks the provider to stop it (403 unless batch_cancel_allowed; 409 once final)
    DELETE /batches/{id}           removes a batch with a final status and its requests and results (409 before)

A batch's life follows `batch_turnaround_s` (T), read whenever it is looked at: `validating` for its first
tenth, `in_progress` while its requests finish one by one over the next eight tenths (request i of n at
created + T * (0.1 + 0.8 * (i + 1) / n)), `finalizing` for the last tenth, then `completed`. Each request is
answered as it finishes, with the same simulated answers, faults and costs as realtime requests, at
`batch_price_factor` of the price, and billed then (stats.charged_usd); `request_counts` grow as they finish.

A batch ends otherwise, whichever comes first:
- `batch_fail_message` (read at submission): `failed` once validated, `error: {message}`, nothing run or billed;
- `batch_expire_s` after submission: `expired`;
- a cancel: the batch says `batch_cancel_status` (`in_progress`, as OpenRouter documents; or `cancelling`) until
  the provider confirms it `batch_cancel_delay_s` later, then `cancelled`; a batch whose turnaround comes first
  completes, as one whose provider finished first does.
Only a `completed` batch has result rows. One that ended otherwise has none, but its `usage` (and charged_usd)
counts the requests that finished before it ended: the provider bills them.

No clock runs in the background: a batch is brought up to date each time a route looks at it, by
`batch_clock` (time.time; a test can move a clock of its own instead of waiting). Cursors are
opaque strings (a page's position, not a timestamp), so asking again with one gives the same page.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from aiohttp import web

from batchrunner.sandbox import catalog

if TYPE_CHECKING:
    from batchrunner.sandbox.server import Sandbox

MAX_REQUESTS = 5000
MAX_BYTES = 200 * 1024 * 1024
FINAL = ("completed", "failed", "expired", "cancelled")
ENDPOINTS = ("/v1/chat/completions",)
VALIDATING_SHARE = 0.1  # of the turnaround, before the first request runs
FINALIZING_SHARE = 0.1  # of the turnaround, after the last request finished
RESULTS_PAGE = 100  # rows in a page of results when no limit is asked
MAX_RESULTS_PAGE = 1000
MAX_LIST_PAGE = 100  # the SDK's ListBatchesRequest: "from 1 through 100"
# OpenRouter's listing reads stored jobs, which "collapse those phases into in_progress" (the SDK's BatchListStatus)
LISTED_AS = {"finalizing": "in_progress", "cancelling": "in_progress"}
# which end wins when two fall at the same moment: a failed validation before anything, a provider that finished
# at the moment of a cancel has finished
PRECEDENCE = {"failed": 0, "expired": 1, "completed": 2, "cancelled": 3}


@dataclass
class Batch:
    id: str
    seq: int  # its place in submission order: the listing's order and its cursors
    model: str
    endpoint: str
    requests: list[dict[str, Any]]
    created_at: float
    fail_message: str | None = None  # it fails validation with this message
    status: str = "validating"
    finalized_at: float | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # a result per request finished so far, in order
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)
    cancel_at: float | None = None  # when the provider confirms the cancel asked for

    @property
    def final(self) -> bool:
        return self.status in FINAL


def submission_key(model: str, item: dict[str, Any]) -> str:
    """A digest of one submitted request (model, custom_id and body), for counting what is submitted twice."""
    content = {"model": model, "custom_id": item.get("custom_id"), "body": item.get("body")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _inline_media(body: dict[str, Any]) -> bool:
    """Whether a request carries media as data (base64, a data: URL) rather than a URL."""
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "input_audio":
                return True
            inner = part.get(kind) if kind in ("image_url", "file", "video_url") else None
            value = inner.get("url", inner.get("file_data")) if isinstance(inner, dict) else None
            if isinstance(value, str) and not value.startswith(("https://", "http://")):
                return True
    return False


def _error(status: int, message: str) -> web.Response:
    """OpenRouter's error body for the Batch API (the SDK's BatchErrorResponse)."""
    return web.json_response({"error": {"code": status, "message": message}}, status=status)


def _cursor(scope: str, position: int) -> str:
    return base64.urlsafe_b64encode(f"{scope}:{position}".encode()).decode().rstrip("=")


def _position(cursor: str, scope: str) -> int | None:
    """The position a cursor made by `_cursor(scope, ...)` holds; None for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None
    found, _, position = text.rpartition(":")
    return int(position) if found == scope and position.isascii() and position.isdigit() else None


def _page_size(raw: str | None, default: int, most: int) -> int | None:
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
        return None
    return int(raw)


class BatchDesk:
    """Every batch the sandbox was given and has not deleted, by id."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.batches: dict[str, Batch] = {}
        self.submitted = 0  # submissions accepted (for tests: nothing is submitted twice)
        self._seq = itertools.count()
        self._places: dict[str, int] = {}  # every id ever given -> its seq, kept after a delete so ?after= still pages

    # -- routes ---------------------------------------------------------------------------

    async def submit(self, request: web.Request) -> web.Response:
        raw = await request.text()
        if len(raw.encode()) > MAX_BYTES:
            return _error(413, "Batch body exceeds 200 MB")
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "Invalid JSON body")
        if not isinstance(body, dict):
            return _error(400, "Batch body must be a JSON object")
        position = {key: raw.find(f'"{key}"') for key in ("endpoint", "model", "requests")}
        if position["requests"] >= 0 and (
            position["requests"] < position["endpoint"] or position["requests"] < position["model"]
        ):
            return _error(400, "`endpoint` and `model` must come before `requests` in the body")
        endpoint, model, requests = body.get("endpoint"), body.get("model"), body.get("requests")
        if endpoint not in ENDPOINTS:
            return _error(400, f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if not isinstance(model, str) or not catalog.is_listed(model):
            return _error(400, f"{model} is not a valid model ID")
        if model in self.sandbox.config.no_batch_models:
            return _error(400, f"No batch endpoint is available for {model}")
        if not isinstance(requests, list) or not 1 <= len(requests) <= MAX_REQUESTS:
            return _error(400, f"requests must be a list of 1 to {MAX_REQUESTS} items")
        ids = [item.get("custom_id") if isinstance(item, dict) else None for item in requests]
        if any(not isinstance(i, str) or not i for i in ids) or len(set(ids)) != len(ids):
            return _error(400, "every request needs a unique custom_id")
        for item in requests:
            inner = item.get("body")
            if not isinstance(inner, dict) or inner.get("model", model) != model:
                return _error(400, f"request {item['custom_id']}: body.model must be {model}")
            if _inline_media(inner):
                return _error(
                    400,
                    f"request {item['custom_id']}: batches take images and files as URLs only; "
                    "base64 and data: URIs are rejected",
                )
        seq = next(self._seq)
        batch = Batch(
            f"batch_{uuid.uuid4().hex[:20]}",
            seq,
            model,
            endpoint,
            requests,
            self.sandbox.config.batch_clock(),
            fail_message=self.sandbox.config.batch_fail_message,
        )
        self.batches[batch.id] = batch
        self._places[batch.id] = seq
        self.submitted += 1
        stats = self.sandbox.stats
        stats.batches_submitted += 1
        stats.batch_requests_submitted += len(requests)
        stats.batch_submissions.update(submission_key(model, item) for item in requests)
        return web.json_response(self._object(batch, results=False), status=202)

    async def retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "Batch not found")
        self._advance(batch)
        return web.json_response(self._object(batch, results=self.sandbox.config.batch_inline_results))

    async def results(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "Batch not found")
        limit = _page_size(request.query.get("limit"), RESULTS_PAGE, MAX_RESULTS_PAGE)
        if limit is None:
            return _error(400, f"limit must be an integer from 1 to {MAX_RESULTS_PAGE}")
        self._advance(batch)
        if not batch.final:
            return _error(409, f"Batch {batch.id} is {batch.status}: its results can be read once it has ended")
        rows = batch.rows if batch.status == "completed" else []  # a batch that did not complete returns no rows
        start = 0
        if "cursor" in request.query:
            found = _position(request.query["cursor"], batch.id)
            if found is None or found > len(rows):
                return _error(400, "cursor is not one that this batch's results gave")
            start = found
        page = rows[start : start + limit]
        end = start + len(page)
        more = end < len(rows)
        return web.json_response(
            {"object": "list", "data": page, "has_more": more, "next_cursor": _cursor(batch.id, end) if more else None}
        )

    async def listing(self, request: web.Request) -> web.Response:
        query = request.query
        limit = _page_size(query.get("limit"), self.sandbox.config.batch_list_page_size, MAX_LIST_PAGE)
        if limit is None:
            return _error(400, f"limit must be an integer from 1 to {MAX_LIST_PAGE}")
        before: int | None = None  # list batches submitted before this seq
        if "cursor" in query:
            before = _position(query["cursor"], "batches")
            if before is None:
                return _error(400, "cursor is not one that this listing gave")
        elif "after" in query:
            before = self._places.get(query["after"])
            if before is None:
                return _error(400, f"after: no batch {query['after']}")
        wanted = set(query.getall("status", []))
        items = []
        for batch in sorted(self.batches.values(), key=lambda b: -b.seq):
            if before is not None and batch.seq >= before:
                continue
            self._advance(batch)
            item = self._object(batch, results=False, listed=True)
            if not wanted or item["status"] in wanted:
                items.append(item)
        page, more = items[:limit], len(items) > limit
        return web.json_response(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": more,
                "next_cursor": _cursor("batches", self._places[page[-1]["id"]]) if more else None,
                "x_batchrunner_sandbox": True,  # so a batch executor knows OpenRouter's shapes are served here
            }
        )

    async def cancel(self, request: web.Request) -> web.Response:
        config = self.sandbox.config
        if not config.batch_cancel_allowed:
            return _error(403, "Batch cancellation is not enabled for this organization")
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "Batch not found")
        now = config.batch_clock()
        self._advance(batch, now)
        if batch.final:
            return _error(409, f"Batch {batch.id} has already ended ({batch.status}): there is nothing to cancel")
        if batch.cancel_at is None:  # asking again while the provider has not confirmed changes nothing
            batch.cancel_at = now + config.batch_cancel_delay_s
        self._advance(batch, now)
        return web.json_response(self._object(batch, results=config.batch_inline_results))

    async def delete(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "Batch not found")
        self._advance(batch)
        if not batch.final:
            return _error(
                409, f"Batch {batch.id} is {batch.status}: only an ended batch can be deleted (cancel it to stop it)"
            )
        del self.batches[batch.id]  # its requests and results with it; what was billed stays billed
        upstream = "not_applicable" if batch.status == "failed" else "deleted"  # a failed validation never ran
        provider = catalog.provider_name(batch.model)
        return web.json_response(
            {
                "id": batch.id,
                "object": "batch",
                "deletion": {"openrouter": "deleted", "upstream": {"provider": provider, "status": upstream}},
            }
        )

    # -- a batch's life -------------------------------------------------------------------

    def _advance(self, batch: Batch, now: float | None = None) -> None:
        """Bring a batch up to `now`: answer the requests finished by then, and end it if its end has come."""
        if batch.final:
            return
        now = self.sandbox.config.batch_clock() if now is None else now
        config, turnaround_s = self.sandbox.config, self.sandbox.config.batch_turnaround_s
        validated_at = batch.created_at + turnaround_s * VALIDATING_SHARE
        ends = [(batch.created_at + turnaround_s, "completed")]
        if batch.fail_message is not None:
            ends.append((validated_at, "failed"))
        if config.batch_expire_s is not None:
            ends.append((batch.created_at + config.batch_expire_s, "expired"))
        if batch.cancel_at is not None:
            ends.append((batch.cancel_at, "cancelled"))
        end_at, end = min(ends, key=lambda e: (e[0], PRECEDENCE[e[1]]))
        if end_at <= now:
            if end != "failed":
                self._run(batch, end_at, inclusive=end == "completed")  # those finished before it ended
            batch.status, batch.finalized_at = end, end_at
            return
        if batch.fail_message is None:
            self._run(batch, now, inclusive=True)
        if now < validated_at:
            batch.status = "validating"
        elif batch.cancel_at is not None:
            batch.status = config.batch_cancel_status
        elif now >= batch.created_at + turnaround_s * (1 - FINALIZING_SHARE):
            batch.status = "finalizing"
        else:
            batch.status = "in_progress"

    def _finishes_at(self, batch: Batch, index: int) -> float:
        share = VALIDATING_SHARE + (1 - VALIDATING_SHARE - FINALIZING_SHARE) * (index + 1) / len(batch.requests)
        return batch.created_at + self.sandbox.config.batch_turnaround_s * share

    def _run(self, batch: Batch, until: float, *, inclusive: bool) -> None:
        """Answer, in order, the requests not yet answered that finish by `until` (at it too, if inclusive)."""
        while len(batch.rows) < len(batch.requests):
            finishes_at = self._finishes_at(batch, len(batch.rows))
            if finishes_at > until or (finishes_at == until and not inclusive):
                return
            self._answer(batch, batch.requests[len(batch.rows)])

    def _answer(self, batch: Batch, item: dict[str, Any]) -> None:
        """One request of a batch, as realtime would answer it, at the batch price: a result row."""
        config = self.sandbox.config
        answer = self.sandbox.batch_answer(item["body"], batch.model, Decimal(config.batch_price_factor))
        row: dict[str, Any] = {"id": f"res_{uuid.uuid4().hex[:12]}", "custom_id": item["custom_id"]}
        if "error" in answer:
            batch.rows.append(row | {"response": None, "error": answer["error"]})
            return
        usage = answer["usage"]
        batch.prompt_tokens += usage["prompt_tokens"]
        batch.completion_tokens += usage["completion_tokens"]
        batch.cost += Decimal(str(usage.get("cost", 0)))
        response = {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex[:12]}", "body": answer}
        batch.rows.append(row | {"response": response, "error": None})

    def _object(self, batch: Batch, *, results: bool, listed: bool = False) -> dict[str, Any]:
        """The batch object (the SDK's BatchObject; in a listing, its BatchListItem: results always null)."""
        failed = sum(1 for row in batch.rows if row["error"] is not None)
        expire_s = self.sandbox.config.batch_expire_s
        expire_s = 86400 if expire_s is None else expire_s  # when the provider stops: the 24 h window, or sooner
        usage = None
        if batch.final and batch.status != "failed":
            usage = {
                "prompt_tokens": batch.prompt_tokens,
                "completion_tokens": batch.completion_tokens,
                "total_tokens": batch.prompt_tokens + batch.completion_tokens,
                "cost": float(batch.cost),  # with BYOK, only OpenRouter's fees (the providers bill the user's keys)
                "is_byok": self.sandbox.config.byok,
            }
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "model": batch.model,
            "provider": catalog.provider_name(batch.model),
            "completion_window": "24h",
            "status": LISTED_AS.get(batch.status, batch.status) if listed else batch.status,
            "created_at": int(batch.created_at),
            "finalized_at": int(batch.finalized_at) if batch.finalized_at is not None else None,
            "expires_at": int(batch.created_at + expire_s),
            "request_counts": {"total": len(batch.requests), "completed": len(batch.rows) - failed, "failed": failed},
            "usage": usage,
            "results": batch.rows if results and batch.status == "completed" else None,
            "error": {"message": batch.fail_message} if batch.status == "failed" else None,
        }
