"""queries.py: the estimate, against what the sandbox then charges."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from batchrunner.dataset import open_dataset
from batchrunner.queries import estimate_job
from batchrunner.retries import RetryPolicy
from batchrunner.runner import RunSettings, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec


@pytest.mark.slow  # seconds of paced or multi-process runs: the long set (CI's second step)
async def test_estimate_is_within_a_factor_of_two_and_its_worst_case_holds(tmp_path: Path) -> None:
    """For each example job: expected cost within 2x of what the sandbox charged; worst case never below it."""
    jobs = sorted(Path(__file__).resolve().parent.parent.joinpath("jobs").glob("*.yaml"))
    for job in jobs:
        overrides = {
            "output": str(tmp_path / f"{job.stem}.parquet"),
            "checkpoint": str(tmp_path / f"{job.stem}.sqlite"),
        }
        spec = load_spec(job, overrides=overrides)
        estimate = await estimate_job(spec, limit=60, sandbox=SandboxConfig())
        async with Sandbox() as sandbox:
            await run_job(
                load_spec(job, overrides={**overrides, "api": {"base_url": sandbox.base_url}}), RunSettings(limit=60)
            )
        actual = sandbox.stats.charged_usd
        expected, worst = Decimal(estimate["expected_cost_usd"]), Decimal(estimate["max_cost_usd"])
        rows = min(60, open_dataset(spec.input, id_column=spec.id_column).rows)
        copies = sum(entry["deduplicated_rows"] for entry in estimate["models"].values())
        assert estimate["rows"] + copies == rows * len(spec.models)  # identical requests are sent once
        assert actual / 2 <= expected <= actual * 2, (job.name, expected, actual)
        assert worst >= actual, (job.name, worst, actual)
        assert estimate["expected_duration_s"] > 0


async def test_the_estimates_worst_case_is_what_the_run_reserves(write_spec: Any, reservations: list[Decimal]) -> None:
    """One definition of a request's worst case: the estimate's max_cost_usd is the sum of what the run then
    reserves against its budget, request by request, web search's allowance included (it was left out)."""
    job = write_spec(
        params={"max_tokens": 50, "plugins": [{"id": "web", "max_results": 3}]},
        budget_usd=10,
        rate_limit={"requests_per_second": 1000},
    )
    estimate = await estimate_job(load_spec(job), sandbox=SandboxConfig())
    async with Sandbox() as sandbox:
        spec = load_spec(job, overrides={"api": {"base_url": sandbox.base_url}})
        await run_job(spec, RunSettings(retry=RetryPolicy.immediate()))
    assert len(reservations) == estimate["rows"] > 0
    assert Decimal(estimate["max_cost_usd"]) == sum(reservations, Decimal(0)).quantize(Decimal("1E-9"))
