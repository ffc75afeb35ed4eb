"""The sandbox's Batch API: POST/GET/DELETE /api/v1/batches and the listing, in OpenRouter's shapes.

A batch is answered request by request with the same simulated answers, faults and costs as
realtime requests, at `batch_price_factor` of the price, once `batch_turnaround_s` has passed
since it was submitted; until then it is `in_progress`, with `results: null`. It can expire
(`batch_expire_s`) or be cancelled. The body must name `endpoint` and `model` before
`requests`, as OpenRouter stream-parses it.
"""

from __future__ import annotations

import json
import time
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
TERMINAL = ("completed", "failed", "expired", "cancelled")
ENDPOINTS = ("/v1/chat/completions",)


@dataclass
class Batch:
    id: str
    model: str
    endpoint: str
    requests: list[dict[str, Any]]
    created_at: float
    status: str = "in_progress"
    finalized_at: float | None = None
    results: list[dict[str, Any]] | None = None
    usage: dict[str, Any] | None = None
    counts: dict[str, int] = field(default_factory=dict)


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
    return web.json_response({"error": {"code": status, "message": message}}, status=status)


class BatchDesk:
    """Every batch the sandbox was given, by id."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.batches: dict[str, Batch] = {}
        self.submitted = 0  # submissions accepted (for tests: nothing is submitted twice)

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
        batch = Batch(f"batch_{uuid.uuid4().hex[:20]}", model, endpoint, requests, time.time())
        self.batches[batch.id] = batch
        self.submitted += 1
        return web.json_response(self._object(batch, with_results=False) | {"status": "validating"}, status=202)

    async def retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "Batch not found")
        self._advance(batch)
        return web.json_response(self._object(batch, with_results=True))

    async def listing(self, request: web.Request) -> web.Response:
        items = []
        for batch in sorted(self.batches.values(), key=lambda b: -b.created_at):
            self._advance(batch)
            items.append(self._object(batch, with_results=False))
        return web.json_response(
            {
                "object": "list",
                "data": items,
                "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None,
                "has_more": False,
                "x_batchrunner_sandbox": True,  # so a batch executor knows OpenRouter's shapes are served here
            }
        )

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "Batch not found")
        self._advance(batch)
        if batch.status not in TERMINAL:
            batch.status, batch.finalized_at = "cancelled", time.time()
        return web.json_response(self._object(batch, with_results=False))

    def _advance(self, batch: Batch) -> None:
        """Complete (or expire) a batch whose time has come: answer each request as realtime would."""
        if batch.status in TERMINAL:
            return
        config, age_s = self.sandbox.config, time.time() - batch.created_at
        if config.batch_expire_s is not None and age_s >= config.batch_expire_s:
            batch.status, batch.finalized_at = "expired", time.time()
            return
        if age_s < config.batch_turnaround_s:
            return
        results, prompt, completion, cost = [], 0, 0, Decimal(0)
        for item in batch.requests:
            answer = self.sandbox.batch_answer(item["body"], batch.model, Decimal(config.batch_price_factor))
            if "error" in answer:
                results.append(
                    {
                        "id": f"res_{uuid.uuid4().hex[:12]}",
                        "custom_id": item["custom_id"],
                        "response": None,
                        "error": answer["error"],
                    }
                )
                continue
            usage = answer["usage"]
            prompt += usage["prompt_tokens"]
            completion += usage["completion_tokens"]
            cost += Decimal(str(usage.get("cost", 0)))
            results.append(
                {
                    "id": f"res_{uuid.uuid4().hex[:12]}",
                    "custom_id": item["custom_id"],
                    "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex[:12]}", "body": answer},
                    "error": None,
                }
            )
        failed = sum(1 for r in results if r["error"] is not None)
        batch.results = results
        batch.counts = {"total": len(results), "completed": len(results) - failed, "failed": failed}
        batch.usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cost": float(cost),
            "is_byok": False,
        }
        batch.status, batch.finalized_at = "completed", time.time()

    def _object(self, batch: Batch, *, with_results: bool) -> dict[str, Any]:
        total = len(batch.requests)
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "model": batch.model,
            "provider": catalog.provider_name(batch.model),
            "completion_window": "24h",
            "status": batch.status,
            "created_at": int(batch.created_at),
            "finalized_at": int(batch.finalized_at) if batch.finalized_at else None,
            "expires_at": int(batch.created_at + 86400),
            "request_counts": batch.counts or {"total": total, "completed": 0, "failed": 0},
            "usage": batch.usage,
            "results": batch.results if with_results and batch.status == "completed" else None,
            "error": None,
        }
