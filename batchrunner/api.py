"""The Python API: what the command line does, as functions that return values.

    import batchrunner
    result = batchrunner.run("jobs/quickstart.yaml", sandbox=True, limit=20)
    result.frame            # the output, as a polars DataFrame
    result.summary.cost_usd # exact, in Decimal
    result.stop             # None, or why the run stopped early (halt.Stop: a reason and a sentence)

A job is a spec file, a dict with the same keys (its relative paths resolve against the current
directory), or a JobSpec. The keywords are the command line's options.

One rule for outcomes, the command line's exit codes as values: a job that cannot start (exit 2:
a bad spec, input or option) raises SpecError, from the one error tree (errors.py); a run that
stopped early for a reason to act on or wait out (exit 3: budget, credits, the daily cap, an
interrupt, the server gone, another run holding the job) returns, its `stop` saying why; failed rows
are rows (exit 1 when there are any). `result.exit_code` is the code the command line exits with.

`arun` is `run` as a coroutine, for code that already has an event loop (a notebook: Jupyter runs
one, where asyncio.run fails; an async pipeline). `run` works there too, and off the main thread:
it then runs the job on a thread of its own. Ctrl-C stops a run cleanly as on the command line (on
the main thread, where Python lets a handler be installed); a second one gives up on the requests
in flight and returns, rather than ending the process as the command line does.

The command line is a thin layer over these functions (cli.py): it prints what they return.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from batchrunner.errors import EXIT_OK, EXIT_SOME_FAILED, EXIT_STOPPED, Problem, RunHalted, SpecError

if TYPE_CHECKING:
    import polars as pl

    from batchrunner.compare import Comparison
    from batchrunner.evaluation import Report
    from batchrunner.halt import Stop
    from batchrunner.records import Summary
    from batchrunner.runner import RunReport
    from batchrunner.spec import JobSpec
    from batchrunner.urls import Location

    JobLike = str | os.PathLike[str] | Mapping[str, Any] | JobSpec  # a spec file, its keys as a dict, or a JobSpec

T = TypeVar("T")


@dataclass(frozen=True)
class RunResult:
    """How one run ended: the output, the summary, and why it stopped early if it did."""

    spec: JobSpec
    output_path: Location  # a local file or an s3:// object
    output_rows: int | None  # None: the output could not be written (the checkpoint has every answer)
    report: RunReport  # the run's own account (runner.py); what follows reads it
    unsaved: int = 0  # answers the checkpoint could not take (a full disk): in its spill file for the next run
    sandbox_url: str | None = None

    @property
    def summary(self) -> Summary:
        """This run's answers: counts, tokens, exact cost, latency, per requested model (`.by_model`)."""
        return self.report.summary

    @property
    def stop(self) -> Stop | None:
        """Why the run stopped early (or deferred rows: free models' daily cap); None when it did not."""
        return self.report.stop

    @property
    def pending(self) -> int:
        """Pairs still to answer: a rerun continues with them."""
        return self.report.pending

    @property
    def resumed(self) -> int:
        """Pairs earlier runs had answered, not sent again."""
        return self.report.resumed

    @property
    def wall_s(self) -> float:
        return self.report.wall_s

    @property
    def grading(self) -> Summary | None:
        """What grading the answers with a judge cost, apart from the answers' own cost."""
        return self.report.judging

    @property
    def batch_saved_usd(self) -> Decimal | None:
        """Batch mode: the discount against the same answers at live prices."""
        return self.report.batch_saved_usd

    @property
    def concurrency(self) -> tuple[int, int] | None:
        """concurrency: auto, the limit it ended at and the most it reached."""
        return self.report.concurrency

    def to_json(self) -> dict[str, Any]:
        """The summary as `run --json` prints it and the summary file beside the output holds it."""
        from batchrunner.runner import summary_json

        written = None if self.output_rows is None else str(self.output_path)
        return {"job": self.spec.name, "output": written, "output_rows": self.output_rows, **summary_json(self.report)}

    @property
    def complete(self) -> bool:
        """Every pair answered (or failed), the output written: nothing left for a rerun."""
        return self.exit_code in (EXIT_OK, EXIT_SOME_FAILED)

    @property
    def exit_code(self) -> int:
        """The command line's exit code for this run: 3 stopped early (or its output or checkpoint not
        written), else 1 if some rows failed, else 0."""
        if self.stop is not None or self.output_rows is None or self.unsaved:
            return EXIT_STOPPED
        return EXIT_SOME_FAILED if self.summary.failed else EXIT_OK

    @functools.cached_property
    def frame(self) -> pl.DataFrame | None:
        """The output file, read back (Parquet as written; CSV and JSONL with polars' type inference, a CSV's over
        every row); None when it could not be written."""
        if self.output_rows is None:
            return None
        import polars as pl

        from batchrunner.dataset import source

        suffix = self.output_path.suffix.lower()
        where, options = source(self.output_path)  # an s3:// output read with the spec's storage options
        if suffix == ".parquet":
            return pl.read_parquet(where, storage_options=options)
        if suffix == ".csv":  # every row's types read, not the first 100's: a column may turn to text at row 101
            return pl.read_csv(where, infer_schema_length=None, storage_options=options)
        return pl.read_ndjson(where, storage_options=options)


def job_spec(
    job: JobLike,
    *,
    input: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    concurrency: int | str | None = None,
    mode: str | None = None,
    workers: int | None = None,
    executor: str | None = None,
    ray_address: str | None = None,
    sending: bool = True,
) -> JobSpec:
    """A JobSpec from a spec file, a dict or a JobSpec, with the command line's overrides applied; SpecError
    naming every problem."""
    from batchrunner.spec import JobSpec, load_spec, spec_from_mapping, with_overrides

    overrides = {
        key: str(value) if isinstance(value, os.PathLike) else value
        for key, value in {
            "input": input,
            "output": output,
            "concurrency": concurrency,
            "mode": mode,
            "workers": workers,
            "executor": executor,
            "ray_address": ray_address,
        }.items()
        if value is not None
    }
    if isinstance(job, JobSpec):
        return with_overrides(job, overrides) if overrides else job
    if isinstance(job, Mapping):
        return spec_from_mapping(job, overrides=overrides, sending=sending)
    if isinstance(job, str | os.PathLike):
        return load_spec(Path(job), overrides=overrides, sending=sending)
    raise SpecError(Problem("job", f"a job is a spec file's path, a dict or a JobSpec, not {type(job).__name__}"))


async def arun(
    job: JobLike,
    *,
    sandbox: bool = False,
    limit: int | None = None,
    max_cost: Decimal | float | str | None = None,
    fresh: bool = False,
    wait: bool = True,
    input: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    concurrency: int | str | None = None,
    mode: str | None = None,
    workers: int | None = None,
    executor: str | None = None,
    ray_address: str | None = None,
    where: str | None = None,
    ids: Iterable[str] | None = None,
    retry_failed: bool = False,
    progress: bool = False,
    hard_exit: bool = False,
    on_start: Callable[[str | None], None] | None = None,
) -> RunResult:
    """Run a job (see the module's docstring); `progress` shows the progress bar (on a terminal) or log lines.

    `max_cost` caps this run's spend in USD (the command line's --max-cost); `fresh` deletes every stored answer
    first; `wait=False` is batch mode's --no-wait; `on_start` is told the built-in sandbox's URL once it is up
    (None for a real server); `hard_exit` makes a second Ctrl-C end the process, as on the command line.
    A slice of the job: `where` (a SQL condition over the input columns), `ids` (the rows with these ids),
    `retry_failed` (only the pairs whose last attempt failed); such a run is never the complete run a later one
    may skip reading after."""
    from batchrunner.runner import RunSettings, run_job
    from batchrunner.sandbox import SandboxConfig

    spec = job_spec(
        job,
        input=input,
        output=output,
        concurrency=concurrency,
        mode=mode,
        workers=workers,
        executor=executor,
        ray_address=ray_address,
    )
    settings = RunSettings(
        limit=_rows(limit),
        sandbox=SandboxConfig() if sandbox else None,
        progress_factory=_progress() if progress else None,
        fresh=fresh,
        max_cost_usd=_usd(max_cost),
        wait=wait,
        hard_exit=hard_exit,
        on_start=on_start,
        where=where,
        ids=None if ids is None else frozenset(str(item) for item in ids),
        retry_failed=retry_failed,
    )
    try:
        outcome = await run_job(spec, settings)
    except RunHalted as halted:  # it could not start, for a passing reason: another run holds the job, no network
        return RunResult(spec, spec.output, None, _not_started(str(halted)))
    return RunResult(
        spec, outcome.output_path, outcome.output_rows, outcome.report, outcome.unsaved, outcome.sandbox_url
    )


def run(job: JobLike, **options: Any) -> RunResult:
    """`arun`, waited for: from plain code, from inside a running event loop, and off the main thread."""
    return _blocking(arun(job, **options))


async def aestimate(job: JobLike, *, limit: int | None = None, sandbox: bool = False) -> dict[str, Any]:
    """What the rows still to do should cost and take, sending no completion (`batchrunner estimate --json`)."""
    from batchrunner.queries import estimate_job
    from batchrunner.sandbox import SandboxConfig

    return await estimate_job(job_spec(job), limit=_rows(limit), sandbox=SandboxConfig() if sandbox else None)


def estimate(job: JobLike, *, limit: int | None = None, sandbox: bool = False) -> dict[str, Any]:
    """`aestimate`, waited for."""
    return _blocking(aestimate(job, limit=limit, sandbox=sandbox))


def status(job: JobLike, *, sandbox: bool = False) -> dict[str, Any]:
    """What the job's checkpoint holds (`batchrunner status --json`); reads files only, sends nothing."""
    from batchrunner.offline import job_status

    return job_status(job_spec(job, sending=False), sandbox=sandbox)


def report(job: JobLike, *, sandbox: bool = False) -> Report:
    """The evaluation report of an `evaluate:` job from its checkpoint: per model, scores with intervals, cost and
    latency, and paired comparisons (`batchrunner report`); sends nothing."""
    from batchrunner.offline import evaluation

    return evaluation(job_spec(job, sending=False), sandbox=sandbox)


def compare(job: JobLike, baseline: str, *, sandbox: bool = False) -> Comparison:
    """The job's answers now against a baseline (`batchrunner report --baseline`): `run:N` or a date (runs this
    job recorded), another job's spec (.yaml), or an output file an earlier run wrote. Sends nothing."""
    from batchrunner import snapshots
    from batchrunner.compare import compare as compared
    from batchrunner.dataset import ROW_INDEX
    from batchrunner.offline import evaluation_data

    spec = job_spec(job, sending=False)
    figures, now, _ = evaluation_data(spec, sandbox=sandbox)
    if baseline.endswith((".yaml", ".yml")):
        other = job_spec(baseline, sending=False)
        label, before = f"{other.name} ({baseline})", evaluation_data(other, sandbox=sandbox)[1]
    else:
        label, before = snapshots.baseline(spec, baseline)
    if figures.score_column is not None and figures.score_column not in before.columns:
        raise SpecError(
            Problem(
                "--baseline",
                f"{label}: has no {figures.score_column} column to compare (a job without this evaluate: metric); "
                "give a run of this evaluation",
            )
        )
    id_column = spec.id_column if spec.id_column and spec.id_column in before.columns else ROW_INDEX
    return compared(
        now, before, id_column=id_column, score_column=figures.score_column, after_label="now", before_label=label
    )


# -- internals ------------------------------------------------------------------------------------


def _not_started(message: str) -> RunReport:
    from batchrunner.halt import Stop, StopReason
    from batchrunner.records import Summary
    from batchrunner.runner import RunReport

    return RunReport(Summary(), 0, 0.0, Stop(StopReason.NOT_STARTED, message))


def _rows(limit: int | None) -> int | None:
    """`limit` as the command line's --limit takes it: a whole number of rows, at least one."""
    if limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1):
        return limit
    raise SpecError(Problem("limit", f"{limit!r} is not a number of rows; give a whole number, at least 1"))


def _usd(amount: Decimal | float | str | None) -> Decimal | None:
    """A money amount as the exact Decimal it was written as (a float through its shortest repr)."""
    if amount is None:
        return None
    from batchrunner.costs import to_decimal
    from batchrunner.spec import MAX_BUDGET_USD

    value = to_decimal(amount)
    if value is None or not 0 < value <= MAX_BUDGET_USD:  # budget_usd's bounds: 0 spends nothing, 1e300 is no amount
        raise SpecError(
            Problem(
                "max_cost",
                f"{amount!r} is not an amount of USD; give a number above 0, such as 2.50, at most {MAX_BUDGET_USD:,}",
            )
        )
    return value


def _progress() -> Any:
    from batchrunner.progress import Progress

    return Progress


def _blocking(work: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end from synchronous code: with asyncio.run when no event loop runs in this
    thread, else (a notebook, an async application) on a thread of its own, whose loop it gets."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batchrunner") as pool:
        return pool.submit(asyncio.run, work).result()
