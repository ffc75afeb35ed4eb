"""Backoff: full jitter under a doubling cap, and the server's hint wins."""

from __future__ import annotations

import random

from batchrunner.retries import RetryPolicy


def test_backoff_is_jittered_under_a_doubling_cap() -> None:
    """Delays stay within [0, base·2^(n-1)], capped at max_delay_s, and are not all equal."""
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=8.0, rng=random.Random(1))
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 8.0)]:
        delays = [policy.delay_s(attempt) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8 and len(set(delays)) > 100


def test_server_hint_wins_but_is_capped() -> None:
    """Retry-After is honoured as given, up to max_server_wait_s."""
    policy = RetryPolicy(max_server_wait_s=30.0)
    assert policy.delay_s(1, server_hint_s=12.5) == 12.5
    assert policy.delay_s(1, server_hint_s=3600) == 30.0


def test_immediate_policy_never_waits() -> None:
    """The test policy makes every wait zero, hints included."""
    policy = RetryPolicy.immediate()
    assert policy.delay_s(5) == 0.0 and policy.delay_s(1, server_hint_s=10) == 0.0
