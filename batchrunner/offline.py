"""What can be known about a job from its files alone: status, export, scores, the report.

These read the spec, the input and the checkpoint, and send nothing; they import nothing of
HTTP, so `batchrunner status` starts quickly. What asks the server (estimate, models,
endpoints, generations, cancelling batches) is in queries.py.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from batchrunner import interrupts, snapshots
from batchrunner.costs import ZERO_USD
from batchrunner.dataset import ROW_INDEX, Dataset
from batchrunner.errors import Problem, RunHalted, SpecError
from batchrunner.evaluation import Report, build, enum_labels, gather
from batchrunner.lock import job_lock, lock_path
from batchrunner.output import export, remove_leftovers, results, rows_in, score_columns
from batchrunner.pending import pending
from batchrunner.preflight import prepare
from batchrunner.report_html import render
from batchrunner.request import RequestBuilder
from batchrunner.rerun import job_state, last_run
from batchrunner.spec import SANDBOX_SERVER, JobSpec
from batchrunner.store import Store

log = logging.getLogger("batchrunner")


def existing_checkpoint(spec: JobSpec) -> Path:
    """The job's checkpoint, which commands that only read it need; SpecError when there is none yet."""
    checkpoint = spec.checkpoint_path()
    if not checkpoint.exists():
        raise SpecError(Problem("checkpoint", f"{checkpoint}: no checkpoint yet; run the job first"))
    return checkpoint


@dataclass(frozen=True)
class Elsewhere:
    """The checkpoint's answers that are another server's than the one asked about (the sandbox's, when a real
    export or status follows a --sandbox run), and how to ask for them."""

    answers: int
    sentence: str  # "the checkpoint's 12 answers are the sandbox's (simulated)"
    option: str | None  # the option that shows them: "--sandbox"; "" to drop it (OpenRouter's); None: another URL
    url: str | None = None  # with option None: the server whose answers they are

    def how(self) -> str:
        """How to see them, after "see them" or "export them"."""
        if self.option:
            return f"with {self.option}"
        return "without --sandbox" if self.option == "" else f"with api.base_url: {self.url} in the spec"


def elsewhere(by_server: dict[str, int], server: str) -> Elsewhere | None:
    """The answers in the checkpoint from servers other than `server` ("" is OpenRouter), if it has any."""
    others = {name: count for name, count in by_server.items() if name != server and count}
    if not others:
        return None
    total = sum(others.values())
    if list(others) == [SANDBOX_SERVER]:
        return Elsewhere(total, f"the checkpoint's {total} answers are the sandbox's (simulated)", "--sandbox")
    named = " and ".join(f"{name or 'openrouter'} ({count})" for name, count in sorted(others.items()))
    sentence = f"the checkpoint's {total} answers are from {named}"
    if SANDBOX_SERVER in others:
        return Elsewhere(total, sentence, "--sandbox")
    if "" in others:
        return Elsewhere(total, sentence, "" if server == SANDBOX_SERVER else None, "https://openrouter.ai/api/v1")
    return Elsewhere(total, sentence, None, sorted(others)[0])


def export_job(spec: JobSpec, *, sandbox: bool = False) -> int:
    """Rewrite the output from the checkpoint (the sandbox's answers with `sandbox`), without sending anything.

    It holds the job's lock (RunHalted while a run of the job is going: that run writes the output itself), and
    first removes what a killed run or export left beside the output. An export with no answers for this server
    never replaces an output that holds rows (after a --sandbox run, the sandbox's answers): SpecError naming the
    file and whose the checkpoint's answers are."""
    dataset = prepare(spec)
    checkpoint = existing_checkpoint(spec)
    server = spec.server(sandbox=sandbox)
    with job_lock(lock_path(checkpoint)):  # one writer of the job's output at a time: a run, or an export
        if removed := remove_leftovers(spec.output):
            log.info("removed what a killed run or export left beside %s: %s", spec.output, ", ".join(removed))
        return _export(spec, dataset, checkpoint, server)


def _export(spec: JobSpec, dataset: Dataset, checkpoint: Path, server: str) -> int:
    """export_job's work, under the job's lock."""
    store = Store.open(checkpoint, job=spec.name)
    try:
        others = elsewhere(store.answers_by_server(), server)
        hint = f"{others.sentence}: export them {others.how()}" if others is not None else None

        def keep_answers(rows: int) -> None:
            if (stop := interrupts.received()) is not None:  # Ctrl-C or SIGTERM came while the rows were read
                raise RunHalted(
                    f"{stop.name} before {spec.output} was rewritten: it is as it was; rerun the same command to write it"
                )
            held = rows_in(spec.output) if rows == 0 else 0
            if held != 0:
                what = "rows" if held is None else f"{held} rows"
                raise SpecError(
                    Problem(
                        spec.locate("output"),
                        f"{spec.output} holds {what} and this export has no answers from {server or 'openrouter'}, "
                        f"so it was left as it is; {hint or 'write elsewhere with --output'}",
                    )
                )

        written = export(dataset, RequestBuilder(spec, server=server), store, spec.output, check=keep_answers)
    finally:
        store.close()
    if written == 0 and hint is not None:
        log.warning("no answers from %s to export: %s", server or "openrouter", hint)
    return written


def evaluation(spec: JobSpec, *, sandbox: bool = False) -> Report:
    """The evaluation report's figures, from the checkpoint alone (the sandbox's answers with `sandbox`)."""
    return evaluation_data(spec, sandbox=sandbox)[0]


def evaluation_data(spec: JobSpec, *, sandbox: bool = False) -> tuple[Report, pl.DataFrame, list[str]]:
    """The report's figures, the rows they come from (the output, with each row's input position) and the input's
    own columns (what the models were shown, for the row explorer)."""
    dataset = prepare(spec)
    checkpoint = existing_checkpoint(spec)
    requests = RequestBuilder(spec, server=spec.server(sandbox=sandbox))
    scores = [name for name, dtype in score_columns(spec).items() if dtype == pl.Float64()]
    with Store.open(checkpoint, job=spec.name) as store:
        data = gather(results(dataset, requests, store, row_index=True))
    evaluate = spec.evaluate
    figures = build(
        spec.name,
        data,
        id_column=ROW_INDEX,
        score_column=scores[0] if scores else None,
        reference=evaluate.reference if evaluate else None,
        answer_column=spec.answer_column() if evaluate else None,
        labels=enum_labels(spec.response_format, evaluate.field if evaluate else None),
    )
    return figures, data, dataset.columns


def report_html(spec: JobSpec, *, sandbox: bool = False, by: str | None = None) -> str:
    """The self-contained HTML report (report_html.py) of the job's checkpoint."""
    figures, data, inputs = evaluation_data(spec, sandbox=sandbox)
    if by is not None and by not in data.columns:
        raise SpecError(Problem("--by", f"{by!r} is not an input column; the input has: {', '.join(data.columns)}"))
    evaluate = spec.evaluate
    shown = {spec.id_column, evaluate.reference if evaluate else None}  # already their own columns
    return render(
        figures,
        data,
        id_column=spec.id_column or ROW_INDEX,
        reference=evaluate.reference if evaluate else None,
        answer_column=spec.answer_column(),
        by=by,
        inputs=[column for column in inputs if column not in shown],
    )


def job_status(spec: JobSpec, *, sandbox: bool = False) -> dict[str, Any]:
    """Done, failed and pending per model for the job's server (the sandbox with `sandbox`), what the
    checkpoint holds from other servers, cost so far and the last run, without sending anything."""
    dataset = prepare(spec)
    requests = RequestBuilder(spec, server=spec.server(sandbox=sandbox))
    checkpoint = spec.checkpoint_path()
    per_model = {model: {"ok": 0, "failed": 0, "pending": 0} for model in spec.models}
    runs: list[dict[str, Any]] = []
    batches: list[dict[str, Any]] = []
    spent = ZERO_USD
    unpriced = 0
    by_server: dict[str, int] = {}
    store = Store.open(checkpoint, job=spec.name) if checkpoint.exists() else None
    try:
        known = last_run(store, spec, job_state(spec, requests, dataset), dataset) if store is not None else None
        start = 0 if known is None else known.rows  # rows the last complete run answered, as they still are
        for model, count in (known.answered if known is not None else {}).items():
            if model in per_model:
                per_model[model]["ok"] += count
        for batch in pending(dataset, requests, store, batch_size=20_000, start=start):
            for model, count in batch.answered.items():
                per_model[model]["ok"] += count
            for todo in batch.todo:
                state = "failed" if todo.earlier_status == "failed" else "pending"
                per_model[todo.request.requested_model][state] += 1
        if store is not None:
            runs = store.runs()
            batches = store.all_batches()
            spent = store.spent_usd(requests.server)
            unpriced = store.unpriced(requests.server)
            by_server = store.answers_by_server()
    finally:
        if store is not None:
            store.close()
    others = elsewhere(by_server, requests.server)
    return {
        "job": spec.name,
        "checkpoint": str(checkpoint),
        "server": requests.server or "openrouter",
        "models": per_model,
        "answers_from_other_servers": {
            (server or "openrouter"): n for server, n in by_server.items() if server != requests.server
        },
        "elsewhere": None if others is None else {**dataclasses.asdict(others), "how": others.how()},
        "cost_usd": str(spent),
        "cost_unknown_rows": unpriced,  # when not 0, cost_usd is a lower bound
        "runs": len(runs),
        "last_run": runs[-1] if runs else None,
        "batches": batches,
        # complete evaluation runs kept for `report --baseline run:N` (snapshots.py)
        "recorded_runs": [
            {"run": snapshot.number, "finished_at": snapshot.finished.isoformat()}
            for snapshot in snapshots.listed(spec)
        ],
    }
