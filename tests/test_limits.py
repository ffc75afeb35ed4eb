"""Rate limits: the credit rule, even pacing that never bursts, adaptation, free-model caps."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from conftest import on_virtual_time

from batchrunner.limits import FreeModelCapReached, FreeUsage, Limits, Pacer, rate_from_key


@pytest.mark.parametrize(
    ("remaining", "rps"),
    [(None, 500.0), (0.4, 1.0), (7.9, 7.0), (42, 42.0), (10_000, 500.0), ("junk", 500.0)],
)
def test_credit_rule(remaining: object, rps: float) -> None:
    """One request/s per credit remaining, at least 1, at most the surge limit; no limit means the surge limit."""
    assert rate_from_key({"limit_remaining": remaining})[0] == rps


def max_in_any_window(times: list[float], window_s: float = 1.0) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


async def admission_times(pacer: Pacer, n: int) -> list[float]:
    """When each of `n` concurrent acquirers got through, in order (the loop's clock)."""
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def one() -> None:
        await pacer.acquire()
        times.append(loop.time())

    await asyncio.gather(*(one() for _ in range(n)))
    return sorted(times)


@on_virtual_time
async def test_pacer_spaces_requests_evenly_and_never_bursts() -> None:
    """At 40 requests/s, 45 concurrent acquirers are let through one every ~1/40 s, never 41 in a second."""
    times = await admission_times(Pacer(40, start_factor=1.0), 45)
    assert max_in_any_window(times) <= 40
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 1 / 40 * 0.5, "no burst: a late task's timestamp may shrink one gap, never to nothing"
    assert times[-1] - times[0] == pytest.approx(44 / (40 * 0.97), rel=0.01), "and it keeps the limit busy"


@on_virtual_time
async def test_pacer_follows_a_new_limit_live() -> None:
    """set_limit takes effect for the next request without a restart."""
    pacer = Pacer(1000)
    loop = asyncio.get_running_loop()
    for _ in range(3):
        await pacer.acquire()
    pacer.set_limit(20)
    start = loop.time()
    for _ in range(4):
        await pacer.acquire()
    assert loop.time() - start >= 3 / 20


def test_slow_down_once_per_incident_then_recover() -> None:
    """A first 429 cuts the pace by 10% (once for 429s within a second: one incident), a repeat within 10 s by 30%;
    it climbs back 10% of the limit per second, and after 10 quiet seconds a 429 is a first one again."""
    now = [0.0]
    pacer = Pacer(100, clock=lambda: now[0], start_factor=1.0)
    pacer.slow_down()
    pacer.slow_down()
    assert pacer.factor == pytest.approx(0.9)
    now[0] = 0.5
    pacer._recover()
    assert pacer.factor == pytest.approx(0.95)
    now[0] = 1.5
    pacer.slow_down()
    assert pacer.factor == pytest.approx(1.0 * 0.7), "a repeat: 30%, from where it had climbed back to"
    now[0] = 3.0
    pacer._recover()
    assert pacer.factor == pytest.approx(0.7 + 0.15)
    now[0] = 100.0
    pacer._recover()
    assert pacer.factor == 1.0
    pacer.slow_down()
    assert pacer.factor == pytest.approx(0.9)


def test_free_usage_persists_per_key_and_day(tmp_path: Path) -> None:
    """Today's free count survives a restart, is kept per key (hashed), and starts over on a new day."""
    today = dt.date(2026, 11, 25)
    usage = FreeUsage.load(tmp_path, "sk-or-v1-a", today=today)
    usage.used = 17
    usage.save()
    assert FreeUsage.load(tmp_path, "sk-or-v1-a", today=today).used == 17
    assert FreeUsage.load(tmp_path, "sk-or-v1-b", today=today).used == 0
    assert FreeUsage.load(tmp_path, "sk-or-v1-a", today=today + dt.timedelta(days=1)).used == 0
    assert "sk-or-v1-a" not in (tmp_path / "free-model-usage.json").read_text()
    json.loads((tmp_path / "free-model-usage.json").read_text())


async def test_free_cap_stops_free_models_only(tmp_path: Path) -> None:
    """At the daily cap a free model raises FreeModelCapReached (saying when it resets); paid models go on."""
    usage = FreeUsage.load(tmp_path, "k")
    limits = Limits(float("inf"), free_cap=2, free_usage=usage, free_per_minute=60_000)
    await limits.acquire("x/y:free")
    await limits.acquire("x/z:free")
    with pytest.raises(FreeModelCapReached, match=r"resets at .* UTC"):
        await limits.acquire("x/y:free")
    await limits.acquire("x/paid")
    assert FreeUsage.load(tmp_path, "k").used == 2


@on_virtual_time
async def test_free_models_are_paced_per_minute() -> None:
    """Each free model gets its own per-minute pace (here 600/min: 0.1 s apart)."""
    limits = Limits(float("inf"), free_per_minute=600)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(3):
        await limits.acquire("x/y:free")
    await limits.acquire("x/other:free")
    assert loop.time() - start == pytest.approx(0.2 / 0.97, rel=0.001), "two waits on x/y; x/other goes at once"


@on_virtual_time
async def test_an_upstream_429_slows_only_its_model() -> None:
    """A provider's 429 slows the model it serves; OpenRouter's own 429 slows the whole run."""
    limits = Limits(100)
    limits.pacer.factor = 1.0  # past the start's climb
    limits.rate_limited("a/slow", upstream=True)
    assert limits.pacer.factor == 1.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(12):
        await limits.acquire("b/fine")
    fine_s = loop.time() - start
    start = loop.time()
    for _ in range(12):
        await limits.acquire("a/slow")
    slow_s = loop.time() - start
    assert slow_s > fine_s * 1.2, "the throttled model is paced slower than the others"
    limits.rate_limited("b/fine", upstream=False)
    assert limits.pacer.factor == pytest.approx(0.9)


@pytest.mark.parametrize("remaining", [float("nan"), float("inf"), "NaN", "Infinity", {"x": 1}])
def test_a_limit_remaining_that_is_not_a_finite_number_falls_back_to_the_surge_limit(remaining: object) -> None:
    """GET /key answering NaN or Infinity (or an object) is not a crash: the surge limit, saying why."""
    rps, why = rate_from_key({"limit_remaining": remaining})
    assert rps == 500 and "is not a number" in why


@on_virtual_time
async def test_pacer_uses_the_rate_fully_and_never_exceeds_it() -> None:
    """1,000 requests at R = 100/s: no one-second window admits more than R, and the whole takes
    1,000 / (0.97 R) seconds to within 1% (the 3% margin is what keeps network jitter under R)."""
    times = await admission_times(Pacer(100, start_factor=1.0), 1000)
    assert max_in_any_window(times) <= 100
    assert times[-1] - times[0] == pytest.approx(999 / (100 * 0.97), rel=0.01)


async def admissions_under_load(
    pacer: Pacer, *, until_s: float, alongside: Coroutine[Any, Any, None] | None = None
) -> list[float]:
    """When 20 workers that always want the next slot are admitted, until `until_s` (virtual time), in order."""
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def worker() -> None:
        while loop.time() < until_s:
            await pacer.acquire()
            times.append(loop.time())

    await asyncio.gather(*([alongside] if alongside is not None else []), *(worker() for _ in range(20)))
    return sorted(times)


@on_virtual_time
async def test_the_pace_climbing_back_after_a_429_never_lets_a_window_exceed_the_rate() -> None:
    """At R = 200/s, one 429 (a slow-down) after 1 s, then 3 s of the pace climbing back under full load: each
    time the pace changes the new bucket starts full, so no one-second window admits more than R. (A fresh
    bucket let its burst through at once, on top of what the old one had just admitted, every few dozen
    milliseconds: 524 in a second at R = 500.)"""
    pacer = Pacer(200)

    async def incident() -> None:
        await asyncio.sleep(1)
        pacer.slow_down()

    times = await admissions_under_load(pacer, until_s=4, alongside=incident())
    assert max_in_any_window(times) <= 200
    assert len(times) > 0.75 * 200 * 4, "and the pace did climb back"


@on_virtual_time
async def test_the_run_starts_at_90_percent_and_climbs_back_to_the_whole_pace() -> None:
    """The first second climbs from 90% of the pace (its requests open connections, whose setup bunches them
    on the way), in steps, all the way back: the second second is paced at 97% of R, not a step short of it."""
    times = await admissions_under_load(Pacer(200), until_s=2)
    first = sum(1 for t in times if t < 1)
    second = sum(1 for t in times if 1 <= t < 2)
    assert 0.9 * 194 <= first < 0.97 * 194
    assert second == pytest.approx(194, abs=2)
