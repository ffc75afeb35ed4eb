"""`batchrunner audit`: the pure comparison (a table of rows against records), and the audit of a job against a
sandbox whose generation records disagree on some rows and come late for others."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner, Result

from batchrunner.audit import (
    Audit,
    KeptRecord,
    ModelAudit,
    RecordedRow,
    Tolerance,
    audit,
    audit_row,
)
from batchrunner.auditing import AuditOutcome, AuditSettings, audit_job
from batchrunner.cli import main
from batchrunner.client import Client
from batchrunner.errors import TransientError
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import load_spec

KEY = "sk-or-v1-test"


def row(
    cost: str | None = "0.001",
    tokens: tuple[int, int] = (10, 5),
    *,
    source: str = "reported",
    attempts: int = 1,
    billed: tuple[int, int] | None = None,
    model: str = "m/a",
    generation_id: str = "gen-1",
) -> RecordedRow:
    billed = billed or tokens
    return RecordedRow(
        generation_id=generation_id,
        row_id=f"r-{generation_id}",
        requested_model=model,
        cost_usd=None if cost is None else Decimal(cost),
        cost_source=source,
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        billed_prompt_tokens=billed[0],
        billed_completion_tokens=billed[1],
        attempts=attempts,
    )


def kept(cost: str | None = "0.001", tokens: tuple[int, int] = (10, 5)) -> KeptRecord:
    return KeptRecord(None if cost is None else Decimal(cost), tokens[0], tokens[1])


# (why, recorded, kept, verdict, cost differs, tokens differ, drift)
ROWS: list[tuple[str, RecordedRow, KeptRecord | None, str, bool, bool, str]] = [
    ("the same", row(), kept(), "match", False, False, "0"),
    ("a micro-dollar more", row("0.001001"), kept(), "mismatch", True, False, "0.000001"),
    ("less than kept", row("0.0009"), kept(), "mismatch", True, False, "-0.0001"),
    ("one completion token more kept", row(), kept(tokens=(10, 6)), "mismatch", False, True, "0"),
    ("prompt tokens differ", row(), kept(tokens=(11, 5)), "mismatch", False, True, "0"),
    ("both differ", row("0.002"), kept(tokens=(10, 6)), "mismatch", True, True, "0.001"),
    ("no record yet (404)", row(), None, "unknown", False, False, "0"),
    ("an estimate, outside the drift", row("0.05", source="estimated"), kept(), "estimated", False, False, "0"),
    ("no recorded cost", row(None, source="unknown"), kept(), "unpriced", False, False, "0"),
    ("no kept cost", row(), kept(None), "unpriced", False, False, "0"),
    (
        "another attempt billed tokens",
        row("0.003", attempts=2, billed=(20, 9)),
        kept(),
        "other_attempts",
        False,
        False,
        "0",
    ),
    ("another attempt billed nothing", row(attempts=3, billed=(10, 5)), kept(), "match", False, False, "0"),
    ("trailing zeros are the same amount", row("0.00100000"), kept("0.001"), "match", False, False, "0"),
]


@pytest.mark.parametrize(("why", "recorded", "record", "verdict", "cost_differs", "tokens_differ", "drift"), ROWS)
def test_a_row_against_its_record(
    why: str,
    recorded: RecordedRow,
    record: KeptRecord | None,
    verdict: str,
    cost_differs: bool,
    tokens_differ: bool,
    drift: str,
) -> None:
    """Each case of the table gets its verdict, what differs, and its exact drift (recorded minus kept)."""
    item = audit_row(recorded, record)
    assert (item.verdict, item.cost_differs, item.tokens_differ) == (verdict, cost_differs, tokens_differ), why
    assert item.drift_usd == Decimal(drift), why


# (why, GET /generation's data, kept cost, kept tokens)
GENERATIONS: list[tuple[str, dict[str, Any], str | None, tuple[int | None, int | None]]] = [
    ("plain", {"total_cost": 0.00012, "native_tokens_prompt": 7, "native_tokens_completion": 3}, "0.00012", (7, 3)),
    (
        "BYOK: the fee plus the upstream cost",
        {"total_cost": 0.00005, "upstream_inference_cost": 0.001, "is_byok": True, "native_tokens_prompt": 7},
        "0.00105",
        (7, None),
    ),
    (
        "an upstream cost without is_byok is a breakdown, not added",
        {"total_cost": 0.001, "upstream_inference_cost": 0.001, "is_byok": False},
        "0.001",
        (None, None),
    ),
    (
        "normalized tokens where no native count is kept",
        {"total_cost": 0, "tokens_prompt": 9, "tokens_completion": 4, "native_tokens_prompt": None},
        "0",
        (9, 4),
    ),
    ("no cost kept", {"total_cost": None}, None, (None, None)),
    ("a cost that is not a number", {"total_cost": "NaN", "native_tokens_prompt": True}, None, (None, None)),
]


@pytest.mark.parametrize(("why", "data", "cost", "tokens"), GENERATIONS)
def test_what_a_generation_record_says_was_kept(
    why: str, data: dict[str, Any], cost: str | None, tokens: tuple[int | None, int | None]
) -> None:
    """A generation's kept cost is costs.charge's whole (BYOK: fee plus upstream), exact; its tokens native."""
    record = KeptRecord.from_generation(data)
    assert record.cost_usd == (None if cost is None else Decimal(cost)), why
    assert (record.prompt_tokens, record.completion_tokens) == tokens, why
    assert KeptRecord.from_json(json.loads(json.dumps(record.to_json()))) == record, why


def test_per_model_totals_and_drift() -> None:
    """Per model: rows, checked, mismatches, unknown, estimated (with the real cost), drift signed and not."""
    rows = [
        row("0.0011", generation_id="g1"),
        row("0.0009", generation_id="g2"),
        row(generation_id="g3"),
        row(generation_id="g4"),
        row("0.5", source="estimated", generation_id="g5"),
        row("0.002", model="m/b", generation_id="g6"),
    ]
    records = {f"g{i}": kept() for i in (1, 2, 3, 5, 6)}
    result = audit(rows, records)
    a, b = result.models["m/a"], result.models["m/b"]
    assert (a.rows, a.checked, a.matched, a.mismatched, a.unknown, a.estimated) == (5, 4, 1, 2, 1, 1)
    assert a.drift_usd == 0 and a.absolute_drift_usd == Decimal("0.0002")
    assert (a.estimated_recorded_usd, a.estimated_kept_usd) == (Decimal("0.5"), Decimal("0.001"))
    assert b.drift_usd == Decimal("0.001") and b.cost_mismatches == 1
    assert result.total.absolute_drift_usd == Decimal("0.0012") and result.total.rows == 6
    assert [item.row.generation_id for item in result.differing()] == ["g1", "g2", "g5", "g6"]


# (tolerance, kept, absolute drift, exceeds)
TOLERANCES = [
    ("0.0001", "1", "0.0001", False),
    ("0.0001", "1", "0.00010001", True),
    ("$0.01", "1", "0.005", False),
    ("1%", "2", "0.02", False),
    ("1%", "2", "0.021", True),
    ("0", "1", "0.000000001", True),
]


@pytest.mark.parametrize(("text", "kept_usd", "absolute_usd", "exceeds"), TOLERANCES)
def test_tolerance(text: str, kept_usd: str, absolute_usd: str, exceeds: bool) -> None:
    """--tolerance is USD or a percentage of the kept cost; only drift beyond it exceeds it."""
    result = Audit(models={"m/a": ModelAudit(kept_usd=Decimal(kept_usd), absolute_drift_usd=Decimal(absolute_usd))})
    assert result.exceeds(Tolerance.parse(text)) is exceeds


@pytest.mark.parametrize("text", ["abc", "-1", "1%%", "inf", "NaN"])
def test_a_tolerance_that_is_not_an_amount_is_refused(text: str) -> None:
    """A tolerance that is not a finite amount of 0 or more is a ValueError (the command's exit 2)."""
    with pytest.raises(ValueError):
        Tolerance.parse(text)


# -- against a sandbox ---------------------------------------------------------------------------------------


class Clock:
    """The sandbox's /generation time, moved by the test instead of waited for."""

    def __init__(self) -> None:
        self.shift_s = 0.0

    def __call__(self) -> float:
        import time

        return time.time() + self.shift_s


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every generation id looked up (GET /generation), in order."""
    seen: list[str] = []
    original = Client.generation

    async def generation(self: Client, generation_id: str) -> dict[str, Any]:
        seen.append(generation_id)
        return await original(self, generation_id)

    monkeypatch.setattr(Client, "generation", generation)
    return seen


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"OPENROUTER_API_KEY": KEY}, catch_exceptions=False)


@pytest.fixture
def answered(
    write_spec: Callable[..., Path], sandbox_in_thread: Callable[[SandboxConfig], Sandbox]
) -> Iterator[Callable[[SandboxConfig], tuple[Path, pl.DataFrame]]]:
    """A job (24 rows: 12 tickets, two models) run to its end against a sandbox started with the given config; the
    job's path and its output."""

    def start(config: SandboxConfig) -> tuple[Path, pl.DataFrame]:
        sandbox = sandbox_in_thread(config)
        job = write_spec(
            api={"base_url": sandbox.base_url}, models=["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"]
        )
        result = invoke("run", str(job))
        assert result.exit_code == 0, result.output
        return job, pl.read_parquet(job.parent / "out" / "result.parquet")

    yield start


def run_audit(job: Path, **settings: Any) -> AuditOutcome:
    """audit_job on the test's own loop, without the lag waits (the test moves the sandbox's clock instead)."""
    settings.setdefault("lag_waits_s", (0.0, 0.0))
    return asyncio.run(audit_job(load_spec(job), AuditSettings(**settings)))


def test_an_audit_finds_the_disagreements_and_the_lag(
    answered: Callable[[SandboxConfig], tuple[Path, pl.DataFrame]], asked: list[str]
) -> None:
    """Against records that keep $0.001 more on some rows and come an hour late on others: the first audit reports
    the exact drift of the rows it found (exit 1) and the late ones as not yet known, asked three times (two
    retries); a later audit asks only those, finds them, and reports the whole drift."""
    clock = Clock()
    config = SandboxConfig(
        seed=7,
        generation_drift_share=0.4,
        generation_drift_usd=Decimal("0.001"),
        generation_lag_share=0.4,
        generation_lag_s=3600,
        generation_clock=clock,
    )
    job, output = answered(config)
    ids = output["generation_id"].to_list()
    drifted = {g for g in ids if config.drifts(g)}
    late = {g for g in ids if config.lags(g)}
    assert drifted and late and len(late) < len(ids), "the seed must make some rows disagree and some lag"

    first = run_audit(job)
    total = first.audit.total
    assert total.unknown == len(late) and total.checked == len(ids) - len(late)
    assert total.drift_usd == -Decimal("0.001") * len(drifted - late)
    assert total.cost_mismatches == len(drifted - late) and total.token_mismatches == 0
    assert first.exit_code == (1 if drifted - late else 0)
    assert sorted(asked) == sorted([*ids, *late, *late])  # every id once, the late ones twice more
    assert {item.row.generation_id for item in first.audit.rows if item.verdict == "unknown"} == late

    asked.clear()
    clock.shift_s = 7200  # the records have come
    second = run_audit(job)
    assert sorted(asked) == sorted(late)  # only what was left
    assert second.known_before == len(ids) - len(late) and second.asked == len(late)
    assert second.audit.total.unknown == 0 and second.audit.total.checked == len(ids)
    assert second.audit.total.drift_usd == -Decimal("0.001") * len(drifted)
    assert second.exit_code == 1

    asked.clear()
    third = run_audit(job)
    assert asked == [] and third.audit.total == second.audit.total  # nothing left to ask; the same figures


def test_sample_is_reproducible_and_resumes(
    answered: Callable[[SandboxConfig], tuple[Path, pl.DataFrame]], asked: list[str]
) -> None:
    """--sample 5 with one seed asks the same five rows every time (and, audited, not again); another seed
    draws others; a clean sandbox's records agree: drift 0, exit 0."""
    job, output = answered(SandboxConfig())
    first = run_audit(job, sample=5, seed=3)
    chosen = sorted(asked)
    assert len(chosen) == 5 and set(chosen) <= set(output["generation_id"].to_list())
    assert first.exit_code == 0 and first.audit.total.drift_usd == 0 and first.audit.total.matched == 5
    asked.clear()
    again = run_audit(job, sample=5, seed=3)
    assert asked == [] and sorted(item.row.generation_id for item in again.audit.rows) == chosen
    run_audit(job, sample=5, seed=4)
    assert sorted(asked) != chosen and len(asked) <= 5


def test_the_command_exit_codes_and_strict_json(
    answered: Callable[[SandboxConfig], tuple[Path, pl.DataFrame]], tmp_path: Path
) -> None:
    """`audit --json` is strict JSON naming the differing rows with their exact costs; exit 1 past the tolerance,
    0 within a tolerance that covers it; 2 for a bad tolerance or a job never run."""
    config = SandboxConfig(seed=1, generation_drift_share=0.5, generation_drift_usd=Decimal("0.001"))
    job, output = answered(config)
    drifted = [g for g in output["generation_id"].to_list() if config.drifts(g)]
    assert drifted
    result = invoke("audit", str(job), "--json")
    assert result.exit_code == 1, result.output

    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    report = json.loads(result.stdout, parse_constant=refuse)
    assert report["exceeds_tolerance"] is True
    assert Decimal(report["total"]["drift_usd"]) == -Decimal("0.001") * len(drifted)
    assert sorted(r["generation_id"] for r in report["differing_rows"]) == sorted(drifted)
    for entry in report["differing_rows"]:
        assert Decimal(entry["kept_cost_usd"]) - Decimal(entry["recorded_cost_usd"]) == Decimal("0.001")
    generous = invoke("audit", str(job), "--tolerance", "1")
    assert generous.exit_code == 0, generous.output
    assert "within the tolerance of $1" in generous.stdout
    assert invoke("audit", str(job), "--tolerance", "lots").exit_code == 2
    assert invoke("audit", str(job), "--sample", "0").exit_code == 2
    never_run = tmp_path / "other.yaml"
    never_run.write_text(job.read_text().replace("out/result.parquet", "elsewhere/r.parquet"))
    missing = invoke("audit", str(never_run))
    assert missing.exit_code == 2 and "no checkpoint yet" in missing.stderr


def test_an_audit_stopped_early_keeps_what_it_learned(
    answered: Callable[[SandboxConfig], tuple[Path, pl.DataFrame]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during the lookups stops the audit (exit 3) with what it found kept in the checkpoint; the next
    audit asks only the rest. A server gone is a stop too (exit 3), never a mismatch."""
    job, output = answered(SandboxConfig())
    ids = output["generation_id"].to_list()
    seen: list[str] = []
    interrupted_once: list[bool] = []
    original = Client.generation

    async def interrupted(self: Client, generation_id: str) -> dict[str, Any]:
        seen.append(generation_id)
        if len(seen) == 6 and not interrupted_once:
            interrupted_once.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # recorded by interrupts.caught(), told to the audit
        return await original(self, generation_id)

    monkeypatch.setattr(Client, "generation", interrupted)
    stopped = run_audit(job)
    assert stopped.exit_code == 3 and stopped.stopped is not None and "SIGINT" in stopped.stopped
    learned = stopped.audit.total.checked
    assert 6 <= learned < len(ids) and stopped.audit.total.unknown == len(ids) - learned
    seen.clear()
    rest = run_audit(job)
    assert len(seen) == len(ids) - learned and rest.exit_code == 0 and rest.audit.total.checked == len(ids)


def test_a_server_gone_stops_the_audit(
    answered: Callable[[SandboxConfig], tuple[Path, pl.DataFrame]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that stops answering mid-audit (unreachable): the audit stops, exit 3, saying why, with nothing
    called a mismatch; the rows it did not reach are left for the next audit."""
    job, _ = answered(SandboxConfig())
    calls: list[str] = []
    original = Client.generation

    async def going(self: Client, generation_id: str) -> dict[str, Any]:
        calls.append(generation_id)
        if len(calls) > 3:
            raise TransientError("cannot connect: refused", code="unreachable")
        return await original(self, generation_id)

    monkeypatch.setattr(Client, "generation", going)
    result = invoke("audit", str(job))
    assert result.exit_code == 3, result.output
    assert "the server stopped answering" in result.stderr
    assert "0 differ" in result.stdout


def test_answers_of_another_server_are_not_audited(write_spec: Callable[..., Path], asked: list[str]) -> None:
    """A --sandbox run's answers are the sandbox's: audited without --sandbox (OpenRouter's), none is asked and
    none counted; with --sandbox, the built-in sandbox answers for its earlier run's ids (exit 0)."""
    job = write_spec()
    assert invoke("run", str(job), "--sandbox").exit_code == 0
    real = run_audit(job)
    assert (real.rows_answered, real.asked, asked) == (0, 0, [])
    result = invoke("audit", str(job), "--sandbox")
    assert result.exit_code == 0, result.output
    assert len(asked) == 12 and "12 of 12 answered rows audited" in result.stdout


def test_a_later_sandbox_answers_for_an_earlier_ones_ids_the_same_way(
    sandbox_in_thread: Callable[[SandboxConfig], Sandbox],
) -> None:
    """The built-in sandbox ends with its command: a new one, given the same seed, makes the same generations
    drift and lag (decided by the seed and the id), from the answer's own time."""
    import time

    from batchrunner.errors import RequestRejected
    from batchrunner.sandbox.server import GenerationFacts

    facts = GenerationFacts("openai/gpt-4o-mini", 0.0001, 10, 5, 0, "stop", int(time.time()), None, None)
    ids = [facts.generation_id() for _ in range(40)]
    clock = Clock()
    config = SandboxConfig(
        seed=2, generation_drift_share=0.5, generation_lag_share=0.5, generation_lag_s=60, generation_clock=clock
    )
    later = sandbox_in_thread(config)

    async def look_up() -> dict[str, Decimal | None]:
        found: dict[str, Decimal | None] = {}
        async with Client(later.base_url, api_key=KEY) as client:
            for generation_id in ids:
                try:
                    found[generation_id] = KeptRecord.from_generation(await client.generation(generation_id)).cost_usd
                except RequestRejected as exc:
                    assert exc.status == 404
                    found[generation_id] = None
        return found

    now = asyncio.run(look_up())
    assert {g for g, cost in now.items() if cost is None} == {g for g in ids if config.lags(g)}
    clock.shift_s = 120
    after = asyncio.run(look_up())
    assert all(cost == Decimal("0.0001") + (Decimal("0.00001") if config.drifts(g) else 0) for g, cost in after.items())
    assert 0 < sum(config.drifts(g) for g in ids) < len(ids)
