"""Everything that can refuse a job, checked before the first request: the key, the input
read to its end, the columns, the job's files and whether the output can be written.

A job refused here costs nothing: each problem is a SpecError naming the field and the fix
(exit 2). Nothing here sends a request.
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import TYPE_CHECKING, Any

from batchrunner.costs import STANDARD_TIER, PriceTable, tier_of, to_decimal
from batchrunner.errors import OutputError, Problem, SpecError, first_line
from batchrunner.files import summary_path
from batchrunner.prompt import TemplateError, parse_template
from batchrunner.spec import JobSpec, MetricSettings, is_openrouter
from batchrunner.structured import Mode, strict_mode_warnings
from batchrunner.urls import Location, ObjectURL

if TYPE_CHECKING:
    from batchrunner.dataset import Dataset

# What reads the input (polars, dataset.py, output.py) is imported by the checks that read it: `status` makes the
# checks of the spec alone (check_files, warn_of_schema) without importing polars (offline.job_status)

log = logging.getLogger("batchrunner")


def api_key(spec: JobSpec, base_url: str, *, endpoint: int | None = None) -> str | None:
    """The key from the environment; SpecError when OpenRouter needs one and it is missing or malformed. For a
    pool's `endpoint` (its index in api.endpoints), its own api_key_env if it names one, which must then be set:
    a variable named for one server and left unset is a mistake, not a server without keys."""
    own = spec.api.endpoints[endpoint].api_key_env if spec.api.endpoints and endpoint is not None else None
    env = own or spec.api.api_key_env
    field = spec.locate(f"api.endpoints[{endpoint}].api_key_env") if own else "api.api_key_env"
    key = os.environ.get(env, "").strip()
    if any(ord(char) < 32 or ord(char) == 127 for char in key):
        raise SpecError(Problem(field, f"${env} contains a line break or control character; set it to the key alone"))
    if own and not key:
        raise SpecError(Problem(field, f"${env} is not set; export it, or remove api_key_env from this endpoint"))
    openrouter = is_openrouter(base_url)
    if not key:
        if openrouter:
            raise SpecError(
                Problem(
                    field,
                    f"${env} is not set; create a key at https://openrouter.ai/settings/keys and `export {env}=sk-or-v1-...`, or try the job on the sandbox with --sandbox",
                )
            )
        return None
    if openrouter and not key.startswith("sk-or-v1-"):
        raise SpecError(
            Problem(
                field,
                f"${env} does not look like an OpenRouter key (they start with sk-or-v1-); check the variable",
            )
        )
    return key


def prepare(spec: JobSpec) -> Dataset:
    """Check the job's files and open the input, read to its end, against the spec: columns, ids, clashes."""
    from batchrunner.dataset import open_dataset
    from batchrunner.output import extra_columns, score_columns
    from batchrunner.records import RESULT_SCHEMA

    check_files(spec)
    try:
        dataset = open_dataset(spec.input, id_column=spec.id_column)
    except SpecError as exc:
        raise SpecError([Problem(spec.locate(p.where), p.message) for p in exc.problems]) from None
    missing = [
        Problem(
            spec.locate(field),
            f"placeholder {{{column}}} names no input column; the input has: {', '.join(dataset.columns)}",
        )
        for field, template in spec.template_fields()
        for column in template.columns
        if column not in dataset.columns
    ]
    if missing:
        raise SpecError(missing)
    clashes = [c for c in dataset.columns if c in RESULT_SCHEMA or (c == "sample" and spec.samples > 1)]
    if clashes:
        raise SpecError(
            Problem(
                spec.locate("input"),
                f"input column(s) {', '.join(map(repr, clashes))} clash with output columns of the same name; rename them in the input",
            )
        )
    taken = set(dataset.columns) | set(RESULT_SCHEMA)
    clashing = [c for c in extra_columns(spec) if c in taken and c not in score_columns(spec)]
    if clashing:
        raise SpecError(
            Problem(
                spec.locate("response_format"),
                f"schema properties {', '.join(map(repr, clashing))} would be output columns that already exist; set output_prefix (e.g. output_prefix: label_)",
            )
        )
    warn_of_schema(spec)
    check_evaluation(spec, dataset.columns)
    check_media(spec, dataset)
    return dataset


def warn_of_schema(spec: JobSpec) -> None:
    """What a response_format's schema asks that a strict server may refuse, as warnings (a run goes on)."""
    if spec.response_format:
        for warning in strict_mode_warnings(Mode.of(spec.response_format).schema or {}):
            log.warning("response_format: %s", warning)


def check_evaluation(spec: JobSpec, input_columns: list[str]) -> None:
    """An `evaluate:` block names an input column, a property the answers have, metrics that can run,
    and score columns no other column is named like."""
    from batchrunner.judging import ANSWER, REFERENCE
    from batchrunner.output import extra_columns, score_columns
    from batchrunner.scoring import load_function, metrics_of

    evaluate = spec.evaluate
    if evaluate is None:
        return
    problems = []
    if evaluate.reference is not None and evaluate.reference not in input_columns:
        problems.append(
            Problem(
                spec.locate("evaluate.reference"),
                f"{evaluate.reference!r} names no input column; the input has: {', '.join(input_columns)}",
            )
        )
    mode = Mode.of(spec.response_format)
    if evaluate.field is not None:
        properties = list(((mode.schema or {}).get("properties") or {}).keys())
        if mode.kind == "text":
            problems.append(
                Problem(spec.locate("evaluate.field"), "compares a structured answer's property: set response_format")
            )
        elif mode.kind == "json_schema" and evaluate.field not in properties:
            problems.append(
                Problem(
                    spec.locate("evaluate.field"),
                    f"{evaluate.field!r} is not a property of the response schema; it has: {', '.join(properties)}",
                )
            )
    for rule in evaluate.judges():
        assert rule.judge is not None
        try:
            rubric = parse_template(rule.judge.rubric)
        except TemplateError as exc:
            problems.append(Problem(spec.locate("evaluate.metric"), f"judge rubric: {exc}"))
            continue
        known = {*input_columns, ANSWER, REFERENCE}
        for column in rubric.columns:
            if column not in known:
                problems.append(
                    Problem(
                        spec.locate("evaluate.metric"),
                        f"judge rubric placeholder {{{column}}} is neither {{answer}}, {{reference}} nor an input column",
                    )
                )
    metrics = metrics_of(evaluate.rules(), spec.output_prefix)
    names = [metric.name for metric in metrics]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(
            Problem(spec.locate("evaluate.metric"), f"two metrics make the column {name!r}; give them `name:`s")
        )
    for metric in metrics:
        if metric.kind == "python":
            try:
                load_function(metric.function or "")
            except (ImportError, AttributeError) as exc:
                problems.append(
                    Problem(
                        spec.locate("evaluate.metric"),
                        f"cannot import {metric.function} ({first_line(exc)}); check the module is on PYTHONPATH and the name",
                    )
                )
    structured = set(extra_columns(spec)) - set(score_columns(spec))
    clashing = [name for name in score_columns(spec) if name in input_columns or name in structured]
    if clashing:
        problems.append(
            Problem(
                spec.locate("evaluate.metric"),
                f"score column(s) {', '.join(map(repr, clashing))} clash with columns of the same name; name the metrics "
                "(`name:`) or set output_prefix",
            )
        )
    if problems:
        raise SpecError(problems)


def check_files(spec: JobSpec) -> None:
    """The job's files are distinct: writing the output or the checkpoint never overwrites the input,
    and the checkpoint is not the output. Paths are compared resolved (symlinks, `..`, hard links, case)."""
    checkpoint = spec.checkpoint_path()
    lock = checkpoint.with_name(checkpoint.name + ".lock")
    pairs = [
        ("output", spec.output, "input", spec.input),
        ("output", summary_path(spec.output), "input", spec.input),
        ("checkpoint", checkpoint, "input", spec.input),
        ("checkpoint", lock, "input", spec.input),
        ("checkpoint", checkpoint, "output", spec.output),
        ("checkpoint", lock, "output", spec.output),
    ]
    problems = [
        Problem(
            spec.locate(field),
            f"{path} is the job's {other} ({other_path}); writing it would destroy the {other}: "
            f"choose another {field} path",
        )
        for field, path, other, other_path in pairs
        if same_file(path, other_path)
    ]
    if problems:
        raise SpecError(problems)


def same_file(a: Location, b: Location) -> bool:
    """Whether two paths name one file: the same inode if both exist, else the same resolved path,
    compared without case (a case-insensitive filesystem would make them one file). An object is only ever
    the same object (keys are case-sensitive), never a local file."""
    if isinstance(a, ObjectURL) or isinstance(b, ObjectURL):
        return a == b
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return os.path.realpath(a).casefold() == os.path.realpath(b).casefold()


def check_output(spec: JobSpec, dataset: Dataset) -> None:
    """The output can be created in its folder, in its format, with every column it will have."""
    from batchrunner.output import probe_output

    try:
        probe_output(dataset, spec, spec.output)
    except SpecError as exc:  # the bucket's answer (objectstore.check_writable), named by the spec's line
        raise SpecError([Problem(spec.locate(p.where), p.message) for p in exc.problems]) from None
    except (OutputError, OSError) as exc:
        raise SpecError(
            Problem(
                spec.locate("output"),
                f"cannot write {spec.output} ({exc}); choose a folder you can write to, or pass --output",
            )
        ) from None


def judge_rules(spec: JobSpec) -> list[MetricSettings]:
    return spec.evaluate.judges() if spec.evaluate is not None else []


def check_models(spec: JobSpec, catalog: PriceTable, *, strict: bool) -> None:
    """Every model of the job is one the server lists at /models. Against OpenRouter (or the sandbox) a
    model it does not list is refused, with the closest slugs; another server may answer any name
    (llama-server ignores it), so there it is a warning. Nothing to check when /models was not read."""
    if not catalog.ids:
        return
    named = [*_answering_models(spec), *(("evaluate.metric", r.judge.model) for r in judge_rules(spec) if r.judge)]
    problems = []
    for field, model in named:
        if (why := catalog.unusable(model)) is not None:
            log.warning(
                "%s: %s is unpriced: %s; costs the server does not report will be unknown, and a budget cannot price it",
                spec.locate(field),
                model,
                why,
            )
        if catalog.lists(model):
            continue
        close = difflib.get_close_matches(model, sorted(catalog.ids), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(map(repr, close))}?" if close else "`batchrunner models` lists them"
        if strict:
            problems.append(Problem(spec.locate(field), f"{model!r} is not a model the server lists; {hint}"))
        else:
            log.warning(
                "%s: %r is not listed at %s/models; sending it anyway", spec.locate(field), model, spec.base_url()
            )
    problems += _input_problems(spec, catalog, strict=strict)
    if problems:
        raise SpecError(problems)


def _answering_models(spec: JobSpec) -> list[tuple[str, str]]:
    """(spec field, model) of the models that answer the rows: models and fallbacks."""
    return [(f"models[{i}]", m) for i, m in enumerate(spec.models)] + [
        (f"fallbacks[{i}]", m) for i, m in enumerate(spec.fallbacks)
    ]


def _input_problems(spec: JobSpec, catalog: PriceTable, *, strict: bool) -> list[Problem]:
    """A model whose endpoints take no image (audio, video) input would answer every row with a 404:
    refused here instead, naming models that do. A PDF any model takes: OpenRouter's file-parser
    plugin turns it into text for a model that cannot read files."""
    kinds = sorted(spec.prompt_template().media_kinds - {"file"})
    problems = []
    for field, model in _answering_models(spec):
        takes = catalog.inputs(model)
        for kind in kinds:
            if takes is None or kind in takes:
                continue
            vendor = model.split("/")[0] + "/"
            others = sorted(catalog.taking(kind), key=lambda slug: (not slug.startswith(vendor), slug))[:3]
            hint = f"e.g. {', '.join(others)}" if others else "`batchrunner models` lists what each takes"
            message = f"{model!r} takes no {kind} input (it takes {', '.join(sorted(takes))}); choose a model that does, {hint}"
            if strict:
                problems.append(Problem(spec.locate(field), message))
            else:
                log.warning("%s: %s", spec.locate(field), message)
    return problems


def check_media(spec: JobSpec, dataset: Dataset) -> None:
    """What can be known of the media columns before anything is sent: their type, audio given as URLs
    (OpenRouter takes audio as data only), and, in batch mode, anything but https URLs (the Batch API
    refuses file content). A missing or unusable file is a problem of its row alone: it fails, unsent."""
    import polars as pl

    problems = []
    schema = dataset.frame.collect_schema()
    for field, kind, template in spec.media_fields():
        column = template.single_column
        if column is None:
            first = template.parts[0] if template.parts else ""
            literal_https = isinstance(first, str) and first.lower().startswith("https://")
            if spec.mode == "batch" and not literal_https:
                problems.append(
                    Problem(
                        spec.locate(field),
                        "mode batch sends media as https URLs only; start the template with https://, or use mode: live",
                    )
                )
            continue
        dtype = schema.get(column)
        if dtype is None:
            continue  # a missing column is reported with the other placeholders
        if dtype == pl.Binary():
            if spec.mode == "batch":
                problems.append(
                    Problem(
                        spec.locate(field),
                        f"{column!r} holds bytes, and the Batch API takes media as https URLs only (OpenRouter refuses base64 in batches); use mode: live",
                    )
                )
            continue
        if dtype != pl.String():
            problems.append(
                Problem(
                    spec.locate(field),
                    f"{column!r} holds {dtype} values, not paths, https URLs or bytes; name a column that does",
                )
            )
            continue
        text = pl.col(column).str.strip_chars().str.to_lowercase()
        url = text.str.starts_with("http://") | text.str.starts_with("https://")
        found = (
            dataset.frame.select(
                url.sum().alias("urls"),
                (~text.str.starts_with("https://")).sum().alias("not_https"),
                pl.col(column).filter(~text.str.starts_with("https://")).first().alias("example"),
                pl.col(column).filter(url).first().alias("url_example"),
            )
            .collect()
            .row(0, named=True)
        )
        if kind == "audio" and found["urls"]:
            problems.append(
                Problem(
                    spec.locate(field),
                    f"{column!r} holds {found['urls']} URL(s) (e.g. {found['url_example']!r}); OpenRouter takes audio as data only: give local files or bytes",
                )
            )
        if spec.mode == "batch" and found["not_https"]:
            problems.append(
                Problem(
                    spec.locate(field),
                    f"{found['not_https']} row(s) of {column!r} are not https URLs (e.g. {str(found['example'])[:80]!r}); the Batch API takes media as https URLs only (OpenRouter refuses base64 and data: URLs in batches): use URLs, or mode: live",
                )
            )
    if problems:
        raise SpecError(problems)


def check_endpoints(spec: JobSpec, endpoints: dict[str, list[dict[str, Any]]]) -> None:
    """Every model of the job has an endpoint (a provider) that can serve the job as written: one the
    `provider` settings allow (`only`, `ignore`, `quantizations`, `max_price`) that supports what the
    job needs (`response_format`, `tools`; every parameter with `require_parameters`). Otherwise
    its first request would be OpenRouter's 404 "No endpoints found that support ...": refused here
    (exit 2), naming what is missing. Where only some endpoints can serve it, a warning says so.
    Models whose endpoints were not read (another server) are not checked."""
    needed = _needed_parameters(spec, endpoints)
    problems = []
    for field, model in _answering_models(spec):
        listed = _of_tier(endpoints.get(model) or [], spec, field, model)
        if not listed:
            continue
        allowed = [endpoint for endpoint in listed if _allowed(endpoint, spec.provider or {})]
        if not allowed:
            names = ", ".join(sorted({str(e.get("tag") or e.get("provider_name")) for e in listed}))
            problems.append(
                Problem(
                    spec.locate("provider"),
                    f"{model!r}: the `provider` settings (only, ignore, quantizations, max_price) leave none of its "
                    f"endpoints ({names}); loosen them or choose another model",
                )
            )
            continue
        missing = [needed - _supported(endpoint) for endpoint in allowed]
        if all(missing):
            lacking = sorted(set.intersection(*missing)) or sorted(set.union(*missing))
            problems.append(
                Problem(
                    spec.locate(field),
                    f"{model!r}: none of its endpoints supports {', '.join(lacking)}, which the job needs "
                    f"({_why(lacking, spec)}); choose another model, or drop what it cannot do",
                )
            )
        elif any(missing):
            serving = sum(1 for gaps in missing if not gaps)
            log.warning(
                "%s: only %d of %r's %d endpoints support %s; OpenRouter sends the job's requests to those",
                spec.locate(field),
                serving,
                model,
                len(allowed),
                ", ".join(sorted(set.union(*missing))),
            )
    if problems:
        raise SpecError(problems)


def _of_tier(listed: list[dict[str, Any]], spec: JobSpec, field: str, model: str) -> list[dict[str, Any]]:
    """The endpoints the job's requests can be routed to by their `service_tier`: a tier's endpoints (flex,
    priority) serve only requests that ask for that tier; a request for a tier the model has no endpoint of is
    routed as if it had asked none, at the standard price, which a warning says."""
    asked = tier_of(spec.params.get("service_tier"))
    tiered = [endpoint for endpoint in listed if tier_of(endpoint.get("service_tier")) == asked]
    if not tiered and listed and asked != STANDARD_TIER:
        log.warning(
            "%s: %r has no %s endpoint, so OpenRouter serves params.service_tier %s requests to it at the standard "
            "tier and price",
            spec.locate(field),
            model,
            asked,
            spec.params.get("service_tier"),
        )
        return [endpoint for endpoint in listed if tier_of(endpoint.get("service_tier")) == STANDARD_TIER]
    return tiered or listed


def _needed_parameters(spec: JobSpec, endpoints: dict[str, list[dict[str, Any]]]) -> set[str]:
    """The supported_parameters an endpoint must list to serve the job: what OpenRouter routes by even
    without require_parameters (response_format, tools), and with it every parameter the job sets."""
    needed = set()
    kind = (spec.response_format or {}).get("type")
    if kind == "json_schema":
        needed.add("structured_outputs")
    elif kind == "json_object":
        needed.add("response_format")
    if "tools" in spec.params:
        needed.add("tools")
    if (spec.provider or {}).get("require_parameters"):
        vocabulary = {p for listed in endpoints.values() for e in listed for p in e.get("supported_parameters") or []}
        named = {"max_tokens" if key == "max_completion_tokens" else key for key in spec.params}
        needed |= named & vocabulary
    return needed


def _supported(endpoint: dict[str, Any]) -> set[str]:
    """What an endpoint lists in supported_parameters."""
    return {str(p) for p in endpoint.get("supported_parameters") or []}


def _why(lacking: list[str], spec: JobSpec) -> str:
    reasons = {
        "structured_outputs": "response_format json_schema",
        "response_format": "response_format json_object",
        "tools": "params.tools",
    }
    return ", ".join(reasons.get(name, f"params.{name} with provider.require_parameters") for name in lacking)


def _allowed(endpoint: dict[str, Any], provider: dict[str, Any]) -> bool:
    """Whether the `provider` settings let requests go to this endpoint."""
    tag = str(endpoint.get("tag") or "").lower()
    name = str(endpoint.get("provider_name") or "").lower()

    def named(slugs: Any) -> bool:
        return any(str(s).lower() in (tag, name, tag.split("/")[0]) for s in slugs or [])

    if provider.get("only") and not named(provider["only"]):
        return False
    if provider.get("ignore") and named(provider["ignore"]):
        return False
    if (
        provider.get("quantizations")
        and str(endpoint.get("quantization") or "unknown") not in provider["quantizations"]
    ):
        return False
    limits: dict[str, Any] = provider["max_price"] if isinstance(provider.get("max_price"), dict) else {}
    prices: dict[str, Any] = endpoint["pricing"] if isinstance(endpoint.get("pricing"), dict) else {}
    for key in ("prompt", "completion"):
        price, limit = to_decimal(prices.get(key)), to_decimal(limits.get(key))
        if price is not None and limit is not None and price * 1_000_000 > limit:
            return False
    return True


def select_rows(
    dataset: Dataset, spec: JobSpec, *, limit: int | None, where: str | None, ids: frozenset[str] | None
) -> Dataset:
    """The input rows --where (a SQL WHERE clause over the input columns, in polars' SQL) and --ids select, among
    the first --limit rows; a clause polars cannot read, or that names no column of the input, is refused
    (SpecError) before anything is opened. CSV and JSONL cells are text: compare them as text, or CAST them."""
    import polars as pl

    from batchrunner.dataset import ROW_INDEX

    conditions = []
    if where is not None:
        try:
            conditions.append(pl.sql_expr(where))
        except Exception as exc:  # polars' SQL parser raises several kinds; all mean the same to the user
            raise SpecError(
                Problem("--where", f"{where!r} is not a SQL condition polars reads: {first_line(exc)}")
            ) from None
    if ids is not None:
        column = pl.col(spec.id_column) if spec.id_column else pl.col(ROW_INDEX)
        conditions.append(column.cast(pl.String).is_in(sorted(ids)))
    condition = pl.all_horizontal(conditions)
    if limit is not None:  # the first --limit rows: by their place in the input, as a window reads them
        condition = condition & (pl.col(ROW_INDEX) < limit)
    try:
        rows = int(dataset.frame.filter(condition).select(pl.len()).collect().item())
    except (pl.exceptions.PolarsError, OSError) as exc:
        # polars' list of valid columns holds batchrunner's own row-position column: the input's own follow
        said = first_line(exc).split("; valid columns:")[0]
        raise SpecError(
            Problem("--where", f"{where!r}: {said} (the input's columns: {', '.join(dataset.columns)})")
        ) from None
    if rows == 0:
        log.warning("--where/--ids select no row of %s: nothing to send", dataset.path.name)
    return dataset.only(condition, rows)
