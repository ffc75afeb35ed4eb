"""Everything that can refuse a job, checked before the first request: the key, the input
read to its end, the columns, the job's files and whether the output can be written.

A job refused here costs nothing: each problem is a SpecError naming the field and the fix
(exit 2). Nothing here sends a request.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

from batchrunner.costs import PriceTable
from batchrunner.dataset import Dataset, open_dataset
from batchrunner.errors import OutputError, Problem, SpecError
from batchrunner.output import extra_columns, probe_output, summary_path
from batchrunner.records import RESULT_SCHEMA
from batchrunner.spec import JobSpec, is_openrouter
from batchrunner.structured import Mode, strict_mode_warnings

log = logging.getLogger("batchrunner")


def api_key(spec: JobSpec, base_url: str) -> str | None:
    """The key from the environment; SpecError when OpenRouter needs one and it is missing or malformed."""
    env = spec.api.api_key_env
    key = os.environ.get(env, "").strip()
    if any(ord(char) < 32 or ord(char) == 127 for char in key):
        raise SpecError(
            Problem("api.api_key_env", f"${env} contains a line break or control character; set it to the key alone")
        )
    openrouter = is_openrouter(base_url)
    if not key:
        if openrouter:
            raise SpecError(
                Problem(
                    "api.api_key_env",
                    f"${env} is not set; create a key at https://openrouter.ai/settings/keys and `export {env}=sk-or-v1-...`, or try the job on the sandbox with --sandbox",
                )
            )
        return None
    if openrouter and not key.startswith("sk-or-v1-"):
        raise SpecError(
            Problem(
                "api.api_key_env",
                f"${env} does not look like an OpenRouter key (they start with sk-or-v1-); check the variable",
            )
        )
    return key


def prepare(spec: JobSpec) -> Dataset:
    """Check the job's files and open the input, read to its end, against the spec: columns, ids, clashes."""
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
    clashes = [c for c in dataset.columns if c in RESULT_SCHEMA]
    if clashes:
        raise SpecError(
            Problem(
                spec.locate("input"),
                f"input column(s) {', '.join(map(repr, clashes))} clash with output columns of the same name; rename them in the input",
            )
        )
    taken = set(dataset.columns) | set(RESULT_SCHEMA)
    clashing = [c for c in extra_columns(spec) if c in taken]
    if clashing:
        raise SpecError(
            Problem(
                spec.locate("response_format"),
                f"schema properties {', '.join(map(repr, clashing))} would be output columns that already exist; set output_prefix (e.g. output_prefix: label_)",
            )
        )
    if spec.response_format:
        for warning in strict_mode_warnings(Mode.of(spec.response_format).schema or {}):
            log.warning("response_format: %s", warning)
    return dataset


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


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same inode if both exist, else the same resolved path,
    compared without case (a case-insensitive filesystem would make them one file)."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return os.path.realpath(a).casefold() == os.path.realpath(b).casefold()


def check_output(spec: JobSpec, dataset: Dataset) -> None:
    """The output can be created in its folder, in its format, with every column it will have."""
    try:
        probe_output(dataset, spec, spec.output)
    except (OutputError, OSError) as exc:
        raise SpecError(
            Problem(
                spec.locate("output"),
                f"cannot write {spec.output} ({exc}); choose a folder you can write to, or pass --output",
            )
        ) from None


def check_models(spec: JobSpec, catalog: PriceTable, *, strict: bool) -> None:
    """Every model of the job is one the server lists at /models. Against OpenRouter (or the sandbox) a
    model it does not list is refused, with the closest slugs; another server may answer any name
    (llama-server ignores it), so there it is a warning. Nothing to check when /models was not read."""
    if not catalog.ids:
        return
    named = [(f"models[{i}]", m) for i, m in enumerate(spec.models)]
    named += [(f"fallbacks[{i}]", m) for i, m in enumerate(spec.fallbacks)]
    problems = []
    for field, model in named:
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
    if problems:
        raise SpecError(problems)
