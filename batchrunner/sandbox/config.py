"""What the sandbox simulates (its latency, faults, limits, prices, Batch API): the settings alone, without the
server, so a run that does not start one does not import aiohttp's web server for its type."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from batchrunner.sandbox import answers
from batchrunner.sandbox.faults import FAULT_KINDS


@dataclass
class SandboxConfig:
    """What the sandbox simulates. The defaults: instant, unlimited, faultless."""

    seed: int = 0
    latency_s: float | Callable[[dict[str, Any]], float] = 0.0  # a number, or a function of the request body
    round_trip_s: float = 0.0  # every request, of any route, waits this long first: the network to a far server
    faults: dict[str, float] = field(default_factory=dict)  # kind -> probability per request
    retry_after_s: float = 1.0  # what simulated 429s and 402s ask clients to wait
    credits_usd: Decimal | None = None  # the key's limit; None is a key without a limit
    rate_limit: float | Literal["credits"] | None = None  # requests/s, or OpenRouter's credits rule
    down_models: set[str] = field(default_factory=set)  # models answering 502 "provider returned error"
    require_key: bool = False  # answer 401 unless the key looks like an OpenRouter key
    api_key: str | None = None  # with require_key: the only key accepted
    record_bodies: bool = False  # keep every completion request body in stats.bodies (tests)
    report_cost: bool = True  # include usage.cost (older deployments and other servers do not)
    bill_failed_answers: bool = False  # charge empty and finish_reason "error" answers (some upstreams bill the prompt)
    # BYOK: answers as through a provider key of the user's own. usage.cost is then only OpenRouter's fee (this
    # share of the price), usage.cost_details.upstream_inference_cost what the provider bills (the price), and
    # usage.is_byok true; charged_usd counts both, as the user pays both.
    byok: bool = False
    byok_fee_share: Decimal = Decimal("0.05")
    free_daily_cap: int = 200
    report_free_daily: bool = True  # /key says free_model_daily_requests (older deployments and other servers do not)
    # The Batch API (batches.py says how a batch lives):
    batch_turnaround_s: float = 0.0  # how long a submitted batch takes to complete (read each time it is looked at)
    batch_price_factor: Decimal = Decimal("0.5")  # batch answers cost this share of the realtime price
    batch_expire_s: float | None = None  # a batch not completed this long after submission expires
    no_batch_models: set[str] = field(default_factory=set)  # models the Batch API refuses (no batch endpoint)
    batch_inline_results: bool = True  # GET /batches/{id} carries a completed batch's results (else only .../results)
    batch_cancel_allowed: bool = True  # POST /batches/{id}/cancel works (OpenRouter enables it per organization: 403)
    batch_cancel_delay_s: float = 0.5  # from a cancel to the provider's confirming it (the batch is then cancelled)
    batch_cancel_status: Literal["in_progress", "cancelling"] = "in_progress"  # a batch's status until then
    batch_fail_message: str | None = None  # batches submitted fail validation after their 202, with this message
    batch_list_page_size: int = 20  # GET /batches' page when it asks no limit
    batch_clock: Callable[[], float] = time.time  # the Batch API's time: a test can move it instead of waiting
    # A self-hosted server's capacity: the completions it works on at once; one more is shed with a 503 (what
    # `concurrency: auto` must find without being told)
    capacity: int | None = None
    refuse_inputs: dict[str, set[str]] = field(default_factory=dict)  # model -> kinds (image, file, audio) its
    # endpoints refuse with a 404, though it lists them (as when a provider of the model lacks vision)
    # GET /generation's records, made to disagree with the answers (for `batchrunner audit`). Which generations
    # is decided by the seed and the id alone (`drifts`, `lags`), so a sandbox started later (the built-in
    # one ends with its command) answers for an earlier one's ids the same way.
    generation_drift_share: float = 0.0  # the share of generations whose kept cost differs from usage.cost...
    generation_drift_usd: Decimal = Decimal("0.00001")  # ...by this much (kept = reported + this)
    generation_lag_share: float = 0.0  # the share of generations whose record comes late: 404 until...
    generation_lag_s: float = 0.0  # ...this long after the answer was created (OpenRouter's lag, much longer)
    generation_clock: Callable[[], float] = time.time  # /generation's time: a test can move it instead of waiting

    def drifts(self, generation_id: str) -> bool:
        """Whether the sandbox's record of this generation keeps another cost than its answer reported."""
        return answers.seeded_rng(self.seed, "drift", generation_id).random() < self.generation_drift_share

    def lags(self, generation_id: str) -> bool:
        """Whether this generation's record comes `generation_lag_s` after its answer (a 404 until then)."""
        return answers.seeded_rng(self.seed, "lag", generation_id).random() < self.generation_lag_share

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown sandbox fault(s) {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
        if not 1 <= self.batch_list_page_size <= 100:  # what GET /batches?limit= takes
            raise ValueError(f"batch_list_page_size must be from 1 to 100, not {self.batch_list_page_size}")
