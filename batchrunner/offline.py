"""What can be known about a job from its files alone: status, export, scores, the report.

These read the spec, the input and the checkpoint, and send nothing; they import nothing of
HTTP, so `batchrunner status` starts quickly. What asks the server (estimate, models,
endpoints, generations, cancelling batches) is in queries.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from batchrunner.costs import ZERO_USD
from batchrunner.dataset import ROW_INDEX
from batchrunner.errors import Problem, SpecError
from batchrunner.output import export, results, score_columns
from batchrunner.pending import pending
from batchrunner.preflight import prepare
from batchrunner.report import Report, build, gather
from batchrunner.report_html import render
from batchrunner.request import RequestBuilder
from batchrunner.rerun import job_state, last_run
from batchrunner.spec import JobSpec
from batchrunner.store import Store


def existing_checkpoint(spec: JobSpec) -> Path:
    """The job's checkpoint, which commands that only read it need; SpecError when there is none yet."""
    checkpoint = spec.checkpoint_path()
    if not checkpoint.exists():
        raise SpecError(Problem("checkpoint", f"{checkpoint}: no checkpoint yet; run the job first"))
    return checkpoint


def export_job(spec: JobSpec, *, sandbox: bool = False) -> int:
    """Rewrite the output from the checkpoint (the sandbox's answers with `sandbox`), without sending anything."""
    dataset = prepare(spec)
    checkpoint = existing_checkpoint(spec)
    store = Store.open(checkpoint, job=spec.name)
    try:
        return export(dataset, RequestBuilder(spec, server=spec.server(sandbox=sandbox)), store, spec.output)
    finally:
        store.close()


def evaluation(spec: JobSpec, *, sandbox: bool = False) -> Report:
    """The evaluation report's figures, from the checkpoint alone (the sandbox's answers with `sandbox`)."""
    return evaluation_data(spec, sandbox=sandbox)[0]


def evaluation_data(spec: JobSpec, *, sandbox: bool = False) -> tuple[Report, pl.DataFrame]:
    """The report's figures and the rows they come from (the output, with each row's input position)."""
    dataset = prepare(spec)
    checkpoint = existing_checkpoint(spec)
    requests = RequestBuilder(spec, server=spec.server(sandbox=sandbox))
    scores = [name for name, dtype in score_columns(spec).items() if dtype == pl.Float64()]
    with Store.open(checkpoint, job=spec.name) as store:
        data = gather(results(dataset, requests, store, row_index=True))
    return build(spec.name, data, id_column=ROW_INDEX, score_column=scores[0] if scores else None), data


def report_html(spec: JobSpec, *, sandbox: bool = False, by: str | None = None) -> str:
    """The self-contained HTML report (report_html.py) of the job's checkpoint."""
    figures, data = evaluation_data(spec, sandbox=sandbox)
    if by is not None and by not in data.columns:
        raise SpecError(Problem("--by", f"{by!r} is not an input column; the input has: {', '.join(data.columns)}"))
    evaluate = spec.evaluate
    return render(
        figures,
        data,
        id_column=spec.id_column or ROW_INDEX,
        reference=evaluate.reference if evaluate else None,
        answer_column=spec.answer_column(),
        by=by,
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
    return {
        "job": spec.name,
        "checkpoint": str(checkpoint),
        "server": requests.server or "openrouter",
        "models": per_model,
        "answers_from_other_servers": {
            (server or "openrouter"): n for server, n in by_server.items() if server != requests.server
        },
        "cost_usd": str(spent),
        "cost_unknown_rows": unpriced,  # when not 0, cost_usd is a lower bound
        "runs": len(runs),
        "last_run": runs[-1] if runs else None,
        "batches": batches,
    }
