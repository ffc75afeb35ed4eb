"""An OpenRouter-compatible server on 127.0.0.1: no key, no network, deterministic answers.

It answers in OpenRouter's shapes (ChatResult, the error envelope, /key, /models,
/generation) and refuses requests that break OpenRouter's ChatRequest schema. It can be
told to simulate what the real service does to a batch job: credits and the rate limit
they buy, free-model caps, latency, models that are down, and faults (429 with
Retry-After, 402, 5xx, errors inside a 200, empty answers, invalid JSON, dropped
connections). Faults are decided by a seeded hash of the request and of how many times
that same request was seen, so a run's faults do not depend on the order requests arrive.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
from aiohttp import web

from batchrunner import openapi
from batchrunner.costs import ZERO_USD, to_decimal
from batchrunner.sandbox import answers, catalog, senses
from batchrunner.sandbox.batches import BatchDesk
from batchrunner.sandbox.config import SandboxConfig
from batchrunner.sandbox.faults import FAULT_KINDS, STREAM_FAULTS

KEEPALIVE_S = 0.05  # between keep-alive comments while a streamed answer waits
HOSTILE_TEXT = "\x1b]0;pwned\x07\x1b]52;c;ZXZpbA==\x07\x1b[2J\r\nFAKE LOG LINE"
FREE_PER_MINUTE = 20


@dataclass
class SandboxStats:
    """What the sandbox saw, for tests and the run banner."""

    requests: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    answered: collections.Counter[str] = field(default_factory=collections.Counter)  # request key -> 200 answers
    by_model: collections.Counter[str] = field(default_factory=collections.Counter)  # requests per `model`
    charged_usd: Decimal = (
        ZERO_USD  # what a real account would be billed (hostile costs aside; BYOK: fees and upstream)
    )
    prompt_tokens: int = 0  # of every answer that was billed
    completion_tokens: int = 0
    max_requests_in_one_second: int = 0
    incomplete: int = 0  # requests whose body stopped before its end (nothing answered, nothing billed)
    most_in_flight: int = 0  # the most completions requests the server held at once
    shed: int = 0  # requests over `capacity`, answered 503
    images: int = 0  # images in requests that were answered
    bodies: list[dict[str, Any]] = field(default_factory=list)
    byok_upstream_usd: Decimal = ZERO_USD  # BYOK: the providers' part of charged_usd (billed to the user's own keys)
    tiers: collections.Counter[str] = field(default_factory=collections.Counter)  # answers by the tier that served
    batches_submitted: int = 0  # batches the Batch API accepted (deleted ones too)
    batch_requests_submitted: int = 0  # the requests in them, all told
    # each request submitted in a batch (batches.submission_key: model, custom_id, body) -> in how many batches
    batch_submissions: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def batch_duplicates(self) -> int:
        """Requests submitted again in a later batch (the same model, custom_id and body): 0 if each went once."""
        return sum(n - 1 for n in self.batch_submissions.values())


def request_key(body: dict[str, Any]) -> str:
    """A stable digest of what a request asks (model and prompt), for counting duplicates."""
    content = {"model": body.get("model"), "messages": body.get("messages"), "prompt": body.get("prompt")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _error(status: int, message: str, headers: dict[str, str] | None = None, **metadata: Any) -> web.Response:
    body: dict[str, Any] = {"error": {"code": status, "message": message}}
    if metadata:
        body["error"]["metadata"] = metadata
    return web.json_response(body, status=status, headers=headers)


class Sandbox:
    """The server. `async with Sandbox(config) as sandbox:` serves at `sandbox.base_url`."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.stats = SandboxStats()
        self._seen: collections.Counter[str] = collections.Counter()
        self._working = 0  # completions requests being answered now (capacity)
        self._window: collections.deque[float] = collections.deque()  # admit times in the last second
        self._free_minute: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._free_today: collections.Counter[str] = collections.Counter()
        self._generations: dict[str, dict[str, Any]] = {}
        self._created: dict[str, float] = {}  # generation id -> when its answer was made (generation_clock)
        self._cached_prefixes: set[tuple[str, str]] = set()  # (model, system prompt) seen: served from the cache
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.batches = BatchDesk(self)

    # -- lifecycle ------------------------------------------------------------------------

    @web.middleware
    async def _network(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The round trip to a server far away (round_trip_s), before any route answers."""
        if self.config.round_trip_s > 0:
            await asyncio.sleep(self.config.round_trip_s)
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._network])
        app.add_routes(
            [
                web.get("/api/v1/key", self.key),
                web.get("/api/v1/auth/key", self.key),
                web.get("/api/v1/models", self.models),
                web.get("/api/v1/models/{author}/{slug}/endpoints", self.endpoints),
                web.get("/api/v1/generation", self.generation),
                web.post("/api/v1/chat/completions", self.chat_completions),
                web.post("/api/v1/completions", self.completions),
                web.post("/api/v1/batches", self.batches.submit),
                web.get("/api/v1/batches", self.batches.listing),
                web.get("/api/v1/batches/{id}", self.batches.retrieve),
                web.get("/api/v1/batches/{id}/results", self.batches.results),
                web.post("/api/v1/batches/{id}/cancel", self.batches.cancel),
                web.delete("/api/v1/batches/{id}", self.batches.delete),
                web.get("/sandbox/stats", self.stats_endpoint),
            ]
        )
        return app

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        # Build the request check before the first request, not during it: a first answer that stalls while
        # jsonschema loads would bunch the requests behind it into one second and trip the rate limit.
        openapi.warm_up("ChatRequest")
        # stopping gives requests still being answered a moment, not aiohttp's minute: a test double that a
        # test stops mid-answer (its client killed) should not hold the test for its slowest reply
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.25)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []  # aiohttp exposes no public accessor
        bound_port = sockets[0].getsockname()[1] if sockets else port
        self.base_url = f"http://{host}:{bound_port}/api/v1"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- accounts and limits --------------------------------------------------------------

    def remaining_usd(self) -> Decimal | None:
        """The key's credits left: what OpenRouter charged comes off them (with BYOK only its fee; the provider
        bills the user's own key)."""
        if self.config.credits_usd is None:
            return None
        return self.config.credits_usd - self.openrouter_charged_usd()

    def openrouter_charged_usd(self) -> Decimal:
        """What OpenRouter itself charged: charged_usd without the providers' BYOK bills."""
        return self.stats.charged_usd - self.stats.byok_upstream_usd

    def rate_limit_rps(self) -> float | None:
        """OpenRouter's rule: one request per second per credit remaining, 1 to 500."""
        limit = self.config.rate_limit
        if limit == "credits":
            remaining = self.remaining_usd()
            return 500.0 if remaining is None else float(min(500, max(1, int(remaining))))
        return limit

    def _auth_error(self, request: web.Request) -> web.Response | None:
        if not self.config.require_key:
            return None
        header = request.headers.get("Authorization", "")
        if not header:
            return _error(401, "Missing Authentication header")
        key = header.removeprefix("Bearer ")
        if not key.startswith("sk-or-v1-") or (self.config.api_key is not None and key != self.config.api_key):
            return _error(401, "User not found.")
        return None

    def _refused_input(self, body: dict[str, Any], model: str) -> web.Response | None:
        """A 400 for a part no provider could read, a 404 for an input the model's endpoints do not take."""
        try:
            seen = senses.perceive(body.get("messages") or [])
        except senses.Unreadable as exc:
            return _error(400, f"Invalid request: {exc}", error_type="invalid_image")
        takes = set(catalog.inputs(model)) | {"file"}  # a PDF any model takes: the file-parser plugin reads it
        takes -= self.config.refuse_inputs.get(model, set())
        for kind in sorted(seen.kinds - takes):
            return _error(404, f"No endpoints found that support {kind} input", error_type="not_found")
        return None

    def _rate_limited(self, model: str) -> web.Response | None:
        now = time.monotonic()
        if model.endswith(":free"):
            minute = self._free_minute[model]
            while minute and now - minute[0] >= 60:
                minute.popleft()
            if sum(self._free_today.values()) >= self.config.free_daily_cap:  # per account, as OpenRouter counts
                return _error(
                    429,
                    "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests per day",
                    headers=self._limit_headers(self.config.free_daily_cap, 0, _next_utc_midnight_ms()),
                    limit_source="openrouter_free_tier_daily",
                )
            if len(minute) >= FREE_PER_MINUTE:
                reset_ms = int((time.time() + 60 - (now - minute[0])) * 1000)
                return _error(
                    429,
                    "Rate limit exceeded: free-models-per-min. ",
                    headers=self._limit_headers(FREE_PER_MINUTE, 0, reset_ms),
                    limit_source="openrouter_free_tier_per_minute",
                )
            minute.append(now)
            self._free_today[model] += 1
        limit = self.rate_limit_rps()
        if limit is None:
            return None
        window = self._window
        while window and now - window[0] >= 1.0:
            window.popleft()
        if len(window) >= limit:
            wait_s = max(0.0, 1.0 - (now - window[0]))
            headers = self._limit_headers(int(limit), 0, int((time.time() + wait_s) * 1000))
            headers["Retry-After"] = str(max(1, round(wait_s)))
            return _error(429, "Rate limit exceeded", headers=headers, error_type="rate_limit_exceeded")
        window.append(now)
        self.stats.max_requests_in_one_second = max(self.stats.max_requests_in_one_second, len(window))
        return None

    @staticmethod
    def _limit_headers(limit: int, remaining: int, reset_ms: int) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(reset_ms),
        }

    def _fault(self, key: str) -> str | None:
        """The fault (if any) for the n-th sighting of this request, decided by the seed alone."""
        if not self.config.faults:
            return None
        draw = answers.seeded_rng(self.config.seed, key, self._seen[key]).random()
        cumulative = 0.0
        for kind in FAULT_KINDS:
            cumulative += self.config.faults.get(kind, 0.0)
            if draw < cumulative:
                return kind
        return None

    # -- endpoints ------------------------------------------------------------------------

    async def key(self, request: web.Request) -> web.Response:
        if (denied := self._auth_error(request)) is not None:
            return denied
        remaining = self.remaining_usd()
        usage = float(self.openrouter_charged_usd())
        byok_usage = float(self.stats.byok_upstream_usd)
        data: dict[str, Any] = {
            "label": "sk-or-v1-san...box",
            "limit": None if self.config.credits_usd is None else float(self.config.credits_usd),
            "limit_remaining": None if remaining is None else float(max(remaining, ZERO_USD)),
            "limit_reset": None,
            "usage": usage,
            "usage_daily": usage,
            "usage_weekly": usage,
            "usage_monthly": usage,
            "byok_usage": byok_usage,
            "byok_usage_daily": byok_usage,
            "byok_usage_weekly": byok_usage,
            "byok_usage_monthly": byok_usage,
            "include_byok_in_limit": False,
            "is_free_tier": False,
            "is_management_key": False,
            "is_provisioning_key": False,
            "creator_user_id": None,
            "rate_limit": {"requests": -1, "interval": "10s", "note": "This field is deprecated and safe to ignore."},
            "expires_at": None,
            "allowed_data_regions": ["global"],
            "organization_id": None,
            "workspace_id": None,
        }
        budget: dict[str, Any] | None = None
        if self.config.credits_usd is not None:
            budget = {
                "budget_id": None,
                "guardrail_id": None,
                "include_byok": False,
                "limit_usd": float(self.config.credits_usd),
                "remaining_usd": data["limit_remaining"],
                "reset_interval": None,
                "resets_at": None,
                "scope": "key_limit",
                "spend_usd": usage,
            }
        data.update(budgets=[budget] if budget else [], effective_budget=budget)
        if self.config.report_free_daily:  # the account's count, as the cap counts (all :free models together)
            cap, used = self.config.free_daily_cap, sum(self._free_today.values())
            data["free_model_daily_requests"] = {"limit": cap, "remaining": max(0, cap - used), "used": used}
        return web.json_response({"data": data})

    async def models(self, request: web.Request) -> web.Response:
        data = catalog.model_objects(created=1_700_000_000)
        return web.json_response({"data": data, "total_count": len(data), "links": {"next": None}})

    async def endpoints(self, request: web.Request) -> web.Response:
        """GET /models/{author}/{slug}/endpoints: the providers serving a model, with what each supports."""
        model = f"{request.match_info['author']}/{request.match_info['slug']}"
        if not catalog.is_listed(model) or model == catalog.AUTO_ROUTER:
            return _error(404, f"Model {model} not found")
        listed = next(m for m in catalog.model_objects(0) if m["id"] == catalog.base_slug(model))
        data = {key: listed[key] for key in ("id", "name", "created", "description", "architecture")}
        return web.json_response({"data": {**data, "endpoints": catalog.endpoints(model)}})

    async def generation(self, request: web.Request) -> web.Response:
        if (denied := self._auth_error(request)) is not None:
            return denied
        asked = request.query.get("id", "")
        found = self._generations.get(asked)
        if found is None and (facts := GenerationFacts.carried_by(asked)) is not None:
            found = facts.record(asked)  # an answer of another sandbox's (an earlier --sandbox run's)
        if found is None:
            return _error(404, "Resource not found")
        return self._kept(asked, found)

    def _kept(self, generation_id: str, found: dict[str, Any]) -> web.Response:
        """A generation's record as the config makes it disagree: not there yet (a 404 while it lags), or with
        another cost than its answer reported (the difference added to OpenRouter's part, `total_cost`)."""
        config = self.config
        created = self._created.get(generation_id)
        if created is None:  # another sandbox's answer: from its record's time, to the second
            facts = GenerationFacts.carried_by(generation_id)
            created = float(facts.created) if facts is not None else 0.0
        if config.lags(generation_id) and config.generation_clock() < created + config.generation_lag_s:
            return _error(404, "Resource not found")
        if config.drifts(generation_id):
            kept = (to_decimal(found["total_cost"]) or ZERO_USD) + config.generation_drift_usd
            found = {**found, "total_cost": float(kept), "usage": float(kept)}
        return web.json_response({"data": found})

    async def stats_endpoint(self, request: web.Request) -> web.Response:
        """What the sandbox saw (not part of OpenRouter's API): for benchmarks and rehearsals."""
        stats = self.stats
        return web.json_response(
            {
                "requests": stats.requests,
                "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
                "answered": sum(stats.answered.values()),
                "answered_more_than_once": sum(1 for n in stats.answered.values() if n > 1),
                "charged_usd": str(stats.charged_usd),
                "byok_upstream_usd": str(stats.byok_upstream_usd),
                "tiers": dict(stats.tiers),
                "max_requests_in_one_second": stats.max_requests_in_one_second,
                "rate_limit_rps": self.rate_limit_rps(),
                "batches_submitted": stats.batches_submitted,
                "batch_requests_submitted": stats.batch_requests_submitted,
                "batch_duplicates": stats.batch_duplicates,
            }
        )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=False)

    async def _answer(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        self.stats.requests += 1
        self._working += 1
        try:
            self.stats.most_in_flight = max(self.stats.most_in_flight, self._working)
            capacity = self.config.capacity
            if capacity is not None and self._working > capacity:  # over capacity: shed at once, as a busy server does
                self.stats.shed += 1
                response: web.StreamResponse = _error(
                    503,
                    "the server is overloaded: too many requests in flight",
                    {"Retry-After": f"{self.config.retry_after_s:g}"},
                )
            else:
                response = await self._respond(request, chat=chat)
        finally:
            self._working -= 1
        self.stats.statuses[response.status] += 1
        return response

    async def _respond(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        if (denied := self._auth_error(request)) is not None:
            return denied
        body = await self._request_body(request, chat=chat)
        if isinstance(body, web.StreamResponse):
            return body
        streaming = body.get("stream") is True
        chain = [m for m in [body.get("model"), *(body.get("models") or [])] if isinstance(m, str)]
        if not chain:
            return _error(400, "No model specified", error_type="invalid_request")
        self.stats.by_model[chain[0]] += 1
        if (refused := self._refused(body, chain, chat=chat)) is not None:
            return refused

        key = request_key(body)
        fault = self._fault(key)
        self._seen[key] += 1
        if fault in STREAM_FAULTS and not streaming:
            fault = None  # a whole answer cannot break mid-stream
        flex = body.get("service_tier") == "flex" and catalog.has_flex(chain[0])  # else served at the standard tier
        if fault == "flex_capacity" and not flex:
            fault = None  # only a request for the flex tier can find it full
        latency = self.config.latency_s(body) if callable(self.config.latency_s) else self.config.latency_s
        if latency > 0 and not streaming:  # a stream waits after its headers, sending keep-alives
            await asyncio.sleep(latency)
        if (faulty := self._fault_response(request, fault, chain[0])) is not None:
            return faulty

        answering = next((m for m in chain if m not in self.config.down_models), None)
        if answering is None:
            return _error(
                502,
                f"Provider returned error: {chain[0]} is down (simulated)",
                error_type="provider_unavailable",
                provider_name=catalog.provider_name(chain[0]),
            )
        if answering == catalog.AUTO_ROUTER:
            answering = catalog.AUTO_ROUTES_TO
        tier = "flex" if flex and catalog.has_flex(answering) else "default"
        factor = catalog.FLEX_PRICE_SHARE if tier == "flex" else Decimal(1)
        if streaming:  # a stream that breaks is not billed: zero-completion insurance, as for an error finish
            broken = "finish_error" if fault in STREAM_FAULTS else fault
            completion = self._completion(
                body, answering, chat=chat, fault=broken, key=key, price_factor=factor, tier=tier
            )
            return await self._stream(request, completion, fault, latency)
        return web.json_response(
            self._completion(body, answering, chat=chat, fault=fault, key=key, price_factor=factor, tier=tier)
        )

    async def _request_body(self, request: web.Request, *, chat: bool) -> dict[str, Any] | web.StreamResponse:
        """The request's JSON body, valid as OpenRouter's ChatRequest (chat) or with a prompt string; else the
        400 OpenRouter answers (or 499 when the client stopped sending)."""
        try:
            text = await request.text()
        except (ConnectionError, aiohttp.ClientPayloadError):
            self.stats.incomplete += 1  # the client stopped sending: there is no request to answer
            return web.Response(status=499)  # never reaches the client: the connection is gone
        try:
            body = json.loads(text)
        except ValueError:
            return _error(400, "Invalid JSON body", error_type="invalid_request")
        if not isinstance(body, dict):
            return _error(400, "Request body must be a JSON object", error_type="invalid_request")
        if self.config.record_bodies:
            self.stats.bodies.append(body)
        if body.get("stream") is True and not chat:
            return _error(
                400, "Invalid request: stream: the sandbox streams chat answers only", error_type="invalid_request"
            )
        if chat:
            problems = openapi.validation_errors("ChatRequest", body)
            if problems:
                path, message = problems[0]
                where = ".".join(map(str, path)) or "body"
                return _error(400, f"Invalid request: {where}: {message}", error_type="invalid_request")
        elif not isinstance(body.get("prompt"), str):
            return _error(400, "Invalid request: prompt: a string is required", error_type="invalid_request")
        return body

    def _refused(self, body: dict[str, Any], chain: list[str], *, chat: bool) -> web.Response | None:
        """Why a valid request is not answered before any fault is drawn: an unlisted model, an input the model
        cannot take, no credits left, the rate limit; None when it is answered."""
        for model in chain:
            if not catalog.is_listed(model):
                return _error(400, f"{model} is not a valid model ID", error_type="invalid_request")
        if chat and (refused := self._refused_input(body, chain[0])) is not None:
            return refused
        remaining = self.remaining_usd()
        if remaining is not None and remaining <= 0:
            return _error(
                402,
                "Insufficient credits. Add more using https://openrouter.ai/settings/credits",
                error_type="payment_required",
            )
        return self._rate_limited(chain[0])

    def _fault_response(self, request: web.Request, fault: str | None, model: str) -> web.Response | None:
        """The reply a drawn fault makes of the request, as OpenRouter's own failures look; None when the fault
        (or none) leaves it to be answered."""
        retry_headers = {"Retry-After": f"{self.config.retry_after_s:g}"}
        if fault == "drop":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=499)  # never reaches the client: the connection is gone
        if fault == "rate_limit":
            return _error(
                429,
                "Provider returned error",
                headers=retry_headers,
                error_type="rate_limit_exceeded",
                provider_name="Sandbox",
            )
        if fault == "flex_capacity":  # flex never falls back to the default tier: the error reaches the caller
            return _flex_capacity_error(model, self.config.retry_after_s)
        if fault == "in_flight_budget":
            return _error(
                402,
                "In-flight spending budget exhausted; retry shortly",
                headers=retry_headers,
                limit_source="openrouter_in_flight_budget",
            )
        if fault in ("server_error", "bad_gateway", "overloaded"):
            status = {"server_error": 500, "bad_gateway": 502, "overloaded": 503}[fault]
            return _error(
                status, "Provider returned error" if status == 502 else "Internal Server Error", error_type="server"
            )
        if fault == "hostile_error":
            return _error(400, HOSTILE_TEXT + "A" * 2_000_000, error_type="invalid_request")
        if fault == "error_in_200":
            return web.json_response(
                {
                    "error": {
                        "code": 502,
                        "message": "Provider returned error",
                        "metadata": {"error_type": "provider_unavailable"},
                    },
                    "user_id": "user_sandbox",
                }
            )
        return None

    async def _stream(
        self, request: web.Request, completion: dict[str, Any], fault: str | None, latency_s: float
    ) -> web.StreamResponse:
        """The answer as OpenRouter streams it: keep-alive comments while it "thinks", content deltas, the
        finish_reason, a last chunk with the usage and no choices, then [DONE]. A `stream_error` fault sends an
        error chunk (finish_reason "error") halfway; `stream_cut` closes the connection halfway."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        waited = 0.0
        while True:  # OpenRouter's keep-alive comment, which clients must skip
            await response.write(b": OPENROUTER PROCESSING\n\n")
            if waited >= latency_s:
                break
            step = min(KEEPALIVE_S, latency_s - waited)
            await asyncio.sleep(step)
            waited += step
        head: dict[str, Any] = {
            key: completion[key] for key in ("id", "provider", "model", "created", "service_tier") if key in completion
        }
        head["object"] = "chat.completion.chunk"
        choice = completion["choices"][0]
        message = choice["message"]

        async def send(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> None:
            chunk = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        text = message.get("content") or ""
        pieces = [text[i : i + 16] for i in range(0, len(text), 16)]
        if fault in STREAM_FAULTS:
            pieces = pieces[: max(1, len(pieces) // 2)]
        await send({"role": "assistant", "content": ""})
        for piece in pieces:
            await send({"content": piece})
        if fault == "stream_cut":
            if request.transport is not None:
                request.transport.close()
            return response
        if fault == "stream_error":
            error = {
                "code": 502,
                "message": "Provider disconnected mid-stream",
                "metadata": {"error_type": "provider_unavailable"},
            }
            await send({"content": ""}, "error", error=error)
            await response.write_eof()
            return response
        if message.get("refusal"):
            await send({"refusal": message["refusal"]})
        for index, call in enumerate(message.get("tool_calls") or []):
            await send({"tool_calls": [{"index": index, **call}]})
        await send({}, choice["finish_reason"])
        usage_chunk = {**head, "choices": [], "usage": completion["usage"]}
        await response.write(f"data: {json.dumps(usage_chunk)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response

    def _completion(
        self,
        body: dict[str, Any],
        model: str,
        *,
        chat: bool,
        fault: str | None,
        key: str,
        price_factor: Decimal = Decimal(1),
        tier: str | None = None,
    ) -> dict[str, Any]:
        """One answer, billed: at `price_factor` of the model's price (a batch's, or the flex tier's), and said to
        be served at `tier` (the response's `service_tier`; None leaves it out)."""
        messages = body.get("messages") or []
        seen = senses.perceive(messages) if chat else senses.Perceived()
        prompt = " ".join([answers.last_user_text(messages), *seen.text]) if chat else body["prompt"]
        n_prompt = answers.prompt_tokens(messages) if chat else answers.count_tokens(prompt)
        n_prompt += seen.tokens + seen.audio_tokens
        text = _answer_text(body, model, prompt, fault)
        tool_calls = self._tool_calls(body, model, prompt) if chat and fault is None else None
        if tool_calls:
            text = ""
        finish_reason = "stop"
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(max_tokens, int) and answers.count_tokens(text) > max_tokens:
            text, finish_reason = text[: max(1, max_tokens * 4)], "length"
        if fault == "empty":
            text = ""
        if fault == "finish_error":
            finish_reason = "error"
        produced = (
            text or (answers.json_text(tool_calls) if tool_calls else "") or ("refusal" if fault == "refusal" else "")
        )
        n_completion = answers.count_tokens(produced) if produced else 0
        n_cached = self._cached_tokens(model, messages) if chat else 0
        cost = catalog.cost_usd(model, n_prompt, n_completion, n_cached, images=seen.images) * price_factor
        if (finish_reason == "error" or n_completion == 0) and not self.config.bill_failed_answers:
            cost = ZERO_USD  # zero-completion insurance: empty and error answers are not billed
        reported = float(cost)
        fee = self._charge(cost, images=seen.images, prompt_tokens=n_prompt, completion_tokens=n_completion)
        if not fault:
            self.stats.answered[key] += 1
        if tier is not None:
            self.stats.tiers[tier] += 1

        created = int(time.time())
        prompt_share = catalog.cost_usd(model, n_prompt, 0, n_cached, images=seen.images) * price_factor
        usage = self._usage(n_prompt, n_completion, n_cached, seen.audio_tokens, cost, prompt_share, fee, fault)
        facts = GenerationFacts(
            model,
            float(cost) if fee is None else fee,
            n_prompt,
            n_completion,
            n_cached,
            finish_reason,
            created,
            None if fee is None else reported,
            tier,
        )
        generation_id = facts.generation_id()
        self._generations[generation_id] = facts.record(generation_id)
        self._created[generation_id] = self.config.generation_clock()
        answer = {
            "id": generation_id,
            "provider": catalog.provider_name(model),
            "model": model,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "choices": [_choice(text, finish_reason, chat=chat, fault=fault, tool_calls=tool_calls)],
            "system_fingerprint": "fp_sandbox",
            "usage": usage,
        }
        if tier is not None:
            answer["service_tier"] = tier
        return answer

    def batch_answer(self, body: dict[str, Any], model: str, price_factor: Decimal) -> dict[str, Any]:
        """One request of a batch: a chat answer at the batch price, or an error object (a seeded fault)."""
        self.stats.requests += 1
        key = request_key({**body, "model": model})
        fault = self._fault(key)
        self._seen[key] += 1
        if fault == "flex_capacity":
            fault = None  # a batch is not served at the flex tier
        if fault in (
            "rate_limit",
            "server_error",
            "bad_gateway",
            "overloaded",
            "error_in_200",
            "drop",
            "in_flight_budget",
        ):
            self.stats.statuses[502] += 1
            return {"error": {"message": "Provider returned error", "type": "server_error", "param": None}}
        if fault == "hostile_error":
            return {"error": {"message": "Invalid request (simulated)", "type": "invalid_request_error", "param": None}}
        if model in self.config.down_models:
            return {
                "error": {
                    "message": f"Provider returned error: {model} is down (simulated)",
                    "type": "server_error",
                    "param": None,
                }
            }
        self.stats.statuses[200] += 1
        self.stats.by_model[model] += 1
        return self._completion(
            {**body, "model": model}, model, chat=True, fault=fault, key=key, price_factor=price_factor
        )

    def _charge(self, cost: Decimal, *, images: int, prompt_tokens: int, completion_tokens: int) -> float | None:
        """Count an answer's bill in the stats (with BYOK, the provider's part and OpenRouter's fee); returns the
        fee (None without BYOK). A free answer's tokens and images are not counted as billed."""
        reported = float(cost)
        fee = float(cost * self.config.byok_fee_share) if self.config.byok else None  # OpenRouter's part, BYOK
        self.stats.charged_usd += to_decimal(reported) or ZERO_USD
        if fee is not None:
            self.stats.byok_upstream_usd += to_decimal(reported) or ZERO_USD
            self.stats.charged_usd += to_decimal(fee) or ZERO_USD
        if cost > 0:
            self.stats.images += images
            self.stats.prompt_tokens += prompt_tokens
            self.stats.completion_tokens += completion_tokens
        return fee

    def _usage(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        audio_tokens: int,
        cost: Decimal,
        prompt_share: Decimal,
        fee: float | None,
        fault: str | None,
    ) -> dict[str, Any]:
        """The answer's usage as OpenRouter reports it: tokens, the cost when the sandbox reports it (absurd with
        the cost faults), and with BYOK the provider's bill (`prompt_share`: the prompt's part of `cost`)."""
        reported = float(cost)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": audio_tokens},
            "completion_tokens_details": {"reasoning_tokens": 0},
            "is_byok": fee is not None,
        }
        if self.config.report_cost:
            usage["cost"] = {"negative_cost": -15.0, "absurd_cost": 1e30}.get(
                fault or "", reported if fee is None else fee
            )
        if fee is not None:  # what the provider bills the user's own key, apart from OpenRouter's fee
            usage["cost_details"] = _upstream_cost(cost, prompt_share)
        if fault == "huge_tokens":
            usage["prompt_tokens"] = 2**70
        return usage

    @staticmethod
    def _tool_calls(body: dict[str, Any], model: str, prompt: str) -> list[dict[str, Any]] | None:
        """With tools offered (and tool_choice not "none"), call the first one with arguments fitting its schema."""
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)]
        if not tools or body.get("tool_choice") == "none":
            return None
        function = tools[0]["function"]
        arguments = answers.schema_answer(
            model, prompt, function.get("parameters") or {"type": "object", "properties": {}}
        )
        call_id = "call_" + request_key({"model": model, "prompt": prompt})[:16]
        return [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": function.get("name", "tool"), "arguments": answers.json_text(arguments)},
            }
        ]

    def _cached_tokens(self, model: str, messages: list[dict[str, Any]]) -> int:
        """Prompt caching, simulated: a system prompt seen before for this model is read from
        the cache (as providers do for a long shared prefix)."""
        system = [m for m in messages if m.get("role") == "system"]
        if not system:
            return 0
        key = (model, json.dumps(system, sort_keys=True))
        if key not in self._cached_prefixes:
            self._cached_prefixes.add(key)
            return 0
        return answers.prompt_tokens(system)


@dataclass(frozen=True)
class GenerationFacts:
    """What GET /generation says of one answer, carried in the answer's id (`generation_id`): the built-in
    sandbox ends with the command that started it, so `batchrunner generation --sandbox ID` asks a new one, which
    reads the record from the id (a random part keeps every id distinct, as OpenRouter's are)."""

    model: str
    cost_usd: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str
    created: int
    upstream_usd: float | None
    tier: str | None

    def generation_id(self) -> str:
        facts = json.dumps(astuple(self), separators=(",", ":")).encode()
        return f"gen-{uuid.uuid4().hex[:12]}-{base64.urlsafe_b64encode(facts).decode().rstrip('=')}"

    @classmethod
    def carried_by(cls, generation_id: str) -> GenerationFacts | None:
        """The facts an id of `generation_id()`'s carries; None for any other id (an unknown one: a 404)."""
        packed = generation_id.removeprefix("gen-").partition("-")[2]
        try:
            facts = cls(*json.loads(base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4))))
        except (ValueError, TypeError, binascii.Error):  # not base64, not JSON, not nine values
            return None
        numbers = (facts.cost_usd, facts.prompt_tokens, facts.completion_tokens, facts.cached_tokens, facts.created)
        if not (
            isinstance(facts.model, str)
            and isinstance(facts.finish_reason, str)
            and all(_is_number(n) for n in numbers)
            and (facts.upstream_usd is None or _is_number(facts.upstream_usd))
            and (facts.tier is None or isinstance(facts.tier, str))
        ):
            return None
        return facts

    def record(self, generation_id: str) -> dict[str, Any]:
        return _generation(
            generation_id,
            self.model,
            self.cost_usd,
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            self.finish_reason,
            self.created,
            upstream_usd=self.upstream_usd,
            tier=self.tier,
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _generation(
    generation_id: str,
    model: str,
    cost_usd: float,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    finish_reason: str,
    created: int,
    *,
    upstream_usd: float | None = None,
    tier: str | None = None,
) -> dict[str, Any]:
    """What GET /generation says of one answer, in the full shape of OpenRouter's GenerationResponse (`cost_usd`
    is what OpenRouter charged: with BYOK, its fee; `upstream_usd` is then what the provider billed)."""
    provider = catalog.provider_name(model)
    return {
        "id": generation_id,
        "upstream_id": f"chatcmpl-{generation_id.removeprefix('gen-')}",
        "request_id": None,
        "session_id": None,
        "total_cost": cost_usd,
        "usage": cost_usd,
        "cache_discount": None,
        "upstream_inference_cost": upstream_usd,
        "is_byok": upstream_usd is not None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
        "model": model,
        "provider_name": provider,
        "provider_responses": [
            {
                "id": f"chatcmpl-{generation_id.removeprefix('gen-')}",
                "endpoint_id": f"ep_sandbox_{provider.lower()}",
                "model_permaslug": model,
                "provider_name": provider,
                "status": 200,
                "latency": 0,
                "is_byok": upstream_usd is not None,
            }
        ],
        "router": None,
        "service_tier": tier,
        "api_type": "completions",
        "app_id": None,
        "preset_id": None,
        "streamed": False,
        "cancelled": False,
        "latency": 0,
        "moderation_latency": None,
        "generation_time": 0,
        "finish_reason": finish_reason,
        "native_finish_reason": finish_reason,
        "tokens_prompt": prompt_tokens,
        "tokens_completion": completion_tokens,
        "native_tokens_prompt": prompt_tokens,
        "native_tokens_completion": completion_tokens,
        "native_tokens_completion_images": 0,
        "native_tokens_reasoning": 0,
        "native_tokens_cached": cached_tokens,
        "num_media_prompt": None,
        "num_input_audio_prompt": None,
        "num_media_completion": None,
        "num_search_results": None,
        "num_fetches": None,
        "web_search_engine": None,
        "origin": "",
        "http_referer": None,
        "user_agent": None,
        "external_user": None,
        "response_cache_source_id": None,
        "data_region": "global",
        "workspace_id": None,
    }


def _answer_text(body: dict[str, Any], model: str, prompt: str, fault: str | None) -> str:
    """The answer's text as the request's response_format shapes it (a schema's object, a JSON object, prose),
    cut short by an `invalid_json` fault or missing a property with `schema_violation`."""
    response_format = body.get("response_format") or {}
    kind = response_format.get("type")
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        text = answers.json_text(answers.schema_answer(model, prompt, schema))
    elif kind == "json_object":
        text = answers.json_text({"answer": answers.text_answer(model, prompt)})
    else:
        text = answers.text_answer(model, prompt)
    if fault == "invalid_json":
        text = text[: max(1, len(text) // 2)]
    if fault == "schema_violation" and kind == "json_schema":
        value = json.loads(text)
        if isinstance(value, dict) and value:
            value.pop(next(iter(value)))
        text = answers.json_text(value if isinstance(value, dict) else {})
    return text


def _upstream_cost(cost: Decimal, prompt_share: Decimal) -> dict[str, float]:
    """usage.cost_details with BYOK: what the provider bills the user's own key, split into prompt and answer."""
    return {
        "upstream_inference_cost": float(cost),
        "upstream_inference_prompt_cost": float(prompt_share) if cost else 0.0,
        "upstream_inference_completions_cost": float(cost - prompt_share) if cost else 0.0,
    }


def _choice(
    text: str, finish_reason: str, *, chat: bool, fault: str | None, tool_calls: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """The answer's one choice: a chat message (a refusal, an object for content, tool calls, as the fault and
    the tools say) or a completion's text; an error finish carries the error OpenRouter puts beside it."""
    choice: dict[str, Any] = {
        "index": 0,
        "finish_reason": finish_reason,
        "native_finish_reason": finish_reason,
        "logprobs": None,
    }
    if chat:
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        if fault == "refusal":
            choice["message"].update(content=None, refusal="I can't help with that request.")
        if fault == "content_object":
            choice["message"]["content"] = {"text": text}
        if tool_calls:
            choice["message"].update(content=None, tool_calls=tool_calls)
            choice["finish_reason"] = choice["native_finish_reason"] = "tool_calls"
    else:
        choice["text"] = text
    if finish_reason == "error":
        choice["error"] = {
            "code": 502,
            "message": "Provider disconnected mid-answer",
            "metadata": {"error_type": "provider_unavailable"},
        }
    return choice


def _flex_capacity_error(model: str, retry_after_s: float) -> web.Response:
    """The flex tier out of capacity: a 429 with OpenRouter's availability object (capacity_exhausted, retryable,
    its constraint the service_tier), as a flex request gets instead of a fall back to the default tier."""
    body = {
        "error": {
            "code": 429,
            "message": f"Flex tier capacity exhausted for {model}; retry later (service_tier flex does not fall "
            "back to the default tier)",
            "metadata": {"error_type": "provider_overloaded", "provider_name": catalog.provider_name(model)},
            "availability": {
                "code": "capacity_exhausted",
                "retryable": True,
                "retry_after": retry_after_s,
                "requested_models": [model],
                "constraint": {"field": "service_tier", "detail": "flex"},
                "docs_url": "https://openrouter.ai/docs/guides/routing/service-tiers",
            },
        }
    }
    return web.json_response(body, status=429, headers={"Retry-After": f"{retry_after_s:g}"})


def _next_utc_midnight_ms() -> int:
    now = time.time()
    return int((now - now % 86400 + 86400) * 1000)


async def serve(config: SandboxConfig, port: int, ready: Callable[[str], None] | None = None) -> None:
    """Serve until cancelled (the `batchrunner sandbox` command)."""
    sandbox = Sandbox(config)
    await sandbox.start(port=port)
    try:
        if ready is not None:
            ready(sandbox.base_url)
        await asyncio.Event().wait()
    finally:
        await sandbox.stop()
