"""What can be known about a job from its files alone: status, export, scores, the report.

These read the spec, the input and the checkpoint, and send nothing; they import nothing of
HTTP, so `batchrunner status` starts quickly. What asks the server (estimate, models,
endpoints, generations, cancelling batches) is in queries.py.

What reads the input or the answers (polars, dataset.py, output.py, the report) is imported by the function that
does: `status` of a job the last complete run left unchanged reads only the spec, the input's stat and the
checkpoint (rerun.unchanged), and imports no polars.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchrunner import interrupts, snapshots
from batchrunner.costs import ZERO_USD
from batchrunner.errors import Problem, RunHalted, SpecError
from batchrunner.preflight import check_files, warn_of_schema
from batchrunner.rerun import COMPLETE, unchanged
from batchrunner.spec import SANDBOX_SERVER, JobSpec
from batchrunner.store import Store

if TYPE_CHECKING:
    import polars as pl

    from batchrunner.dataset import Dataset
    from batchrunner.evaluation import Report

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
    from batchrunner.lock import job_lock, lock_path
    from batchrunner.output import remove_leftovers
    from batchrunner.preflight import prepare

    dataset = prepare(spec)
    checkpoint = existing_checkpoint(spec)
    server = spec.server(sandbox=sandbox)
    with job_lock(lock_path(checkpoint)):  # one writer of the job's output at a time: a run, or an export
        if removed := remove_leftovers(spec.output):
            log.info("removed what a killed run or export left beside %s: %s", spec.output, ", ".join(removed))
        return _export(spec, dataset, checkpoint, server)


def _export(spec: JobSpec, dataset: Dataset, checkpoint: Path, server: str) -> int:
    """export_job's work, under the job's lock."""
    from batchrunner.output import export, rows_in
    from batchrunner.request import RequestBuilder

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
    import polars as pl

    from batchrunner.dataset import ROW_INDEX
    from batchrunner.evaluation import build, enum_labels, gather
    from batchrunner.output import results, score_columns
    from batchrunner.preflight import prepare
    from batchrunner.request import RequestBuilder

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
    from batchrunner.dataset import ROW_INDEX
    from batchrunner.report_html import render

    figures, data, inputs = evaluation_data(spec, sandbox=sandbox)
    columns = [column for column in data.columns if column != ROW_INDEX]  # batchrunner's own is no one's to name
    if by is not None and by not in columns:
        raise SpecError(Problem("--by", f"{by!r} is not a column of the output; it has: {', '.join(columns)}"))
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
    checkpoint holds from other servers, cost so far and the last run, without sending anything.

    When the checkpoint's record says the last complete run left the job as it is (rerun.unchanged), the counts
    are that record's, and the input is not read; otherwise every row the record does not cover is read and
    rendered, and the checkpoint says which pairs are answered. Both say the same of the same files."""
    server = spec.server(sandbox=sandbox)
    checkpoint = spec.checkpoint_path()
    counts = _counted_unread(spec, server) or _counted(spec, server)
    others = elsewhere(counts.by_server, server)
    return {
        "job": spec.name,
        "checkpoint": str(checkpoint),
        "server": server or "openrouter",
        "models": counts.per_model,
        "answers_from_other_servers": {
            (name or "openrouter"): n for name, n in counts.by_server.items() if name != server
        },
        "elsewhere": None if others is None else {**dataclasses.asdict(others), "how": others.how()},
        "cost_usd": str(counts.spent),
        "cost_unknown_rows": counts.unpriced,  # when not 0, cost_usd is a lower bound
        "runs": len(counts.runs),
        "last_run": counts.runs[-1] if counts.runs else None,
        "batches": counts.batches,
        # complete evaluation runs kept for `report --baseline run:N` (snapshots.py)
        "recorded_runs": [
            {"run": snapshot.number, "finished_at": snapshot.finished.isoformat()}
            for snapshot in snapshots.listed(spec)
        ],
    }


@dataclass
class _Counts:
    """What `status` counts: pairs per model and state, and what the checkpoint holds besides."""

    per_model: dict[str, dict[str, int]]
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    batches: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    spent: Decimal = ZERO_USD
    unpriced: int = 0
    by_server: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, spec: JobSpec) -> _Counts:
        return cls({model: {"ok": 0, "failed": 0, "pending": 0} for model in spec.models})

    def answered(self, answered: dict[str, int]) -> None:
        for model, count in answered.items():
            if model in self.per_model:
                self.per_model[model]["ok"] += count

    def held(self, store: Store, server: str) -> None:
        """What the checkpoint holds besides the pairs: runs, batches, cost, answers by server."""
        self.runs = store.runs()
        self.batches = store.all_batches()
        self.spent = store.spent_usd(server)
        self.unpriced = store.unpriced(server)
        self.by_server = store.answers_by_server()


def _counted_unread(spec: JobSpec, server: str) -> _Counts | None:
    """`status`'s counts without reading the input (nor importing polars), when the checkpoint's record of the
    last complete run says the job is as that run left it (rerun.unchanged: every pair answered, none failed or
    pending); None when it cannot be sure, and `_counted` reads the input. What `prepare` would say of the job
    is said here as well: it checks the files and warns of the schema as `prepare` does; the input's own checks
    passed for the run that left the record, on this input and spec, unless a Python metric (imported from
    elsewhere) is involved, which goes the long way. A checkpoint `Store.open` refuses goes the long way too,
    so that its problem is told after the input's, as there."""
    checkpoint = spec.checkpoint_path()
    evaluate = spec.evaluate
    if not checkpoint.exists() or (evaluate is not None and any(r.kind == "python" for r in evaluate.rules())):
        return None
    if unchanged(Store.peek(checkpoint, COMPLETE), spec, server) is None:
        return None
    check_files(spec)
    warn_of_schema(spec)
    try:
        store = Store.open(checkpoint, job=spec.name)
    except SpecError:
        return None
    with store:
        if (known := unchanged(store.meta(COMPLETE), spec, server)) is None:  # a run began since the peek
            return None
        counts = _Counts.of(spec)
        counts.answered(known.answered)
        counts.held(store, server)
    return counts


def _counted(spec: JobSpec, server: str) -> _Counts:
    """`status`'s counts, reading every input row the checkpoint's record does not cover."""
    from batchrunner.pending import pending
    from batchrunner.preflight import prepare
    from batchrunner.request import RequestBuilder
    from batchrunner.rerun import job_state, last_run

    dataset = prepare(spec)
    requests = RequestBuilder(spec, server=server)
    checkpoint = spec.checkpoint_path()
    counts = _Counts.of(spec)
    store = Store.open(checkpoint, job=spec.name) if checkpoint.exists() else None
    try:
        job = job_state(spec, requests, dataset)
        known = last_run(store, spec, job, dataset) if store is not None else None
        start = 0 if known is None else known.rows  # rows the last complete run answered, as they still are
        counts.answered(known.answered if known is not None else {})
        settled = job.unread if job is not None else None  # a killed run's answers by position, as a run takes them
        for batch in pending(dataset, requests, store, batch_size=20_000, start=start, settled_state=settled):
            counts.answered(batch.answered)
            for todo in batch.todo:
                state = "failed" if todo.earlier_status == "failed" else "pending"
                counts.per_model[todo.request.requested_model][state] += 1
        if store is not None:
            counts.held(store, requests.server)
    finally:
        if store is not None:
            store.close()
    return counts
