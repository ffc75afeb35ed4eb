"""Rate limits: how fast requests may go, kept busy but never over.

- The account's rate: OpenRouter's credit rule (one request/s per credit left, 1 to 500/s;
  a key without a limit gets 500/s), or the spec's explicit rate. It is re-read while the
  run spends, and lowered multiplicatively on a 429, then recovered gradually.
- `:free` models: at most 20 requests a minute each, and a daily cap across free models that
  persists between runs (a state file), so tomorrow's cron run knows what today used.

Pacing uses aiolimiter's leaky bucket at 97% of the limit with a bucket of k = 2% of R
requests (at least one): `AsyncLimiter(k, k / (0.97 R))`. Any one-second window then
admits at most k + 0.97 R requests, never more than R (with room for network jitter from
R = 50 up; bench/throughput.py counts the sandbox's busiest second), and the
small bucket lets a late wake-up catch up instead of losing its slot for good (with a
bucket of one, every millisecond of event-loop lateness is lost throughput).
A bucket starts full (at the start, and at every change of pace: after a 429, and while the
pace climbs back), so a new bucket never adds a burst to what the old one just admitted. The
first second climbs from 90%: its requests open new connections, which delays them unevenly,
and the server counts them as they arrive (at 500/s, 1 s answers: 5 429s a run without it).
`AsyncLimiter(R, 1)`, the obvious choice, would admit R at once and R more within the
same second.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiolimiter import AsyncLimiter

from batchrunner.errors import FreeModelCapReached
from batchrunner.files import write_text_atomically

log = logging.getLogger("batchrunner")

SURGE_LIMIT_RPS = 500.0
MIN_RPS = 1.0
FREE_REQUESTS_PER_MINUTE = 20
PACE_MARGIN = 0.97
BURST_SHARE = 0.02  # the bucket, as a share of the rate: room for late wake-ups to catch up
DECREASE_FACTOR = 0.7  # on a 429: send 30% slower (at most once a second: one incident, one cut)...
FIRST_DECREASE_FACTOR = 0.9  # ...10% for the first in a while at a limit we know: jitter at the limit, not a wrong one
REPEAT_WINDOW_S = 10.0  # a 429 this soon after the last cut is a repeat
MIN_FACTOR = 1 / 32
RECOVERY_PER_S = 0.1  # ...then win back 10% of the limit per second
START_FACTOR = 0.9  # the first second climbs from 90%: its requests open connections, which delays them unevenly


def is_free(model: str) -> bool:
    return model.endswith(":free")


def rate_from_key(info: dict[str, Any]) -> tuple[float, str]:
    """OpenRouter's credit rule applied to GET /key: (requests per second, why)."""
    remaining = info.get("limit_remaining")
    if remaining is None:
        return SURGE_LIMIT_RPS, "the key has no credit limit: the surge limit of 500 requests/s"
    try:
        credits = float(remaining)
    except (TypeError, ValueError):
        credits = math.nan
    if not math.isfinite(credits):
        return (
            SURGE_LIMIT_RPS,
            f"limit_remaining {str(remaining)[:40]!r} is not a number: the surge limit of 500 requests/s",
        )
    rps = min(SURGE_LIMIT_RPS, max(MIN_RPS, math.floor(credits)))
    return rps, f"{credits:.2f} credits remaining: one request/s per credit, {rps:g} requests/s"


class Pacer:
    """Admits requests at most `rate_rps` per second, evenly spaced; the rate can change live."""

    def __init__(
        self,
        rate_rps: float,
        *,
        clock: Callable[[], float] | None = None,
        label: str = "the run",
        start_factor: float = START_FACTOR,
    ) -> None:
        # The event loop's clock, which aiolimiter paces by too: tests that run the loop on virtual
        # time (looptime) then judge pacing exactly, in milliseconds.
        self._clock = clock or asyncio.get_running_loop().time
        self.label = label  # for log lines: what this pace is for
        self.limit_rps = rate_rps  # what we are allowed
        self.factor = start_factor  # adaptive share of the limit we use: climbs to 1 in the first second, cut by 429s
        self._factor_at = self._clock()
        self._slowed_at = float("-inf")
        self._limiter = self._new_limiter()
        self._full = False  # the first limiter starts as a swapped one does: charged full, no burst at the start

    @property
    def rate_rps(self) -> float:
        """The pace right now."""
        return max(self.limit_rps * self.factor * PACE_MARGIN, 1e-3)

    def _new_limiter(self) -> AsyncLimiter | None:
        self._limiter_rate = pace = self.rate_rps
        if math.isinf(pace):
            return None
        self._burst = max(1, int(BURST_SHARE * self.limit_rps * self.factor))
        return AsyncLimiter(self._burst, self._burst / pace)

    def _pace_changed(self) -> bool:
        """Slower applies at once; faster waits for a 5% gain, since each swap costs a bucket, or for the
        whole pace to be back (else the last few percent of the climb would never be taken)."""
        new, old = self.rate_rps, self._limiter_rate
        if new == old:
            return False
        return not (old * 0.995 <= new <= old * 1.05) or (new > old and self.factor == 1.0)

    def set_limit(self, rate_rps: float) -> None:
        self.limit_rps = rate_rps

    def slow_down(self, *, known_limit: bool = True) -> None:
        """A 429 came anyway (network jitter at the limit, a shared key, an upstream limit): slow down, once per
        incident. At a limit we know (the account's), the first incident in a while is most likely requests
        bunched on the way, so it cuts gently; a repeat, or a limit we cannot know (a provider's), cuts hard."""
        now = self._clock()
        if now - self._slowed_at < 1.0:  # the other requests in flight saw the same incident
            return
        repeat = now - self._slowed_at < REPEAT_WINDOW_S
        self._slowed_at = now
        self._recover()
        gentle = known_limit and not repeat
        self.factor = max(MIN_FACTOR, self.factor * (FIRST_DECREASE_FACTOR if gentle else DECREASE_FACTOR))
        log.info("rate limited: pacing %s at %.1f requests/s for now", self.label, self.rate_rps)

    def _recover(self) -> None:
        now = self._clock()
        self.factor = min(1.0, self.factor + RECOVERY_PER_S * (now - self._factor_at))
        self._factor_at = now

    async def acquire(self) -> None:
        while True:
            self._recover()
            if self._pace_changed() or not self._full:
                # A new pace: a fresh limiter, charged full, as if its whole bucket had just gone
                # (it may have, through the old one): a swap never lets a burst through on top of
                # what the old limiter just admitted, so no second ever admits more than the limit.
                # The run's first requests get no burst either: they open new connections, whose
                # setup delays them unevenly, and the server counts them when they arrive.
                self._limiter, self._full = self._new_limiter(), True
                if self._limiter is not None:
                    await self._limiter.acquire(self._burst)
            limiter = self._limiter
            if limiter is None:  # no limit at all
                return
            await limiter.acquire()
            if limiter is self._limiter:  # admitted at the current pace, not by a replaced limiter
                return


def next_utc_midnight(now: dt.datetime | None = None) -> dt.datetime:
    now = now or dt.datetime.now(dt.UTC)
    return dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


def state_dir() -> Path:
    """Where batchrunner keeps state that outlives a job: $BATCHRUNNER_STATE_DIR, else XDG."""
    if explicit := os.environ.get("BATCHRUNNER_STATE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "batchrunner"


@dataclass
class FreeUsage:
    """Today's count of `:free` requests for one key, persisted to a small JSON file.

    OpenRouter's daily cap counts requests per account and resets at UTC midnight; the file
    is keyed by a hash of the API key (never the key itself) and by the UTC date.
    """

    path: Path
    account: str
    day: str
    used: int = 0

    @classmethod
    def load(cls, directory: Path, api_key: str | None, *, today: dt.date | None = None) -> FreeUsage:
        account = hashlib.sha256((api_key or "no-key").encode()).hexdigest()[:16]
        day = (today or dt.datetime.now(dt.UTC).date()).isoformat()
        path = directory / "free-model-usage.json"
        used = 0
        try:
            entry = json.loads(path.read_text()).get(account, {})
            if entry.get("day") == day:
                used = int(entry.get("used", 0))
        except (OSError, ValueError, AttributeError):
            pass
        return cls(path, account, day, used)

    def save(self) -> None:
        try:
            data = json.loads(self.path.read_text()) if self.path.exists() else {}
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[self.account] = {"day": self.day, "used": self.used}
        write_text_atomically(self.path, json.dumps(data, indent=1))


class Limits:
    """Everything that decides when the next request to a model may go."""

    def __init__(
        self,
        rate_rps: float,
        *,
        free_cap: int = 200,
        free_usage: FreeUsage | None = None,
        free_per_minute: float | None = None,
    ) -> None:
        self.pacer = Pacer(rate_rps)
        self.free_cap = free_cap
        self.free_usage = free_usage
        self._free_interval_s = 60 / (free_per_minute or FREE_REQUESTS_PER_MINUTE) / PACE_MARGIN
        self._free_pacers: dict[str, AsyncLimiter] = {}
        self.free_cap_reached: FreeModelCapReached | None = None
        self._slowed: dict[str, Pacer] = {}  # per model, after an upstream provider's 429

    def cap_reached(self, model: str) -> FreeModelCapReached:
        """Stop sending to free models until UTC midnight (the server said so, or our count did)."""
        if self.free_cap_reached is None:
            self.free_cap_reached = FreeModelCapReached(model, self.free_cap, next_utc_midnight())
            log.warning("%s", self.free_cap_reached)
            if self.free_usage is not None and self.free_usage.used < self.free_cap:
                self.free_usage.used = self.free_cap
                self.free_usage.save()
        return self.free_cap_reached

    async def acquire(self, model: str) -> None:
        """Wait for the next slot for `model`; FreeModelCapReached when free models are out for the day."""
        if is_free(model):
            if self.free_cap_reached is not None:
                raise self.free_cap_reached
            if model not in self._free_pacers:
                self._free_pacers[model] = AsyncLimiter(1, self._free_interval_s)
            await self._free_pacers[model].acquire()
            usage = self.free_usage
            if usage is not None:
                if usage.used >= self.free_cap:
                    raise self.cap_reached(model)
                usage.used += 1
                usage.save()
        slowed = self._slowed.get(model)
        if slowed is not None:
            slowed.set_limit(self.pacer.limit_rps)
            await slowed.acquire()
        await self.pacer.acquire()

    def rate_limited(self, model: str, *, upstream: bool) -> None:
        """A 429 anyway. OpenRouter's own limit slows the whole run; an upstream provider's
        limit slows only the model it serves, so the other models of an evaluation go on."""
        if not upstream:
            self.pacer.slow_down()
            return
        if model not in self._slowed:
            self._slowed[model] = Pacer(self.pacer.limit_rps, label=model, start_factor=1.0)
        self._slowed[model].slow_down(known_limit=False)
