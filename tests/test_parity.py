"""One job through both executors: the live pool and the Batch API drive the same row flow, so the same
scripted faults end the same way.

The sandbox decides each fault from its seed, the request and how many times it has seen that request,
the same way for a live request and a batch's: the same job meets the same faults in either mode.
What has no batch counterpart is left out of the comparison, as the issue says: per-row Retry-After
waits (Retry-After 0 here), the breaker's pauses (its threshold out of reach here) and the budget's
waits per request (no budget), and the batch discount (a price factor of 1 here, so the bills are the
live prices in both).
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import polars as pl

from batchrunner.breaker import Breaker
from batchrunner.runner import RunSettings, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec

FAULTS = {"server_error": 0.1, "overloaded": 0.1, "invalid_json": 0.15, "schema_violation": 0.1, "refusal": 0.2}
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "triage",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"label": {"type": "string"}, "urgent": {"type": "boolean"}},
            "required": ["label", "urgent"],
            "additionalProperties": False,
        },
    },
}
COMPARED = [
    "status",
    "model",
    "response",
    "label",
    "urgent",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "billed_prompt_tokens",
    "billed_completion_tokens",
    "cost_usd",
    "cost_source",
]


def _config() -> SandboxConfig:
    return SandboxConfig(
        seed=11,
        faults=FAULTS,
        retry_after_s=0.0,
        down_models={"meta-llama/llama-3.1-8b-instruct"},  # its rows go to their fallbacks after 3 attempts
        batch_price_factor=Decimal(1),
    )


async def test_the_same_job_ends_the_same_through_the_live_pool_and_the_batch_api(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Transient errors within attempts, invalid structured answers repaired, refusals handed to a fallback, a
    model that is down with a fallback: per pair, the same status, answer, attempts, tokens and bill either way."""
    rows = tmp_path / "rows.csv"
    pl.DataFrame({"ticket_id": [f"T-{i}" for i in range(60)], "text": [f"text {i}" for i in range(60)]}).write_csv(rows)
    frames = {}
    for mode in ("live", "batch"):
        async with Sandbox(_config()) as sandbox:
            spec = load_spec(
                write_spec(
                    input=rows.name,
                    output=f"{mode}/out.parquet",
                    mode=mode,
                    # One requested model: two pairs of a row falling back to one model would send the same
                    # request, and share its faults in whatever order the live pool happens to send them.
                    models=["meta-llama/llama-3.1-8b-instruct"],
                    fallbacks=["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"],
                    response_format=SCHEMA,
                    retry={"max_attempts": 3, "base_delay_s": 0, "max_delay_s": 0},
                    api={"base_url": sandbox.base_url},
                )
            )
            outcome = await run_job(spec, RunSettings(breaker=Breaker(threshold=1_000_000)))
        assert outcome.report.pending == 0
        frames[mode] = pl.read_parquet(spec.output).sort("ticket_id", "requested_model")
    live, batch = frames["live"], frames["batch"]
    assert live.height == 60 and set(live["status"]) <= {"ok", "failed"}
    assert (live["attempts"] > 1).sum() > 10, "the faults should have made many pairs ask again"
    assert live.filter(pl.col("status") == "ok")["model"].is_in(["meta-llama/llama-3.1-8b-instruct"]).sum() == 0
    assert (live["model"] == "anthropic/claude-3.5-haiku").sum() > 0, "the second fallback took what the first refused"
    for column in COMPARED:
        assert live[column].to_list() == batch[column].to_list(), column
    assert live["error"].is_null().to_list() == batch["error"].is_null().to_list()
    why = pl.col("error").str.starts_with("refusal") | pl.col("error").str.starts_with("invalid structured output")
    assert live.filter(why).height > 0, "some pairs should have failed on a refusal or an invalid answer"
    assert live.filter(why)["error"].to_list() == batch.filter(why)["error"].to_list()
