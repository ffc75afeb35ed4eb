"""A pool of endpoints (api.endpoints): least-outstanding routing, per-endpoint caps, draining, server gone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from batchrunner import api
from batchrunner.breaker import Breaker, ServerWatch
from batchrunner.cli import main
from batchrunner.client import Client
from batchrunner.halt import StopReason
from batchrunner.pool import Endpoint, Pool, display_url
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec

FAST_RETRY = {"max_attempts": 5, "base_delay_s": 0.01, "max_delay_s": 0.05}


def rows_csv(tmp_path: Path, n: int) -> str:
    path = tmp_path / f"rows{n}.csv"
    pl.DataFrame({"ticket_id": [f"T-{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)]}).write_csv(path)
    return path.name


def answered(*sandboxes: Sandbox) -> dict[str, int]:
    """How many 200 answers each request got, across the sandboxes."""
    counts: dict[str, int] = {}
    for sandbox in sandboxes:
        for key, n in sandbox.stats.answered.items():
            counts[key] = counts.get(key, 0) + n
    return counts


def pool_spec(write_spec: Callable[..., Path], tmp_path: Path, rows: int, endpoints: list[Any], **changes: Any) -> Path:
    return write_spec(input=rows_csv(tmp_path, rows), api={"endpoints": endpoints}, retry=FAST_RETRY, **changes)


async def stop_after(sandbox: Sandbox, requests: int) -> None:
    """Stop `sandbox` (connections refused from then on) once it has seen `requests` requests."""
    while sandbox.stats.requests < requests:
        await asyncio.sleep(0.005)
    await sandbox.stop()


async def test_an_endpoint_stopped_mid_run_drains_to_the_other(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """One of two endpoints goes away mid-run: every row is answered exactly once across both, both served rows,
    nothing is paid twice, the output names each row's endpoint and the summary has a line per endpoint."""
    config = SandboxConfig(latency_s=0.01)
    async with Sandbox(config) as first, Sandbox(config) as second:
        job = pool_spec(write_spec, tmp_path, 60, [first.base_url, {"base_url": second.base_url, "concurrency": 4}])
        stopping = asyncio.create_task(stop_after(first, 12))
        result = await api.arun(job)
        await stopping
    assert result.exit_code == 0 and result.summary.ok == 60
    counts = answered(first, second)
    assert len(counts) == 60 and set(counts.values()) == {1}, "each row answered once, by one endpoint"
    assert sum(first.stats.answered.values()) > 0 and sum(second.stats.answered.values()) > 0
    assert first.stats.charged_usd + second.stats.charged_usd == result.summary.cost_usd, "nothing paid twice"
    frame = result.frame
    assert frame is not None
    served = frame["endpoint"].value_counts()
    by_url = dict(zip(served["endpoint"].to_list(), served["count"].to_list(), strict=True))
    assert by_url == {
        first.base_url: sum(first.stats.answered.values()),
        second.base_url: sum(second.stats.answered.values()),
    }
    stats = result.summary.endpoints
    assert stats[first.base_url].ok == sum(first.stats.answered.values())
    assert stats[first.base_url].errors > 0, "its refused requests are counted"
    assert stats[second.base_url].ok == sum(second.stats.answered.values())
    lines = result.summary.lines(wall_s=1.0, pending=0)
    assert any(line.startswith(f"endpoint {second.base_url}: ") and "ok" in line for line in lines)
    assert "endpoints" in result.summary.to_json(wall_s=1.0, pending=0, resumed=0, stopped=None)


async def test_a_5xx_storm_opens_that_endpoints_circuit_and_its_rows_go_elsewhere(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """An endpoint whose model answers 502 every time has its own circuit opened: every row is answered by the
    other, none failed, and the failing one's errors are counted on its line."""
    async with (
        Sandbox(SandboxConfig(down_models={"openai/gpt-4o-mini"})) as broken,
        Sandbox(SandboxConfig(latency_s=0.005)) as healthy,
    ):
        result = await api.arun(pool_spec(write_spec, tmp_path, 40, [broken.base_url, healthy.base_url]))
    assert result.exit_code == 0 and result.summary.ok == 40
    assert sum(broken.stats.answered.values()) == 0 and sum(healthy.stats.answered.values()) == 40
    stats = result.summary.endpoints
    assert stats[broken.base_url].ok == 0 and stats[broken.base_url].errors >= 5
    assert stats[broken.base_url].errors < 40, "its circuit opened: it was not asked for every row"


async def test_every_endpoint_gone_stops_the_run_as_server_gone(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """When every endpoint has been unreachable for unreachable_timeout_s, the run stops (server gone, exit 3):
    the rows not answered stay pending, none failed."""
    config = SandboxConfig(latency_s=0.02)
    async with Sandbox(config) as first, Sandbox(config) as second:
        job = pool_spec(
            write_spec, tmp_path, 40, [first.base_url, second.base_url], concurrency=2, unreachable_timeout_s=0.3
        )
        stopping = asyncio.gather(stop_after(first, 3), stop_after(second, 3))
        result = await api.arun(job)
        await stopping
    assert result.stop is not None and result.stop.reason is StopReason.SERVER_GONE
    assert "every endpoint" in result.stop.message
    assert result.exit_code == 3
    assert result.summary.failed == 0 and result.pending > 0


async def test_two_equal_endpoints_share_the_load(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """Least-outstanding routing: two equal endpoints each answer a fair share of the rows."""
    config = SandboxConfig(latency_s=0.01)
    async with Sandbox(config) as first, Sandbox(config) as second:
        job = pool_spec(write_spec, tmp_path, 80, [first.base_url, second.base_url], concurrency=4)
        result = await api.arun(job)
    assert result.summary.ok == 80 and set(answered(first, second).values()) == {1}
    assert sum(first.stats.answered.values()) >= 20 and sum(second.stats.answered.values()) >= 20


async def test_each_endpoint_is_held_to_its_own_cap(write_spec: Callable[..., Path], tmp_path: Path) -> None:
    """Each endpoint gets at most its own concurrency at once (a sandbox with that capacity sheds none), and
    the bigger one is used to its cap."""
    async with (
        Sandbox(SandboxConfig(latency_s=0.02, capacity=1)) as small,
        Sandbox(SandboxConfig(latency_s=0.02, capacity=3)) as big,
    ):
        endpoints = [{"base_url": small.base_url, "concurrency": 1}, {"base_url": big.base_url, "concurrency": 3}]
        result = await api.arun(pool_spec(write_spec, tmp_path, 40, endpoints))
    assert result.summary.ok == 40
    assert small.stats.shed == 0 and big.stats.shed == 0
    assert small.stats.most_in_flight == 1 and big.stats.most_in_flight == 3


def test_pick_takes_the_endpoint_with_the_fewest_outstanding() -> None:
    """Of the endpoints with room, the one with the fewest requests outstanding; a full one never."""
    pool = Pool(
        [
            Endpoint(f"http://h{i}/v1", Client(f"http://h{i}/v1"), cap, Breaker(), ServerWatch())
            for i, cap in enumerate((2, 4))
        ]
    )
    a, b = pool.endpoints
    a.outstanding, b.outstanding = 1, 3
    assert pool.pick("m/x") is a
    a.outstanding = 2  # at its cap
    assert pool.pick("m/x") is b
    b.outstanding = 4
    assert pool.pick("m/x") is None


def test_the_shown_url_carries_no_credentials() -> None:
    """The endpoint column and summary show scheme, host, port and path only."""
    assert display_url("http://user:secret@host:8000/v1?token=x#f") == "http://host:8000/v1"


def test_urls_and_caps_from_the_spec(write_spec: Callable[..., Path]) -> None:
    """Bare URLs take the spec's concurrency; the pool's most in flight is every cap together."""
    spec = load_spec(write_spec(api={"endpoints": ["http://a:1/v1/", {"base_url": "http://b:1/v1", "concurrency": 2}]}))
    assert spec.endpoint_caps() == [("http://a:1/v1", 4), ("http://b:1/v1", 2)]
    assert spec.most_in_flight == 6 and spec.base_url() == "http://a:1/v1"


@pytest.mark.parametrize(
    ("api_settings", "expected"),
    [
        ({"endpoints": [{"concurrency": 2}]}, "api.endpoints[0].base_url: required key is missing"),
        ({"endpoints": ["http://a:1/v1", "http://a:1/v1/"]}, "api.endpoints: http://a:1/v1 is listed twice"),
        (
            {"endpoints": ["http://a:1/v1", {"base_url": "http://b:1/v1", "api_key_env": "POOL_TEST_UNSET_KEY"}]},
            "api.endpoints[1].api_key_env: $POOL_TEST_UNSET_KEY is not set",
        ),
        ({"endpoints": ["http://a:1/v1"], "base_url": "http://b:1/v1"}, "api: give either base_url or endpoints"),
    ],
)
def test_bad_pools_exit_2_naming_the_field(
    write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, api_settings: dict[str, Any], expected: str
) -> None:
    """A pool spec with a mistake is refused before anything is sent (exit 2), naming the field."""
    monkeypatch.delenv("POOL_TEST_UNSET_KEY", raising=False)
    result = CliRunner().invoke(main, ["run", str(write_spec(api=api_settings))], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr


async def test_one_endpoints_refused_key_stops_the_run_naming_that_endpoint(
    write_spec: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 401 from one endpoint of a pool stops the run (exit 3, rows pending) with a sentence naming that endpoint."""
    monkeypatch.setenv("POOL_TEST_WRONG_KEY", "sk-or-v1-wrong")
    async with (
        Sandbox(SandboxConfig(latency_s=0.01)) as good,
        Sandbox(SandboxConfig(require_key=True, api_key="sk-or-v1-right")) as revoked,
    ):
        endpoints = [good.base_url, {"base_url": revoked.base_url, "api_key_env": "POOL_TEST_WRONG_KEY"}]
        result = await api.arun(pool_spec(write_spec, tmp_path, 30, endpoints))
    assert result.stop is not None and result.stop.reason is StopReason.ACCOUNT and result.exit_code == 3
    assert result.summary.failed == 0 and result.pending > 0
    assert revoked.base_url in result.stop.message and "\n" not in result.stop.message
