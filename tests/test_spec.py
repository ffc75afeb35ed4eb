"""The job spec: what loads, and how each mistake is refused (field path, line, fix)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from batchrunner.errors import SpecError
from batchrunner.prompt import Template
from batchrunner.spec import OPENROUTER_BASE_URL, load_spec


def problems(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def test_valid_spec_loads_with_paths_resolved_against_its_folder(
    write_spec: Callable[..., Path], tmp_path: Path
) -> None:
    """Relative input/output paths resolve against the spec file's folder, not the cwd."""
    spec = load_spec(write_spec())
    assert spec.input == tmp_path / "tickets.csv"
    assert spec.output == tmp_path / "out" / "result.parquet"
    assert spec.models == ["openai/gpt-4o-mini"]


def test_single_model_string_is_accepted(write_spec: Callable[..., Path]) -> None:
    """`models: slug` means a list of one, and suffixes such as :free pass through."""
    spec = load_spec(write_spec(models="meta-llama/llama-3.3-70b-instruct:free", fallbacks="openrouter/auto"))
    assert spec.models == ["meta-llama/llama-3.3-70b-instruct:free"]
    assert spec.model_chain(spec.models[0]) == ["meta-llama/llama-3.3-70b-instruct:free", "openrouter/auto"]


def test_misspelt_key_names_line_and_suggests_the_fix(write_spec: Callable[..., Path]) -> None:
    """An unknown key is refused with its line and the closest known key."""
    path = write_spec("name: x\ninput: t.csv\noutput: o.csv\nmodles: [a/b]\nprompt: hi\n")
    message = problems(path)
    assert f"{path}:4: modles: unknown key; did you mean 'models'?" in message
    assert "models: required key is missing" in message


def test_wrong_type_names_the_field_and_value(write_spec: Callable[..., Path]) -> None:
    """A value of the wrong type names the field and shows what was given."""
    message = problems(write_spec(concurrency="lots"))
    assert "concurrency:" in message and "'lots'" in message


def test_empty_models_is_refused(write_spec: Callable[..., Path]) -> None:
    """An empty models list is an error on `models`."""
    assert "models:" in problems(write_spec(models=[]))


def test_malformed_yaml_names_the_line(write_spec: Callable[..., Path]) -> None:
    """Broken YAML is refused with the line of the fault, never a traceback."""
    path = write_spec("name: x\nmodels: [a/b\nprompt: hi\n")
    message = problems(path)
    assert "malformed YAML" in message and f"{path}:" in message


def test_missing_spec_file_is_refused(tmp_path: Path) -> None:
    """A spec path that does not exist is a SpecError, not an OSError."""
    assert "no such job spec file" in problems(tmp_path / "nope.yaml")


def test_params_typo_suggests_the_request_field(write_spec: Callable[..., Path]) -> None:
    """params keys are checked against OpenRouter's ChatRequest fields before any request."""
    message = problems(write_spec(params={"temprature": 0}))
    assert "params.temprature: unknown request parameter; did you mean 'temperature'?" in message


def test_params_of_the_wrong_type_are_refused_by_the_openapi_schema(write_spec: Callable[..., Path]) -> None:
    """A params value OpenRouter would reject (a string temperature) is refused up front."""
    message = problems(write_spec(params={"temperature": "hot"}))
    assert "params.temperature" in message and "'hot' is not of type" in message


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"params": {"temperature": float("nan")}}, "params.temperature"),
        ({"params": {"logit_bias": {"50256": float("-inf")}}}, "params.logit_bias.50256"),
        ({"params": {"stop": ["x"], "top_p": float("inf")}}, "params.top_p"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "number", "maximum": float("nan")}},
                }
            },
            "response_format.json_schema.schema.maximum",
        ),
    ],
)
def test_a_number_json_cannot_carry_is_refused_naming_it(
    write_spec: Callable[..., Path], changes: dict[str, object], field: str
) -> None:
    """YAML's .nan and .inf in a request's fields are refused before a request: the body would not be JSON (the
    schema's number check lets NaN through, and every row would fail at the server)."""
    message = problems(write_spec(**changes))
    assert f"{field}: not a finite number" in message


def test_a_number_json_cannot_carry_is_sent_to_another_server_with_a_warning(
    write_spec: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Another server may be Python's (vLLM reads -Infinity as json writes it): the job still loads, and the log
    names the field."""
    path = write_spec(params={"logit_bias": {"50256": float("-inf")}}, api={"base_url": "http://127.0.0.1:9/v1"})
    assert load_spec(path).params["logit_bias"] == {"50256": float("-inf")}
    assert "params.logit_bias.50256: not a finite number" in caplog.text


def test_provider_is_checked_against_the_openapi_schema(write_spec: Callable[..., Path]) -> None:
    """An unknown provider.sort value is named with OpenRouter's allowed values."""
    message = problems(write_spec(provider={"sort": "cheapest"}))
    assert "provider.sort" in message and "'price'" in message


def test_params_may_not_set_what_the_spec_owns(write_spec: Callable[..., Path]) -> None:
    """params.model is refused with where to set it instead; params.stream only where requests can stream."""
    message = problems(write_spec(params={"model": "a/b"}))
    assert "params.model: set this with the spec's `models` key" in message
    assert load_spec(write_spec(params={"stream": True})).params["stream"] is True
    assert "params.stream: only live chat requests stream" in problems(
        write_spec(params={"stream": True}, mode="batch")
    )


def test_prompt_and_messages_together_are_refused(write_spec: Callable[..., Path]) -> None:
    """Two ways to give the prompt at once is ambiguous and refused."""
    message = problems(write_spec(messages=[{"role": "user", "content": "{text}"}]))
    assert "either `messages` or `system`/`prompt`" in message


def test_no_prompt_is_refused(write_spec: Callable[..., Path]) -> None:
    """A spec without prompt or messages says how to add one."""
    assert "no prompt" in problems(write_spec(prompt=None))


def test_malformed_template_names_the_field_and_line(write_spec: Callable[..., Path]) -> None:
    """A template with an unclosed brace is refused at load, naming the template's field."""
    path = write_spec(prompt="Ticket {ticket_id")
    message = problems(path)
    assert "prompt: '{' is not closed" in message and f"{path}:" in message


def test_messages_template_error_names_the_message(write_spec: Callable[..., Path]) -> None:
    """In a messages list, the faulty message is named by index."""
    message = problems(
        write_spec(prompt=None, messages=[{"role": "user", "content": "ok"}, {"role": "user", "content": "bad }"}])
    )
    assert "messages[1].content" in message


def test_completions_endpoint_takes_a_raw_prompt(write_spec: Callable[..., Path]) -> None:
    """endpoint: completions refuses system/messages and renders the raw prompt text."""
    assert "takes a raw `prompt`" in problems(write_spec(endpoint="completions", system="x"))
    spec = load_spec(write_spec(endpoint="completions"))
    assert spec.prompt_template().render_text({"ticket_id": "T", "text": "t"}) == "Ticket T: t"


def test_unsupported_formats_are_refused(write_spec: Callable[..., Path]) -> None:
    """An input or output extension polars cannot handle is refused with the supported list."""
    message = problems(write_spec(input="data.xlsx", output="out.txt"))
    assert "input:" in message and "'.xlsx'" in message and "output:" in message


def test_base_url_precedence(write_spec: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """api.base_url wins over OPENROUTER_BASE_URL, which wins over OpenRouter's URL."""
    monkeypatch.delenv("OPENROUTER_BASE_URL", raising=False)
    assert load_spec(write_spec()).base_url() == OPENROUTER_BASE_URL
    monkeypatch.setenv("OPENROUTER_BASE_URL", "http://localhost:8000/v1/")
    assert load_spec(write_spec()).base_url() == "http://localhost:8000/v1"
    assert (
        load_spec(write_spec(api={"base_url": "http://127.0.0.1:9/api/v1"})).base_url() == "http://127.0.0.1:9/api/v1"
    )


def test_overrides_replace_keys(write_spec: Callable[..., Path]) -> None:
    """Command-line overrides replace spec keys and are validated like them."""
    spec = load_spec(write_spec(), overrides={"concurrency": 2})
    assert spec.concurrency == 2
    with pytest.raises(SpecError):
        load_spec(write_spec(), overrides={"concurrency": 0})


def test_example_jobs_are_valid() -> None:
    """Every job in jobs/ loads: the examples in the README and docs stay true."""
    jobs = sorted(Path(__file__).resolve().parent.parent.joinpath("jobs").glob("*.yaml"))
    assert len(jobs) >= 3
    for job in jobs:
        spec = load_spec(job)
        assert spec.input.exists(), job


def test_content_parts_and_the_media_shorthand_name_their_fields(write_spec: Callable[..., Path]) -> None:
    """Each templated field of a part, and each `images:`/`files:`/`audio:` column, is a field with its own
    path and kind; the shorthand joins the last user message after its text."""
    spec = load_spec(
        write_spec(
            prompt=None,
            messages=[
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Ticket {ticket_id}"},
                        {"type": "image_url", "image_url": {"url": "https://cdn.example.com/{ticket_id}.png"}},
                    ],
                },
            ],
            files=["text"],
            audio="subject",
        )
    )
    assert [(field, kind) for field, kind, _ in spec.media_fields()] == [
        ("messages[1].content[1].image_url.url", "image"),
        ("files[0]", "file"),
        ("audio[0]", "audio"),
    ]
    assert [field for field, _ in spec.template_fields()][:2] == [
        "messages[0].content[0].text",
        "messages[1].content[0].text",
    ]
    user = spec.prompt_template().messages[1]
    assert not isinstance(user.content, Template)
    assert [part.type for part in user.content] == ["text", "image_url", "file", "input_audio"]


def test_media_mistakes_name_the_field(write_spec: Callable[..., Path]) -> None:
    """A part of an unknown type, a malformed placeholder inside a part, an image in a system message, and
    media with no user message to join are each refused at their field."""
    unknown = problems(
        write_spec(prompt=None, messages=[{"role": "user", "content": [{"type": "picture", "url": "x"}]}])
    )
    assert "messages[0].content[0]: Input tag 'picture'" in unknown
    broken = problems(
        write_spec(
            prompt=None, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "{oops"}}]}]
        )
    )
    assert "messages[0].content[0].image_url.url: '{' is not closed" in broken
    system = problems(
        write_spec(
            prompt=None, messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "{x}"}}]}]
        )
    )
    assert "a system message takes text parts only, not image_url" in system
    lonely = problems(write_spec(prompt=None, messages=[{"role": "system", "content": "hi"}], images=["photo"]))
    assert "`messages` has none" in lonely


KEY = "sk-or-v1-0123456789abcdef"


@pytest.mark.parametrize(
    "api", [{"api_key_env": KEY}, {"endpoints": [{"base_url": "http://a:1/v1", "api_key_env": KEY}]}]
)
def test_a_key_written_as_api_key_env_is_refused_without_printing_it(
    write_spec: Callable[..., Path], api: dict[str, object]
) -> None:
    """A newcomer told `api.api_key: unknown key; did you mean 'api_key_env'?` writes the key there. Before, the
    run said `$sk-or-v1-... is not set ... export sk-or-v1-...=sk-or-v1-...`: the key printed on stderr (and
    into a cron log), which the README promises never happens. Now the spec is refused naming the field, saying
    it holds a variable's name, and the value is not repeated."""
    message = problems(write_spec(api=api))
    assert "api_key_env: not an environment variable's name" in message
    assert KEY not in message and "sk-or-v1-0123" not in message


@pytest.mark.parametrize("text", ["api_key: KEY\n", "api: {api_key: KEY}\n", "openrouter_api_key: KEY\n"])
def test_a_key_in_the_spec_is_refused_saying_where_keys_go(write_spec: Callable[..., Path], text: str) -> None:
    """`api_key: sk-or-v1-...` in the spec. Before: `unknown key; did you mean 'api'?` (then 'api_key_env'), a
    hint that leads the key into the spec. Now: keys are read from the environment only, and which variable."""
    path = write_spec("name: x\ninput: t.csv\noutput: o.csv\nmodels: [a/b]\nprompt: hi\n" + text.replace("KEY", KEY))
    message = problems(path)
    assert f"{path}:6:" in message
    assert "a key is never read from the spec" in message and "OPENROUTER_API_KEY" in message
    assert "did you mean" not in message
    assert KEY not in message


@pytest.mark.parametrize("name", ["tickets.csv", "reviews.parquet", "rows.jsonl", "sheet.xlsx"])
def test_a_data_file_given_as_the_job_is_refused_pointing_at_init(tmp_path: Path, name: str) -> None:
    """`batchrunner run data.csv`, the newcomer's first guess. Before: 'malformed YAML: mapping values are not
    allowed here' (a CSV), or a codec's 'can't decode byte 0x80' (Parquet). Now: it is a data file, and init
    writes a spec for it."""
    path = tmp_path / name
    path.write_bytes(b"id,text\n1,a: b\n" if name.endswith(".csv") else b"PAR1\x80\x00\xff")
    message = problems(path)
    assert f"{path}: a data file, not a job spec" in message
    assert f"batchrunner init {path}" in message


def test_a_folder_given_as_the_job_is_refused_saying_so(tmp_path: Path) -> None:
    """`batchrunner run jobs`: before, '[Errno 21] Is a directory'; now it says a job is one spec file."""
    assert f"{tmp_path}: a folder, not a job spec; give the spec's file" in problems(tmp_path)
