"""The command line: arguments in, exit codes out. Nothing else lives here.

Exit codes: 0 every row answered; 1 finished but some rows failed; 2 invalid spec, input or
arguments (nothing was sent; for `generation`, an id the server does not know); 3 stopped early for a reason to act on or wait out
(credits, budget, key, interrupt), and rerunning continues.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import functools
import gc
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from batchrunner import interrupts, jsontext, logs
from batchrunner.costs import format_cost, format_usd
from batchrunner.errors import (
    EXIT_INVALID,
    EXIT_SOME_FAILED,
    EXIT_STOPPED,
    OutputError,
    Problem,
    RunHalted,
    SpecError,
)
from batchrunner.files import write_text_atomically
from batchrunner.sandbox.faults import FAULT_KINDS

if TYPE_CHECKING:
    from batchrunner.api import RunResult
    from batchrunner.evaluation import Report
    from batchrunner.spec import JobSpec
    from batchrunner.urls import Location

# Each command imports what it needs when it runs: `--help` and `status` start in a fraction of the
# time importing everything (aiohttp, polars, jsonschema) would take. See bench/startup.py.


def say(text: str, *, err: bool = False) -> None:
    """Print one line; what came from outside in it (server errors, model names, cells) cannot
    drive the terminal (see logs.printable)."""
    click.echo(logs.printable(text), err=err)


@contextlib.contextmanager
def _exit_codes(*, job: bool = True) -> Iterator[None]:
    """Turn the errors a user acts on into a message and an exit code, never a traceback.

    `job`: the command runs or reads a job, so a refusal is "the job was not started". A command without one
    (models, generation, init) says only what was wrong: it has no job to start, and it may have asked the
    server already (an unknown generation id is known only once the server said so)."""
    try:
        yield
    except SpecError as error:
        if job:
            say("error: the job was not started (nothing was sent):", err=True)
        for problem in error.problems:
            say(f"  {problem}" if job else f"error: {problem}", err=True)
        sys.exit(EXIT_INVALID)
    except RunHalted as error:
        say(f"stopped before sending anything: {error}" if job else f"error: {error}", err=True)
        sys.exit(EXIT_STOPPED)
    except OutputError as error:
        say(f"error: {error}; the checkpoint keeps every answer", err=True)
        sys.exit(EXIT_STOPPED)


def _write_file(path: Path, text: str, option: str) -> None:
    """A file a command was asked to write (--output, --junit): a folder it cannot be written in is a SpecError
    naming the option (exit 2), never a traceback."""
    try:
        write_text_atomically(path, text)
    except OSError as error:
        raise SpecError(
            Problem(option, f"cannot write {path} ({error.strerror or error}); choose a folder you can write to")
        ) from None


def _stoppable(command: Callable[..., None]) -> Callable[..., None]:
    """A command that writes files: Ctrl-C and SIGTERM are a stop with exit 3 and a sentence, never a kill (143)
    or a traceback, from its first line to its exit (interrupts.py)."""

    @functools.wraps(command)
    def stoppable(*args: Any, **kwargs: Any) -> None:
        with interrupts.caught() as caught:
            command(*args, **kwargs)  # a command that exits says why itself; one that returns is told here
            if caught.received is not None:
                say(f"stopped early: {caught.received.name}; rerun the same command to continue", err=True)
                sys.exit(EXIT_STOPPED)

    return stoppable


def _stopped_after_writing(path: Location, rows: int) -> None:
    """Exit 3 when Ctrl-C or SIGTERM came while `path` was being written, which was finished all the same."""
    if (stop := interrupts.received()) is not None:
        say(
            f"stopped early: {stop.name} while {path} was being written (it was written in full: {rows} rows)", err=True
        )
        sys.exit(EXIT_STOPPED)


def echo_json(value: object, **options: Any) -> None:
    """Print `value` as strict JSON (jsontext: no Infinity or NaN, which other programs cannot parse); JSON
    escapes control characters itself, so outside text in it cannot drive the terminal."""
    click.echo(jsontext.dumps(value, indent=1, **options))


class _Option(click.Option):
    """An option whose old spellings (`aliases`) still work but are not shown in --help: one spelling per
    concept across every command (issue #26: --json for JSON, --output for a path), and the scripts written
    against the old one keep working for a release."""

    def __init__(self, param_decls: Sequence[str], *, aliases: Sequence[str] = (), **attrs: Any) -> None:
        super().__init__([*param_decls, *aliases], **attrs)
        self.aliases = tuple(aliases)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown = self.opts
        self.opts = [name for name in shown if name not in self.aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def _output_option(help_text: str, *, default: Path | None = None) -> Callable[[Callable[..., Any]], Any]:
    """`--output PATH` (as `out_path`), with the spelling before issue #26, `--out`, kept hidden for a release."""
    return click.option(
        "--output",
        "out_path",
        cls=_Option,
        aliases=["--out"],
        type=click.Path(path_type=Path),
        default=default,
        show_default=default is not None,
        help=help_text,
    )


def _json_or(fmt: str | None, as_json: bool) -> bool:
    """Whether JSON was asked, by --json or by the hidden old `--format json`; the two disagreeing is a usage error."""
    if fmt is not None and as_json and fmt != "json":
        raise click.UsageError(f"--json and --format {fmt} ask for different outputs; give only --json")
    return as_json or fmt == "json"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="batchrunner")
def main() -> None:
    """Run a dataset of prompts through LLMs on OpenRouter as a batch job."""


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option(
    "--input", "input_path", type=click.Path(path_type=Path), help="Input file instead of the spec's `input`."
)
@click.option(
    "--output", "output_path", type=click.Path(path_type=Path), help="Output file instead of the spec's `output`."
)
@click.option("--limit", type=click.IntRange(min=1), help="Run only the first N rows.")
@click.option(
    "--concurrency",
    callback=lambda _context, _param, value: _concurrency(value),
    help="Most requests in flight (1 to 4096), or auto to find it.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1, max=256),
    help="Processes answering pairs (overrides workers): for a server faster than one core can keep busy.",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    help="Where the workers run: processes of this machine, or Ray actors of a cluster (overrides executor).",
)
@click.option("--ray-address", help="With --executor ray: the Ray cluster to join, e.g. auto (overrides ray_address).")
@click.option(
    "--sandbox", is_flag=True, help="Run against the built-in simulated OpenRouter: no key, no network, no cost."
)
@click.option(
    "--max-cost",
    "max_cost_usd",
    type=click.FloatRange(min=0, min_open=True),
    help="Spend at most USD in this run (overrides budget_usd).",
)
@click.option(
    "--mode", type=click.Choice(["live", "batch"]), help="Live requests, or OpenRouter's Batch API (about half price)."
)
@click.option("--no-wait", is_flag=True, help="Batch mode: submit and exit; the next run collects the answers.")
@click.option("--fresh", is_flag=True, help="Forget the checkpoint and start over (asks first).")
@click.option("--retry-failed", is_flag=True, help="Ask again only the rows that failed.")
@click.option("--where", help="Only the input rows this SQL condition selects, e.g. \"tier = 'pro'\".")
@click.option(
    "--ids", "ids_file", type=click.Path(path_type=Path), help="Only the rows whose ids this file lists, one a line."
)
@click.option("--yes", is_flag=True, help="Do not ask before --fresh deletes stored answers.")
@click.option("-v", "--verbose", is_flag=True, help="Log every retry and fallback.")
@click.option("--log-json", is_flag=True, help="Log one JSON object per event on stderr, for log collectors.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the exact requests of the first rows still to do (--limit, default 3), send nothing.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary (or, with --dry-run, the requests) as JSON.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), hidden=True)  # before --json: kept a release
@_stoppable
def run(
    job: Path,
    input_path: Path | None,
    output_path: Path | None,
    limit: int | None,
    concurrency: int | str | None,
    workers: int | None,
    executor: str | None,
    ray_address: str | None,
    sandbox: bool,
    max_cost_usd: float | None,
    mode: str | None,
    no_wait: bool,
    fresh: bool,
    retry_failed: bool,
    where: str | None,
    ids_file: Path | None,
    yes: bool,
    verbose: bool,
    log_json: bool,
    dry_run: bool,
    as_json: bool,
    fmt: str | None,
) -> None:
    """Run JOB (a YAML job spec) and write its output file.

    Answers are checkpointed as they arrive; rerunning skips what is already answered.
    With --dry-run, print the requests instead, and the estimate, sending nothing.
    """
    from batchrunner import api

    as_json = _json_or(fmt, as_json)
    logs.configure(verbose=verbose, json_lines=log_json)
    with _exit_codes():
        spec = api.job_spec(
            job,
            input=input_path,
            output=output_path,
            concurrency=concurrency,
            mode=mode,
            workers=workers,
            executor=executor,
            ray_address=ray_address,
        )
        if dry_run:
            _dry_run(spec, rows=limit or 3, sandbox=sandbox, as_json=as_json)
            return
        if fresh and not yes and spec.checkpoint_path().exists():
            _confirm_fresh(spec.checkpoint_path())
        try:
            result = api.run(
                spec,
                sandbox=sandbox,
                limit=limit,
                max_cost=max_cost_usd,
                fresh=fresh,
                wait=not no_wait,
                where=where,
                ids=None if ids_file is None else _ids(ids_file),
                retry_failed=retry_failed,
                progress=True,
                hard_exit=True,  # a second Ctrl-C ends the process at once
                on_start=_sandbox_banner,
            )
        except OSError as error:  # a full disk, a read-only folder: say so, keep what the checkpoint holds
            say(f"error: {error}; answers received so far are in the checkpoint, rerun to continue", err=True)
            sys.exit(EXIT_STOPPED)
    _say_outcome(result, sandbox=sandbox, as_json=as_json)


def _concurrency(value: str | None) -> int | str | None:
    """--concurrency: a number from 1 to 4096, or auto."""
    if value is None or value == "auto":
        return value
    if not value.isdigit() or not 1 <= int(value) <= 4096:
        raise click.BadParameter(f"{value!r} is neither a number from 1 to 4096 nor auto")
    return int(value)


def _ids(path: Path) -> frozenset[str]:
    """The ids an --ids file lists, one a line (blank lines and lines starting with # are skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(Problem("--ids", f"cannot read {path}: {exc}")) from None
    return frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def _confirm_fresh(checkpoint: Path) -> None:
    """--fresh deletes every stored answer: asked first on a terminal (exit 2 if declined), refused elsewhere
    unless --yes says so."""
    if not sys.stdin.isatty():
        raise SpecError(f"--fresh deletes every stored answer in {checkpoint}; add --yes to confirm")
    with interrupts.paused():  # Ctrl-C at the question aborts it at once
        confirmed = click.confirm(f"--fresh deletes every stored answer in {checkpoint}. Continue?", err=True)
    if not confirmed:
        sys.exit(EXIT_INVALID)


def _sandbox_banner(sandbox_url: str | None) -> None:
    """Said once the sandbox is up, so nobody mistakes its simulated answers for real ones."""
    if sandbox_url:
        say(
            f"SANDBOX: answers are simulated by batchrunner's built-in OpenRouter-compatible server at {sandbox_url}; nothing is sent to OpenRouter and nothing is billed.",
            err=True,
        )


def _say_outcome(result: RunResult, *, sandbox: bool, as_json: bool = False) -> None:
    """The run's summary and its one exit code; with `as_json` the summary is one JSON object on stdout, the
    summary file's (a script reads it there; why a run stopped is on stderr either way)."""
    from batchrunner.halt import StopReason

    stop = result.stop
    if stop is not None and stop.reason is StopReason.NOT_STARTED:
        say(f"stopped before sending anything: {stop.message}", err=True)
        sys.exit(EXIT_STOPPED)
    if as_json:
        echo_json(result.to_json())
    else:
        _say_summary(result, sandbox=sandbox)
    _exit_after(result)


def _say_summary(result: RunResult, *, sandbox: bool) -> None:
    """The summary as text: where the output went, rows, cost, retries, discounts, grading and scores."""
    spec, summary = result.spec, result.summary
    if result.output_rows is None:
        say(f"{spec.name}: the output could not be written (see above); the checkpoint has every answer", err=True)
    else:
        say(f"{spec.name}: wrote {result.output_rows} rows to {result.output_path}")
    for line in summary.lines(wall_s=result.wall_s, pending=result.pending, resumed=result.resumed):
        say(f"  {line}")
    if result.batch_saved_usd is not None and result.batch_saved_usd > 0:
        say(f"  batch discount: {format_usd(result.batch_saved_usd)} less than the same answers at live prices")
    if result.concurrency is not None:
        ended, most = result.concurrency
        say(f"  concurrency: auto, ended at {ended} in flight (the most it reached: {most})")
    if result.grading is not None:
        grading = result.grading
        say(
            f"  grading: {grading.ok} grades, {grading.failed} failed, cost {format_cost(grading.cost_usd, grading.unpriced)}"
        )
    if spec.evaluate is not None and result.output_rows is not None:
        from batchrunner import api
        from batchrunner.evaluation import score_text

        with _exit_codes():
            for model in api.report(spec, sandbox=sandbox).models:
                say(f"  score {model.model}: {score_text(model)}")


def _exit_after(result: RunResult) -> None:
    """The run's one exit code (RunResult.exit_code: its Stop, said on stderr; a failed row; or all well), and 3
    for a Ctrl-C or SIGTERM that came while the summary was printed."""
    late = interrupts.received()  # Ctrl-C or SIGTERM after the run's report was made: while this was printed
    code = result.exit_code
    if code == EXIT_STOPPED or late is not None:
        if result.stop is not None:
            reason = result.stop.message
        elif late is not None and result.output_rows is not None and not result.unsaved:
            reason = f"{late.name} after the output was written"
        else:
            reason = "the output was not written" if result.output_rows is None else "the checkpoint was not written"
        say(f"stopped early: {reason}", err=True)
        say(f"{result.pending} rows are pending; rerun the same command to continue once that is resolved.", err=True)
        sys.exit(EXIT_STOPPED)
    sys.exit(code)


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--limit", type=click.IntRange(min=1), help="Estimate only the first N rows.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--sandbox", is_flag=True, help="Price with the sandbox's catalog instead of OpenRouter's.")
def estimate(job: Path, limit: int | None, as_json: bool, sandbox: bool) -> None:
    """Estimate the cost and duration of JOB's remaining rows, without sending a completion."""
    from batchrunner import api

    logs.configure()
    with _exit_codes():
        report = api.estimate(job, limit=limit, sandbox=sandbox)
    if as_json:
        echo_json(report)
        return
    usd = _usd_or_unknown
    say(f"{report['job']}: {report['rows']} requests to send")
    for model, entry in report["models"].items():
        say(
            f"  {model}: {entry['rows']} requests"
            + (
                f" (+{entry['deduplicated_rows']} rows copied from identical ones)"
                if entry["deduplicated_rows"]
                else ""
            )
            + f", ~{entry['estimated_prompt_tokens']:,} prompt tokens, "
            f"~{entry['expected_completion_tokens_per_row']:g} completion tokens a row ({entry['completion_estimate_basis']})"
        )
    say(f"  expected cost: {usd(report['expected_cost_usd'])}   worst case: {usd(report['max_cost_usd'])}")
    say(f"  as a batch (mode: batch, typically half the price): {usd(report['expected_batch_cost_usd'])}")
    flexible = [model for model, entry in report["models"].items() if entry["flex_tier"]]
    say(
        f"  at the flex tier (params.service_tier: flex, slower, may find no capacity): "
        f"{usd(report['expected_flex_cost_usd'])}"
        + (
            ""
            if len(flexible) == len(report["models"])
            else f" ({'only ' + ', '.join(flexible) if flexible else 'no model'} has a flex tier; the rest at the standard price)"
        )
    )
    if report["rate_rps"] is None:  # a server without GET /key: there is no rate to divide by
        say("  expected duration: unknown (no rate limit known: only concurrency and the server's speed limit the run)")
    else:
        say(f"  expected duration: {report['expected_duration_s']:g} s at {report['rate_rps']:g} requests/s")
    say(f"  ({report['prompt_tokens_note']})")
    if "media" in report:
        media = report["media"]
        say(
            f"  media (each model's requests): {media['images']:,} images, {media['pdfs']:,} PDFs ({media['pdf_pages']:,} pages counted, "
            f"{media['pdfs_by_url']:,} by URL), {media['audio_files']:,} audio files ({media['audio_mb']:g} MB), "
            f"{media['videos']:,} videos"
        )
        if media["rows_that_cannot_be_sent"]:
            say(
                f"  {media['rows_that_cannot_be_sent']:,} rows cannot be sent (a missing or unusable file): they will fail, unpaid"
            )
        say(f"  ({report['media_note']})")


def _usd_or_unknown(value: object) -> str:
    """An amount of the estimate (a Decimal's text), or why there is none (None): the server lists no prices."""
    return "unknown (no prices)" if value is None else format_usd(Decimal(str(value)))


@main.command()
@click.option("--search", help="Only models whose id or name contains TEXT.")
@click.option("--free", is_flag=True, help="Only free models.")
@click.option("--endpoints", "endpoints_of", metavar="AUTHOR/SLUG", help="The providers serving one model instead.")
@click.option("--sandbox", is_flag=True, help="List the sandbox's catalog.")
def models(search: str | None, free: bool, endpoints_of: str | None, sandbox: bool) -> None:
    """List models with their prices per million tokens and context length, from /models; or, with
    --endpoints, one model's endpoints: provider, quantization, limits, prices, parameters, uptime."""
    from batchrunner.queries import list_endpoints, list_models
    from batchrunner.sandbox import SandboxConfig

    logs.configure()
    config = SandboxConfig() if sandbox else None
    if endpoints_of is not None:
        with _exit_codes(job=False):
            rows = asyncio.run(list_endpoints(endpoints_of, sandbox=config))
        _table(rows)
        return
    with _exit_codes(job=False):
        listing = asyncio.run(list_models(search=search, free_only=free, sandbox=config))
    width = max((len(m["id"]) for m in listing), default=5)
    say(f"{'model'.ljust(width)}  {'prompt $/M':>11}  {'compl. $/M':>11}  {'context':>9}")
    for model in listing:
        context = model["context_length"] or "-"
        say(f"{model['id'].ljust(width)}  {model['prompt_per_m']:>11}  {model['completion_per_m']:>11}  {context:>9}")


@main.command()
@click.argument("generation_id")
@click.option("--json", "as_json", is_flag=True, help="Print OpenRouter's record as JSON.")
@click.option("--sandbox", is_flag=True, help="Look up an answer of a --sandbox run, at the sandbox.")
def generation(generation_id: str, as_json: bool, sandbox: bool) -> None:
    """What OpenRouter kept for one answer (GET /generation): native tokens, cost, provider, latency.
    GENERATION_ID is the output's generation_id column. Needs $OPENROUTER_API_KEY (not with --sandbox)."""
    from batchrunner.queries import lookup_generation
    from batchrunner.sandbox import SandboxConfig

    logs.configure()
    with _exit_codes(job=False):
        record = asyncio.run(lookup_generation(generation_id, sandbox=SandboxConfig() if sandbox else None))
    if as_json:
        echo_json(record)
        return
    for key, value in record.items():
        if value is not None and not isinstance(value, (dict, list)):
            say(f"{key}: {value}")


def _dry_run(spec: JobSpec, *, rows: int, sandbox: bool, as_json: bool) -> None:
    """The requests the first rows would send, then the estimate (when prices can be read)."""
    from batchrunner.queries import dry_run, estimate_job
    from batchrunner.sandbox import SandboxConfig

    shown = dry_run(spec, rows=rows, server=spec.server(sandbox=sandbox))
    try:
        estimate: dict[str, object] | str = asyncio.run(
            estimate_job(spec, sandbox=SandboxConfig() if sandbox else None)
        )
    except (SpecError, RunHalted) as exc:  # no key yet, or no server: the requests are still worth seeing
        estimate = f"not available ({str(exc).strip().splitlines()[-1].strip()})"
    if as_json:
        echo_json({"requests": shown, "estimate": estimate, "sent": 0}, ensure_ascii=False)
        return
    say(f"{spec.name}: the first {rows} row(s) still to do would send (dry run: nothing is sent)")
    for entry in shown:
        chain = " -> ".join(entry["models_chain"])
        sample = f", sample {entry['sample']}" if "sample" in entry else ""
        say("")
        say(f"# row {entry['row_id']}, {chain}{sample}, checkpoint key {entry['checkpoint_key']}")
        if "fails_unsent" in entry:
            say(f"fails unsent: {entry['fails_unsent']}")
        else:
            for line in json.dumps(entry["body"], indent=1, ensure_ascii=False).splitlines():
                say(line)
    if not shown:
        say("nothing: every row is answered (see `batchrunner status`)")
    say("")  # a line of its own: say() shows a newline inside its text as an escape
    if isinstance(estimate, str):
        say(f"estimate: {estimate}")
    elif estimate["expected_cost_usd"] is None:
        say(f"estimate: {estimate['rows']} requests, cost unknown (no prices: give them under `prices:`)")
    else:
        say(
            f"estimate: {estimate['rows']} requests, expected {_usd_or_unknown(estimate['expected_cost_usd'])}, "
            f"worst case {_usd_or_unknown(estimate['max_cost_usd'])}"
        )


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--sandbox", is_flag=True, help="Check the models against the sandbox's catalog.")
def validate(job: Path, sandbox: bool) -> None:
    """Every check `run` makes before its first request (spec, input, output path, key, models, endpoints);
    exit 0 when the job would start, 2 naming each problem. For CI pipelines that lint job specs."""
    from batchrunner.queries import validate as check
    from batchrunner.sandbox import SandboxConfig
    from batchrunner.spec import load_spec

    logs.configure()
    with _exit_codes():
        checked = asyncio.run(check(load_spec(job), sandbox=SandboxConfig() if sandbox else None))
    say(f"{job}: ok")
    for line in checked:
        say(f"  {line}")


@main.command()
def schema() -> None:
    """Print the JSON Schema of a job spec (for editors: `# yaml-language-server: $schema=...`)."""
    from batchrunner.spec import json_schema

    echo_json(json_schema())


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@_output_option("Write the spec here.", default=Path("job.yaml"))
@click.option("--force", is_flag=True, help="Overwrite an existing spec.")
def init(data: Path, out_path: Path, force: bool) -> None:
    """Write a commented starter job spec for DATA (a .csv, .parquet or .jsonl file): its columns read,
    an id column and the text columns guessed. Try it with `batchrunner run job.yaml --sandbox`."""
    from batchrunner.starter import starter_spec

    logs.configure()
    with _exit_codes(job=False):
        if out_path.exists() and not force:
            raise SpecError(Problem(str(out_path), "exists; choose another --output, or add --force to overwrite it"))
        text = starter_spec(data, out_path)
        _write_file(out_path, text, "--output")
    say(f"wrote {out_path}; try: batchrunner run {out_path} --sandbox  (or --dry-run to see the requests)")


def _table(rows: list[dict[str, str]]) -> None:
    """Rows of text as aligned columns, the first row's keys as the header."""
    if not rows:
        say("(none)")
        return
    names = list(rows[0])
    widths = {name: max(len(name), *(len(row[name]) for row in rows)) for name in names}
    say("  ".join(name.ljust(widths[name]) for name in names).rstrip())
    for row in rows:
        say("  ".join(row[name].ljust(widths[name]) for name in names).rstrip())


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option(
    "--output", "output_path", type=click.Path(path_type=Path), help="Write here instead of the spec's `output`."
)
@click.option("--sandbox", is_flag=True, help="Export the sandbox's simulated answers instead of the real ones.")
@_stoppable
def export(job: Path, output_path: Path | None, sandbox: bool) -> None:
    """Rewrite JOB's output from its checkpoint, without sending anything."""
    from batchrunner.offline import export_job
    from batchrunner.spec import load_spec

    logs.configure()
    with _exit_codes():
        spec = load_spec(job, overrides=_overrides(input=None, output=output_path, concurrency=None), sending=False)
        try:
            written = export_job(spec, sandbox=sandbox)
        except OSError as error:  # a folder that cannot be made or written (a full disk: exit 3, wait it out)
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            say(
                f"error: cannot write {spec.output} ({error.strerror or error}); the checkpoint keeps every answer: "
                + ("free some space and rerun" if full else "choose a folder you can write to (--output) and rerun"),
                err=True,
            )
            sys.exit(EXIT_STOPPED if full else EXIT_INVALID)
    say(f"{spec.name}: wrote {written} rows to {spec.output}")
    _stopped_after_writing(spec.output, written)


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--sandbox", is_flag=True, help="Cancel at the sandbox (for trying batch mode out).")
def cancel(job: Path, sandbox: bool) -> None:
    """Cancel JOB's batches still running at the Batch API. The requests a batch had finished are billed and lost
    (a cancelled batch returns no answers); the next run records that cost and asks their rows again. A batch
    that has already ended is not cancelled: the next run collects it."""
    from batchrunner.queries import cancel_batches
    from batchrunner.sandbox import SandboxConfig
    from batchrunner.spec import load_spec

    logs.configure()
    with _exit_codes():
        spec = load_spec(job, sending=False)
        done = asyncio.run(cancel_batches(spec, sandbox=SandboxConfig() if sandbox else None))
    for batch_id, status in done.ended:
        say(
            f"{spec.name}: batch {batch_id} has {status if status != 'ended' else 'ended'}: not cancelled; the next run collects its answers"
        )
    if done.cancelling:
        say(
            f"{spec.name}: asked to cancel {len(done.cancelling)} batch(es): {', '.join(done.cancelling)}; the requests "
            "they had finished are billed and their answers lost; the next run records that cost and asks the rest again"
        )
    elif not done.ended:
        say(f"{spec.name}: no batch is running")


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--sandbox", is_flag=True, help="Score the sandbox's simulated answers instead of the real ones.")
@_stoppable
def score(job: Path, sandbox: bool) -> None:
    """Score JOB's answers again (after editing its `evaluate:` block) and rewrite the output. Sends nothing."""
    from batchrunner.evaluation import score_text
    from batchrunner.offline import evaluation, export_job
    from batchrunner.spec import load_spec

    logs.configure()
    with _exit_codes():
        spec = load_spec(job, sending=False)
        if spec.evaluate is None:
            raise SpecError(
                Problem(spec.locate("evaluate"), "the job has no evaluate: block; add one to score answers")
            )
        written = export_job(spec, sandbox=sandbox)
        figures = evaluation(spec, sandbox=sandbox)
    say(f"{spec.name}: scored {written} rows in {spec.output}")
    for model in figures.models:
        say(f"  score {model.model}: {score_text(model)}")
    _stopped_after_writing(spec.output, written)


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts instead of HTML.")
@click.option("--markdown", is_flag=True, help="Markdown for CI logs and pull requests instead of HTML.")
@click.option("--format", "fmt", type=click.Choice(["html", "md", "json"]), hidden=True)  # before --json: a release
@_output_option("Write here (default: HTML beside the output, else stdout).")
@click.option("--by", "by", help="Also chart the scores by this input column (HTML).")
@click.option("--sandbox", is_flag=True, help="Report the sandbox's simulated answers instead of the real ones.")
@click.option(
    "--fail-under",
    type=float,
    help="Exit 1 when a model's score is under this (0 to 1): a gate for CI. See --strict, --model, --junit.",
)
@click.option("--strict", is_flag=True, help="With --fail-under: gate on the 95% interval's lower bound.")
@click.option("--model", "gated", multiple=True, help="With --fail-under: gate only this model (repeatable).")
@click.option("--junit", type=click.Path(path_type=Path), help="With --fail-under: write the gates as JUnit XML here.")
@click.option(
    "--baseline",
    help="Compare with run:N, a date (YYYY-MM-DD), another job's spec or an earlier output file (markdown or --json).",
)
def report(
    job: Path,
    as_json: bool,
    markdown: bool,
    fmt: str | None,
    out_path: Path | None,
    by: str | None,
    sandbox: bool,
    fail_under: float | None,
    strict: bool,
    gated: tuple[str, ...],
    junit: Path | None,
    baseline: str | None,
) -> None:
    """Compare JOB's models from its checkpoint: scores with 95% intervals, paired differences, cost, latency.

    Sends nothing. HTML to look at (charts and a row explorer, one file that opens anywhere),
    markdown for CI logs and pull requests, JSON for scripts. With --fail-under it is a CI gate:
    exit 1 when a model's score (with --strict, its interval's lower bound) is under the threshold."""
    from batchrunner import api
    from batchrunner.evaluation import to_markdown
    from batchrunner.offline import report_html

    fmt = _report_format(fmt, as_json=as_json, markdown=markdown)
    if fail_under is None and (strict or gated or junit):
        raise click.UsageError("--strict, --model and --junit go with --fail-under")
    logs.configure()
    with _exit_codes():
        spec = api.job_spec(job, sending=False)
        figures = api.report(spec, sandbox=sandbox)
        if baseline is not None:  # the comparison instead of the report: markdown for a pull request, or JSON
            from batchrunner.compare import to_markdown as comparison_markdown

            comparison = api.compare(spec, baseline, sandbox=sandbox)
            text = jsontext.dumps(comparison.to_json(), indent=1) if fmt == "json" else comparison_markdown(comparison)
        elif fmt == "html":
            text = report_html(spec, sandbox=sandbox, by=by)
            from batchrunner.output import local_of

            local = local_of(spec.output)  # an s3:// output's report goes beside the checkpoint
            out_path = out_path or local.with_name(local.stem + ".report.html")
        else:
            text = jsontext.dumps(figures.to_json(), indent=1) if fmt == "json" else to_markdown(figures)
        if out_path is None:
            click.echo(text, nl=False)  # markdown and JSON of our own making; outside text is escaped in them
        else:
            _write_file(out_path, text, "--output")
            say(f"{spec.name}: wrote the report to {out_path}", err=fail_under is not None)
        if fail_under is not None:
            _gate(spec.name, figures, fail_under, strict=strict, models=list(gated), junit=junit)


def _gate(job: str, figures: Report, threshold: float, *, strict: bool, models: list[str], junit: Path | None) -> None:
    """The CI gate: each gated model's verdict on stderr, JUnit XML if asked, and exit 1 when one is under."""
    from batchrunner.gates import gates, junit_xml

    verdicts = gates(figures, threshold, models=models or None, strict=strict)
    for gate in verdicts:
        say(f"{'pass' if gate.passed else 'FAIL'}: {gate.sentence()}", err=True)
    if junit is not None:
        _write_file(junit, junit_xml(job, verdicts), "--junit")
    if not all(gate.passed for gate in verdicts):
        sys.exit(EXIT_SOME_FAILED)


def _report_format(fmt: str | None, *, as_json: bool, markdown: bool) -> str:
    """html, md or json, from --json, --markdown or the hidden old --format; two that disagree are a usage error."""
    asked = {name for name, given in (("json", as_json), ("md", markdown)) if given} | ({fmt} if fmt else set())
    if len(asked) > 1:
        raise click.UsageError("give one of --json and --markdown (or neither, for HTML)")
    return asked.pop() if asked else "html"


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--sandbox", is_flag=True, help="Count the sandbox's simulated answers instead of the real ones.")
def status(job: Path, as_json: bool, sandbox: bool) -> None:
    """Show JOB's progress: done, failed and pending per model, cost so far, last run. Sends nothing."""
    from batchrunner import api

    logs.configure()
    with _exit_codes():
        report = api.status(job, sandbox=sandbox)
    if as_json:
        echo_json(report)
        return
    say(f"{report['job']}: checkpoint {report['checkpoint']}, answers from {report['server']}")
    others = report["elsewhere"]
    if others is not None and not any(counts["ok"] or counts["failed"] for counts in report["models"].values()):
        # None of this server's, all another's (a --sandbox run's): say whose, not "0 ok, 200 pending"
        how = f"with `batchrunner status {job} {others['option']}`" if others["option"] else others["how"]
        say(f"  no answers from {report['server']} yet: {others['sentence']}; see them {how}")
        for model, counts in report["models"].items():
            say(f"  {model}: {counts['pending']} rows to send to {report['server']}")
    else:
        for model, counts in report["models"].items():
            say(f"  {model}: {counts['ok']} ok, {counts['failed']} failed, {counts['pending']} pending")
        for server, count in report["answers_from_other_servers"].items():
            hint = " (simulated; see them with --sandbox)" if server == "sandbox" else ""
            say(f"  also {count} answers from {server}{hint}, not used for {report['server']}")
    cost = format_cost(Decimal(report["cost_usd"]), report["cost_unknown_rows"])
    say(f"  cost so far: {cost} over {report['runs']} run(s)")
    for batch in report["batches"]:
        say(
            f"  batch {batch['batch_id'] or '(submission unanswered)'}: {batch['requests']} requests to "
            f"{batch['model']}, {batch['state']} (submitted {batch['created_at']})"
        )
    last = report["last_run"]
    if last:
        say(f"  last run: started {last['started_at']}, {last['outcome'] or 'running or killed'}")
    if recorded := report["recorded_runs"]:
        shown = ", ".join(f"run:{r['run']} ({r['finished_at'][:16].replace('T', ' ')} UTC)" for r in recorded[-5:])
        say(f"  recorded runs, to compare with `report --baseline`: {shown}")


def _fault(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, float]:
    faults = {}
    for value in values:
        kind, _, probability = value.partition("=")
        try:
            faults[kind] = float(probability)
        except ValueError:
            raise click.BadParameter(f"{value!r}: write KIND=PROBABILITY, e.g. rate_limit=0.1") from None
        if kind not in FAULT_KINDS:
            raise click.BadParameter(f"unknown fault {kind!r}; known: {', '.join(FAULT_KINDS)}")
        if not 0 <= faults[kind] <= 1:  # NaN too
            raise click.BadParameter(f"{value!r}: P is a probability from 0 to 1, e.g. rate_limit=0.1")
    return faults


@main.command()
@click.option("--port", type=click.IntRange(0, 65535), default=8089, show_default=True, help="Port on 127.0.0.1.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for simulated faults.")
@click.option(
    "--fault",
    "faults",
    multiple=True,
    callback=_fault,
    metavar="KIND=P",
    help=f"Simulate a fault with probability P per request; repeatable. Kinds: {', '.join(FAULT_KINDS)}.",
)
@click.option(
    "--latency",
    "latency_s",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds before each answer.",
)
@click.option(
    "--round-trip",
    "round_trip_s",
    type=click.FloatRange(min=0, max=60),
    default=0.0,
    show_default=True,
    help="Seconds every request waits first, as over the network to a far server.",
)
@click.option(
    "--credits", "credits_usd", type=click.FloatRange(min=0), help="The key's credit limit in USD (default: no limit)."
)
@click.option(
    "--rate-limit",
    "rate_limit",
    help="Requests per second before 429s, or 'credits' for OpenRouter's rule (1/s per credit left).",
)
@click.option(
    "--batch-turnaround",
    "batch_turnaround_s",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds a submitted batch takes to complete (long enough to try status and cancel on an open batch).",
)
@click.option(
    "--byok",
    is_flag=True,
    help="Answer as through a provider key of your own: usage.cost is OpenRouter's 5% fee, the provider's price "
    "is usage.cost_details.upstream_inference_cost.",
)
def sandbox(
    port: int,
    seed: int,
    faults: dict[str, float],
    latency_s: float,
    round_trip_s: float,
    credits_usd: float | None,
    rate_limit: str | None,
    batch_turnaround_s: float,
    byok: bool,
) -> None:
    """Serve the simulated OpenRouter API on 127.0.0.1 until interrupted.

    Point a job at it with `api: {base_url: http://127.0.0.1:PORT/api/v1}` or
    OPENROUTER_BASE_URL; any key works.
    """
    from batchrunner.sandbox import SandboxConfig, serve

    limit: float | str | None = rate_limit
    if rate_limit not in (None, "credits"):
        try:
            limit = float(rate_limit)
        except ValueError:
            raise click.BadParameter(
                "a number of requests per second, or 'credits'", param_hint="--rate-limit"
            ) from None
    config = SandboxConfig(
        seed=seed,
        faults=faults,
        latency_s=latency_s,
        round_trip_s=round_trip_s,
        credits_usd=None if credits_usd is None else Decimal(str(credits_usd)),
        rate_limit=limit,  # type: ignore[arg-type]  # a str here is always "credits", checked above
        batch_turnaround_s=batch_turnaround_s,
        byok=byok,
    )

    def ready(url: str) -> None:
        say(f"sandbox: serving a simulated OpenRouter API at {url} (Ctrl-C to stop)", err=True)

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(config, port, ready))
    except OSError as error:  # the port taken (a sandbox already serving there) or not ours to bind
        taken = error.errno == errno.EADDRINUSE
        why = "is in use" if taken else f"cannot be served ({error.strerror or error})"
        say(f"error: 127.0.0.1:{port} {why}: choose another --port (--port 0 picks a free one)", err=True)
        sys.exit(EXIT_INVALID)


def _overrides(
    *, input: Path | None, output: Path | None, concurrency: int | None, mode: str | None = None
) -> dict[str, Any]:
    """Command-line options as spec overrides; paths resolve against the current directory."""
    result: dict[str, Any] = {}
    if input is not None:
        result["input"] = str(input.resolve())
    if output is not None:
        result["output"] = str(output.resolve())
    if concurrency is not None:
        result["concurrency"] = concurrency
    if mode is not None:
        result["mode"] = mode
    return result


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--sample", type=click.IntRange(min=1), help="Audit N rows drawn at random (seeded) instead of all.")
@click.option("--seed", type=int, default=0, show_default=True, help="The seed of --sample's draw.")
@click.option(
    "--tolerance",
    default="0.0001",
    show_default=True,
    metavar="USD|PCT%",
    help="The absolute drift accepted: USD (0.0001) or a share of what OpenRouter kept (1%); more exits 1.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the audit as one JSON object.")
@click.option("--sandbox", is_flag=True, help="Audit a --sandbox run's answers, at the sandbox.")
@_stoppable
def audit(job: Path, sample: int | None, seed: int, tolerance: str, as_json: bool, sandbox: bool) -> None:
    """Check JOB's recorded costs and tokens against what OpenRouter kept of each answer (GET /generation).

    Exit 0 when the drift is within --tolerance, 1 when it is more, 2 for a bad job or arguments, 3 stopped early
    (rerun to ask the rest: what was audited is kept in the checkpoint)."""
    from batchrunner.audit import Tolerance
    from batchrunner.auditing import AuditSettings, audit_job
    from batchrunner.sandbox import SandboxConfig
    from batchrunner.spec import load_spec

    try:
        allowed = Tolerance.parse(tolerance)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tolerance") from None
    logs.configure()
    with _exit_codes(job=False):  # an audit starts no job: "the job was not started" would mislead
        settings = AuditSettings(
            sample=sample, seed=seed, tolerance=allowed, sandbox=SandboxConfig() if sandbox else None
        )
        outcome = asyncio.run(audit_job(load_spec(job), settings))
    if as_json:
        echo_json(outcome.to_json())
    else:
        _say_audit(outcome.to_json())
    if outcome.stopped is not None:
        say(f"stopped early: {outcome.stopped}", err=True)
    sys.exit(outcome.exit_code)


AUDIT_ROWS_SHOWN = 20  # the rows that differ listed in text; --json lists them all


def _say_audit(report: dict[str, Any]) -> None:
    """The audit for people: per model, what was checked, what differs, the drift; then the rows that differ."""
    total = report["total"]
    sampled = f" (a sample of {report['sample']})" if report["sample"] is not None else ""
    say(
        f"{report['job']}: {total['rows']} of {report['rows_answered']} answered rows audited{sampled}; "
        f"{report['asked']} looked up now, {report['known_before']} known from earlier audits"
    )
    for model, entry in report["models"].items():
        line = (
            f"  {model}: {entry['checked']} checked, {entry['mismatched']} differ "
            f"({entry['cost_mismatches']} in cost, {entry['token_mismatches']} in tokens), "
            f"drift {_exact_usd(entry['drift_usd'])} (recorded {_exact_usd(entry['recorded_usd'])}, "
            f"OpenRouter kept {_exact_usd(entry['kept_usd'])})"
        )
        if entry["unknown"]:
            line += f", {entry['unknown']} not yet known to OpenRouter (asked again by the next audit)"
        say(line)
        if entry["estimated"]:
            say(
                f"    {entry['estimated']} row(s) with an estimated cost (a reply abandoned): recorded "
                f"{_exact_usd(entry['estimated_recorded_usd'])}, OpenRouter kept {_exact_usd(entry['estimated_kept_usd'])}"
            )
        if entry["other_attempts"]:
            say(f"    {entry['other_attempts']} row(s) billed other attempts too: tokens compared, not the cost")
        if entry["unpriced"]:
            say(f"    {entry['unpriced']} row(s) without a recorded cost: tokens compared, not the cost")
    differing = report["differing_rows"]
    for row in differing[:AUDIT_ROWS_SHOWN]:
        say(
            f"  {row['verdict']}: row {row['row_id']} ({row['model']}, {row['generation_id']}): cost recorded "
            f"{_exact_usd(row['recorded_cost_usd'])}, kept {_exact_usd(row['kept_cost_usd'])}; tokens recorded "
            f"{row['recorded_tokens'][0]}/{row['recorded_tokens'][1]}, kept {row['kept_tokens'][0]}/{row['kept_tokens'][1]}"
        )
    if len(differing) > AUDIT_ROWS_SHOWN:
        say(f"  ... and {len(differing) - AUDIT_ROWS_SHOWN} more rows (--json lists them all)")
    verdict = "more than" if report["exceeds_tolerance"] else "within"
    say(
        f"drift: {_exact_usd(total['drift_usd'])} (recorded minus kept; {_exact_usd(total['absolute_drift_usd'])} "
        f"without signs), {verdict} the tolerance of {report['tolerance']} (${report['allowed_drift_usd']})"
    )


def _exact_usd(value: str | None) -> str:
    """An exact amount of USD as text, every digit kept (drift is often a fraction of a micro-dollar)."""
    if value is None:
        return "unknown"
    amount = Decimal(value)
    return f"-${-amount:f}" if amount < 0 else f"${amount:f}"


def entry() -> None:
    """The `batchrunner` command (and `python -m batchrunner`): `main`, without the interpreter's last garbage
    collection at exit. That collection walks every object the imports made (pydantic's models, polars, aiohttp:
    0.08 s of a 10-row sandbox run, 0.02 s of `status`; bench/startup.py) only to free memory the process is about
    to give back. gc.freeze moves them out of its reach; atexit handlers, flushes and closes all still run."""
    atexit.register(gc.freeze)  # registered first, so run last
    main()


if __name__ == "__main__":  # `python -m batchrunner.cli`: last, once every helper a command uses is defined
    entry()
