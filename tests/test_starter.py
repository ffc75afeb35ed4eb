"""starter.py and the commands that help write a job: init, schema, validate, run --dry-run."""

from __future__ import annotations

import json
import shutil
from decimal import Decimal
from pathlib import Path

import jsonschema
import polars as pl
import pytest
import yaml
from click.testing import CliRunner, Result

from batchrunner.cli import main
from batchrunner.spec import json_schema

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_init_from_the_sample_reviews_runs_on_the_sandbox_unedited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`init sample_data/reviews.parquet` then `run job.yaml --sandbox` works without editing: the id column and the
    text columns are guessed, paths are relative to the spec, the $schema comment points at the packaged schema."""
    shutil.copy(ROOT / "sample_data" / "reviews.parquet", tmp_path / "reviews.parquet")
    monkeypatch.chdir(tmp_path)
    made = invoke("init", "reviews.parquet")
    assert made.exit_code == 0, made.output
    text = (tmp_path / "job.yaml").read_text()
    spec = yaml.safe_load(text)
    assert spec["input"] == "reviews.parquet" and spec["id_column"] == "review_id"
    assert "{review}" in spec["prompt"] and "{product}" in spec["prompt"] and "{stars}" not in spec["prompt"]
    schema_path = text.splitlines()[0].split("$schema=")[1]
    assert (tmp_path / schema_path).resolve() == (ROOT / "batchrunner" / "schemas" / "job.schema.json").resolve()
    ran = invoke("run", "job.yaml", "--sandbox", "--limit", "5")
    assert ran.exit_code == 0, ran.output
    assert pl.read_parquet(tmp_path / "out" / "reviews.parquet").height == 5
    again = invoke("init", "reviews.parquet")
    assert again.exit_code == 2 and "--force" in again.stderr
    assert invoke("init", "reviews.parquet", "--force").exit_code == 0


def test_inits_prices_comment_uncommented_is_a_valid_spec(tmp_path: Path) -> None:
    """The starter says how to give prices to a server that lists none; uncommented, its example loads."""
    from batchrunner.spec import load_spec

    shutil.copy(ROOT / "sample_data" / "reviews.parquet", tmp_path / "reviews.parquet")
    assert invoke("init", str(tmp_path / "reviews.parquet"), "--out", str(tmp_path / "job.yaml")).exit_code == 0
    text = (tmp_path / "job.yaml").read_text()
    assert "LiteLLM" in text and "# prices:" in text
    uncommented = text.replace("# prices:", "prices:").replace("#   openai/gpt-4o-mini: {", "  openai/gpt-4o-mini: {")
    (tmp_path / "priced.yaml").write_text(uncommented)
    spec = load_spec(tmp_path / "priced.yaml")
    assert spec.prices["openai/gpt-4o-mini"].completion_per_mtok_usd == Decimal("0.60")


def test_init_without_a_unique_column_says_rows_are_known_by_position(tmp_path: Path) -> None:
    """No unique, never-empty column: id_column is left commented out with the warning about positions."""
    pl.DataFrame({"kind": ["a", "a"], "note": ["the app is slow today", "the app is slow today"]}).write_csv(
        tmp_path / "notes.csv"
    )
    made = invoke("init", str(tmp_path / "notes.csv"), "--out", str(tmp_path / "notes.yaml"))
    assert made.exit_code == 0
    text = (tmp_path / "notes.yaml").read_text()
    assert "# id_column:" in text and "by their position" in text and "{note}" in text


@pytest.mark.parametrize("id_name", ["#id", "id: x", "- id", "{id}", "'id", "yes", "null", "123", "*id", "%id", "@id"])
def test_init_writes_a_valid_spec_whatever_the_id_columns_name(tmp_path: Path, id_name: str) -> None:
    """A column name YAML reads as something else (a comment, a mapping, a boolean, null, a number, an alias) is
    written quoted. Before: `id_column: #id` loaded as no id column at all, `yes` as true, `id: x` as malformed
    YAML: the starter failed to validate, or ran keyed by position, where the guide says it works unedited."""
    from batchrunner.spec import load_spec

    data = tmp_path / "in #1: data.parquet"
    pl.DataFrame({id_name: ["a", "b"], "body": ["the app is slow today", "a crash on start"]}).write_parquet(data)
    made = invoke("init", str(data), "--output", str(tmp_path / "job.yaml"))
    assert made.exit_code == 0, made.output
    spec = load_spec(tmp_path / "job.yaml")
    assert (spec.id_column, spec.input) == (id_name, data)
    assert "{body}" in (spec.prompt or "")


def test_init_leaves_out_of_the_prompt_a_column_no_placeholder_can_name(tmp_path: Path) -> None:
    """A text column named with a brace (`notes {raw}`) cannot be a {placeholder}: before, init wrote it into the
    prompt and the starter was refused ('{' is not closed). Now the prompt names the other text columns."""
    from batchrunner.spec import load_spec

    data = tmp_path / "in.csv"
    pl.DataFrame(
        {"id": ["a", "b"], "notes {raw}": ["the app is slow", "it crashes a lot"], "body": ["one two", "three four"]}
    ).write_csv(data)
    made = invoke("init", str(data), "--output", str(tmp_path / "job.yaml"))
    assert made.exit_code == 0, made.output
    assert (load_spec(tmp_path / "job.yaml").prompt or "").endswith("Body: {body}")


def test_the_packaged_schema_is_what_the_generator_makes_and_every_example_fits_it() -> None:
    """batchrunner/schemas/job.schema.json equals `batchrunner schema` (regenerate it when the spec changes), every
    job in jobs/ points at it and validates against it, and a misspelt key does not."""
    packaged = json.loads((ROOT / "batchrunner" / "schemas" / "job.schema.json").read_text())
    printed = json.loads(invoke("schema").stdout)
    assert packaged == printed == json_schema()
    validator = jsonschema.Draft202012Validator(packaged)
    for job in JOBS:
        assert job.read_text().startswith("# yaml-language-server: $schema=../batchrunner/schemas/job.schema.json\n")
        assert list(validator.iter_errors(yaml.safe_load(job.read_text()))) == [], job.name
    assert list(validator.iter_errors({**yaml.safe_load(JOBS[0].read_text()), "modles": ["x"]}))
    assert packaged["properties"]["budget_usd"]["description"].startswith("The most one run may spend")


@pytest.mark.parametrize("job", JOBS, ids=[job.stem for job in JOBS])
def test_dry_run_shows_the_requests_of_each_example_and_sends_nothing(job: Path, tmp_path: Path) -> None:
    """--dry-run --format json on every example job: the first rows' exact bodies (models chain, checkpoint key),
    images by name, size and type (never base64), the estimate, and no checkpoint or output created."""
    copy = tmp_path / "jobs"
    shutil.copytree(ROOT / "jobs", copy)
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    shown = invoke("run", str(copy / job.name), "--dry-run", "--sandbox", "--format", "json", "--limit", "2")
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.stdout)
    assert report["sent"] == 0 and report["requests"] and isinstance(report["estimate"], dict)
    spec = yaml.safe_load(job.read_text())
    models = spec["models"] if isinstance(spec["models"], list) else [spec["models"]]
    assert {entry["model"] for entry in report["requests"]} <= set(models)
    assert len({entry["row_id"] for entry in report["requests"]}) == 2
    for entry in report["requests"]:
        body = entry["body"]
        assert body["model"] == entry["model"] and len(entry["checkpoint_key"]) == 32
        assert entry["models_chain"][0] == entry["model"]
        assert "base64" not in json.dumps(body)
        if "images" in spec:
            assert body["messages"][-1]["content"][1]["image_url"]["url"].startswith("<image/png, ")
    assert not (tmp_path / "out").exists(), "a dry run creates no checkpoint and no output"


def test_validate_exits_0_for_a_good_job_and_2_naming_each_problem(tmp_path: Path) -> None:
    """`validate` runs the checks `run` makes before its first request, sends no completion: 0 and what it checked,
    or 2 with the problem (here a model with no endpoint for the job's structured answers)."""
    copy = tmp_path / "jobs"
    shutil.copytree(ROOT / "jobs", copy)
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    good = invoke("validate", str(copy / "ticket_triage.yaml"), "--sandbox")
    assert good.exit_code == 0, good.output
    assert "ok" in good.stdout and "input: " in good.stdout
    spec = yaml.safe_load((copy / "ticket_triage.yaml").read_text())
    spec.update(models=["deepseek/deepseek-r1"], fallbacks=[])
    (copy / "bad.yaml").write_text(yaml.safe_dump(spec))
    bad = invoke("validate", str(copy / "bad.yaml"), "--sandbox")
    assert bad.exit_code == 2 and "none of its endpoints supports structured_outputs" in bad.stderr
    spec.update(models=["openrouter/auto"], response_format=None, budget_usd=1)  # a budget with no price to keep it
    (copy / "unpriced.yaml").write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}))
    unpriced = invoke("validate", str(copy / "unpriced.yaml"), "--sandbox")
    assert unpriced.exit_code == 2 and "a budget needs them" in unpriced.stderr
    assert not list((tmp_path / "out").glob("*")), "the output was only probed: no checkpoint, no output"
