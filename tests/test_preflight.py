"""The checks that refuse a job before the first request: the job's files, the input, the output."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
import yaml

from batchrunner.costs import PriceTable
from batchrunner.errors import SpecError
from batchrunner.preflight import check_endpoints, check_models, prepare, same_file
from batchrunner.runner import run_job
from batchrunner.sandbox import Sandbox
from batchrunner.spec import JobSpec, load_spec


def test_output_equal_to_the_input_is_refused(write_spec: Callable[..., Path], tickets_csv: Path) -> None:
    """`output:` naming the input (here through `..`) is refused before the input can be overwritten."""
    spec = load_spec(write_spec(output=f"out/../{tickets_csv.name}"))
    with pytest.raises(SpecError, match=r"output: .* is the job's input .* choose another output path"):
        prepare(spec)
    assert tickets_csv.read_text().startswith("ticket_id,"), "the input is untouched"


def test_output_reaching_the_input_through_a_symlink_is_refused(
    write_spec: Callable[..., Path], tickets_csv: Path, tmp_path: Path
) -> None:
    """A symlinked folder or file that leads to the input is the input."""
    (tmp_path / "linked").symlink_to(tmp_path)
    with pytest.raises(SpecError, match="is the job's input"):
        prepare(load_spec(write_spec(output=f"linked/{tickets_csv.name}")))
    os.symlink(tickets_csv, tmp_path / "alias.csv")
    with pytest.raises(SpecError, match="is the job's input"):
        prepare(load_spec(write_spec(output="alias.csv")))


def test_command_line_output_equal_to_the_input_is_refused(write_spec: Callable[..., Path], tickets_csv: Path) -> None:
    """`run --output` and `export --output` go through the same check as the spec's key."""
    spec = load_spec(write_spec(), overrides={"output": str(tickets_csv)})
    with pytest.raises(SpecError, match="is the job's input"):
        prepare(spec)


@pytest.mark.parametrize("link", [os.symlink, os.link])
def test_a_summary_path_that_is_the_input_is_refused(
    write_spec: Callable[..., Path], tickets_csv: Path, tmp_path: Path, link: Callable[[Path, Path], None]
) -> None:
    """The summary written beside the output (out/result.summary.json) may not be the input either: here the
    input is a symbolic or hard link to that file, which writing the summary would overwrite."""
    (tmp_path / "out").mkdir()
    summary = tmp_path / "out" / "result.summary.json"
    summary.write_bytes(tickets_csv.read_bytes())
    link(summary, tmp_path / "linked.csv")
    with pytest.raises(SpecError, match=r"output: .*result\.summary\.json is the job's input .* choose another output"):
        prepare(load_spec(write_spec(input="linked.csv")))
    assert summary.read_bytes() == tickets_csv.read_bytes(), "the input is untouched"


@pytest.mark.parametrize("target", ["input", "output"])
def test_checkpoint_equal_to_the_input_or_the_output_is_refused(
    write_spec: Callable[..., Path], tickets_csv: Path, target: str
) -> None:
    """The checkpoint (SQLite) may overwrite neither the input nor the output file."""
    path = tickets_csv.name if target == "input" else "out/result.parquet"
    spec = load_spec(write_spec(checkpoint=path))
    with pytest.raises(SpecError, match=f"checkpoint: .* is the job's {target}"):
        prepare(spec)


def test_same_file_sees_hard_links_and_case(tmp_path: Path) -> None:
    """Hard links are one file; paths differing only in case are treated as one (case-insensitive filesystems)."""
    original = tmp_path / "data.csv"
    original.write_text("x\n")
    os.link(original, tmp_path / "hard.csv")
    assert same_file(original, tmp_path / "hard.csv")
    assert same_file(tmp_path / "out" / "Result.parquet", tmp_path / "out" / "result.parquet")
    assert not same_file(original, tmp_path / "other.csv")


def test_an_unlisted_model_on_another_server_is_a_warning(
    write_spec: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A server that is not OpenRouter may answer any model name (llama-server does): warn, do not refuse;
    against OpenRouter the same model is refused with suggestions."""
    spec = load_spec(write_spec(models=["my-local-model"], api={"base_url": "http://127.0.0.1:8080/v1"}))
    catalog = PriceTable([{"id": "llama-3.2-1b", "pricing": {"prompt": "0", "completion": "0"}}])
    check_models(spec, catalog, strict=False)
    assert "'my-local-model' is not listed at http://127.0.0.1:8080/v1/models; sending it anyway" in caplog.text
    with pytest.raises(SpecError, match="not a model the server lists"):
        check_models(spec, catalog, strict=True)
    check_models(spec, PriceTable([]), strict=True)  # /models could not be read: nothing to check against


def test_media_columns_are_checked_before_anything_is_sent(tmp_path: Path) -> None:
    """A media column of numbers is refused; in batch mode a bytes column, a local path and a template that is
    not an https URL are refused (the Batch API takes URLs only); https URLs pass in both modes."""
    pl.DataFrame(
        {"id": ["1", "2"], "n": [1, 2], "raw": [b"\x89PNG", b"\x89PNG"], "url": ["https://x/a.png", "https://x/b.png"]}
    ).write_parquet(tmp_path / "in.parquet")

    def check(**changes: object) -> str:
        spec = {"name": "m", "input": "in.parquet", "id_column": "id", "output": "out.parquet", "models": ["a/b"]}
        (tmp_path / "job.yaml").write_text(yaml.safe_dump({**spec, "prompt": "Describe", **changes}))
        try:
            prepare(load_spec(tmp_path / "job.yaml"))
        except SpecError as exc:
            return str(exc)
        return ""

    assert "'n' holds Int64 values, not paths, https URLs or bytes" in check(images=["n"])
    assert check(images=["raw"]) == "" and check(images=["url"]) == ""
    assert check(images=["url"], mode="batch") == ""
    assert "'raw' holds bytes, and the Batch API takes media as https URLs only" in check(images=["raw"], mode="batch")
    parts = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "images/{id}.png"}}]
    templated = check(prompt=None, messages=[{"role": "user", "content": parts}], mode="batch")
    assert "messages[0].content[1].image_url.url: mode batch sends media as https URLs only" in templated


async def test_a_model_with_no_endpoint_for_the_job_is_refused_before_any_completion(
    write_spec: Callable[..., Path],
) -> None:
    """The sandbox lists deepseek-r1's endpoints without structured outputs: a json_schema job on it is refused
    (exit 2) naming the missing capability, before any completion request; `provider.only` naming no provider
    of the model is refused too; a model only one of whose two providers can serve the job is a warning."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": schema}}
    async with Sandbox() as sandbox:
        api = {"base_url": sandbox.base_url}

        async def refusal(**changes: object) -> str:
            with pytest.raises(SpecError) as caught:
                await run_job(load_spec(write_spec(api=api, **changes)))
            return str(caught.value)

        missing = await refusal(models=["deepseek/deepseek-r1"], response_format=response_format)
        only = await refusal(provider={"only": ["groq"]})
        cheap = await refusal(provider={"max_price": {"prompt": 0.01}})
        assert sandbox.stats.requests == 0
        warned = await run_job(
            load_spec(
                write_spec(api=api, models=["meta-llama/llama-3.3-70b-instruct"], response_format=response_format)
            )
        )
    assert "models[0]: 'deepseek/deepseek-r1': none of its endpoints supports structured_outputs" in missing
    assert "(response_format json_schema)" in missing
    assert "provider: 'openai/gpt-4o-mini': the `provider` settings" in only and "(openai)" in only
    assert "leave none of its endpoints" in cheap
    assert warned.report.summary.ok == 12


def test_an_endpoint_of_a_tier_serves_only_requests_asking_that_tier(caplog: pytest.LogCaptureFixture) -> None:
    """A flex endpoint is no endpoint for a job asking no tier (its provider.only may leave it); a flex job is judged
    by the flex endpoints, and on a model without one is warned that it is served at the standard tier and price."""
    spec_fields = {"name": "x", "input": "in.csv", "output": "out.csv", "models": ["a/b"], "prompt": "hi"}
    standard = {"tag": "p", "provider_name": "P", "supported_parameters": ["max_tokens"], "service_tier": None}
    flex = {"tag": "p/flex", "provider_name": "P", "supported_parameters": ["tools"], "service_tier": "flex"}
    needs_tools = {**spec_fields, "params": {"tools": [{"type": "function", "function": {"name": "f"}}]}}
    with pytest.raises(SpecError, match="none of its endpoints supports tools"):
        check_endpoints(JobSpec.model_validate(needs_tools), {"a/b": [standard, flex]})
    flexed = {**needs_tools, "params": {**needs_tools["params"], "service_tier": "flex"}}
    check_endpoints(JobSpec.model_validate(flexed), {"a/b": [standard, flex]})
    with caplog.at_level("WARNING", logger="batchrunner"):
        check_endpoints(
            JobSpec.model_validate({**spec_fields, "params": {"service_tier": "flex"}}), {"a/b": [standard]}
        )
    assert "'a/b' has no flex endpoint" in caplog.text and "at the standard tier and price" in caplog.text


def test_require_parameters_needs_every_parameter_on_one_endpoint() -> None:
    """With provider.require_parameters, a parameter no endpoint lists is missing; without it, only
    response_format and tools are routed by."""
    spec_fields = {"name": "x", "input": "in.csv", "output": "out.csv", "models": ["a/b"], "prompt": "hi"}
    endpoints = {"a/b": [{"tag": "p", "provider_name": "P", "supported_parameters": ["max_tokens", "seed"]}]}
    other = {"c/d": [{"tag": "q", "supported_parameters": ["top_k"]}]}  # the vocabulary: what any endpoint lists
    lenient = JobSpec.model_validate({**spec_fields, "params": {"top_k": 3, "seed": 1}})
    check_endpoints(lenient, {**endpoints, **other})
    strict = JobSpec.model_validate({**spec_fields, "params": {"top_k": 3}, "provider": {"require_parameters": True}})
    with pytest.raises(SpecError, match="none of its endpoints supports top_k"):
        check_endpoints(strict, {**endpoints, **other})
