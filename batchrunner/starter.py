"""A starter job spec from a data file (`batchrunner init`): its columns read, an id column and the
text columns guessed, every choice commented so the user knows what to change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import yaml

from batchrunner.dataset import open_dataset, scan
from batchrunner.errors import Problem, SpecError

SCHEMA_FILE = (
    Path(__file__).resolve().parent / "schemas" / "job.schema.json"
)  # `batchrunner schema`, kept in the package
SAMPLE_ROWS = 200  # rows looked at to tell text columns from codes and numbers


def starter_spec(data: Path, spec_path: Path) -> str:
    """The text of a commented job spec over `data`, for a spec written at `spec_path`."""
    dataset = open_dataset(data, id_column=None)  # read to its end: a file that breaks is refused now
    sample = scan(data).head(SAMPLE_ROWS).collect()
    id_column = _id_column(data, dataset.columns)
    texts = _text_columns(sample, exclude={id_column} if id_column else set())
    if not texts:
        raise SpecError(Problem(str(data), "has no text column to put in a prompt; add one, or write the spec by hand"))
    relative = Path(os.path.relpath(data.resolve(), spec_path.resolve().parent))
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in data.stem).strip("-._") or "job"
    prompt = "\n".join(f"  {column.replace('_', ' ').capitalize()}: {{{column}}}" for column in texts)
    id_line = (
        f"id_column: {_scalar(id_column)}              # unique and never empty in {data.name}: rows are known by it"
        if id_column
        else "# id_column: ...             # no unique column found: rows are known by their position, so inserting\n"
        "                             # or reordering rows re-sends those after it; add an id column if you can"
    )
    schema = Path(os.path.relpath(SCHEMA_FILE, spec_path.resolve().parent)).as_posix()
    return f"""# yaml-language-server: $schema={schema}
# A starter job over {data.name} (batchrunner init). Try it without a key or cost:
#   batchrunner run {spec_path.name} --sandbox
#   batchrunner run {spec_path.name} --dry-run       (the exact requests, sent nowhere)
name: {name}
input: {_scalar(relative.as_posix())}
{id_line}
output: out/{name}.parquet
models: [openai/gpt-4o-mini]      # `batchrunner models` lists them with prices
system: You are a careful assistant. Answer briefly.
prompt: |-
  Read this record and say what it is about.
{prompt}
params:
  temperature: 0
  max_tokens: 200                 # also bounds what each request can cost
budget_usd: 5.00                  # the most one run may spend
# A budget needs each model's prices. OpenRouter lists them; for a server that does not (LiteLLM, vLLM,
# llama-server: `api: {{base_url: ...}}`), give them here, in USD per million tokens (a listed price wins):
# prices:
#   openai/gpt-4o-mini: {{prompt_per_mtok_usd: 0.15, completion_per_mtok_usd: 0.60}}
# For typed answers in their own columns, describe them:
# response_format:
#   type: json_schema
#   json_schema:
#     name: label
#     strict: true
#     schema:
#       type: object
#       properties:
#         label: {{type: string, enum: [positive, negative, neutral]}}
#       required: [label]
#       additionalProperties: false
"""


def _scalar(text: str) -> str:
    """`text` as a YAML value on a line of its own (a comment may follow): plain where YAML reads it back as this
    text, else double-quoted (a JSON string is one). A column named `#id`, `yes`, `null`, `123` or `id: x` would
    otherwise be a comment, a boolean, null, a number or a mapping."""
    try:
        plain = "#" not in text and yaml.safe_load(f"key: {text}") == {"key": text}
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text, ensure_ascii=False)


def _id_column(data: Path, columns: list[str]) -> str | None:
    """The first column that is unique and never empty, preferring one named like an id."""
    frame = scan(data)
    ordered = sorted(
        columns, key=lambda c: (not (c.lower() == "id" or c.lower().endswith(("_id", "id"))), columns.index(c))
    )
    for column in ordered:
        found = frame.select(
            pl.col(column).null_count().alias("nulls"), pl.col(column).is_unique().all().alias("unique")
        )
        row = found.collect().row(0, named=True)
        if row["nulls"] == 0 and row["unique"]:
            return column
    return None


def _text_columns(sample: pl.DataFrame, *, exclude: set[str]) -> list[str]:
    """Columns of prose: strings of several words on average (codes, numbers and ids are left out)."""
    found = []
    for column, dtype in sample.schema.items():
        if column in exclude or dtype != pl.String() or not _nameable(column):
            continue
        values = [v for v in sample[column].to_list() if isinstance(v, str) and v.strip()]
        if not values or all(_is_number(v) for v in values):
            continue
        words = sum(len(v.split()) for v in values) / len(values)
        if words >= 2:
            found.append(column)
    return found or [c for c, d in sample.schema.items() if d == pl.String() and c not in exclude and _nameable(c)][:1]


def _nameable(column: str) -> bool:
    """Whether a prompt's {placeholder} can name the column (a name with a brace cannot)."""
    return "{" not in column and "}" not in column


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
