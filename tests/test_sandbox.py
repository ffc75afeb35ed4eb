"""The sandbox answers in OpenRouter's shapes, refuses what OpenRouter refuses, and simulates limits."""

from __future__ import annotations

import base64
import csv
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest

from batchrunner import openapi
from batchrunner.sandbox import Sandbox, SandboxConfig, request_key, senses

SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["bug", "billing"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "urgent": {"type": "boolean"},
        "detail": {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]},
    },
    "required": ["category", "score", "confidence", "tags", "urgent", "detail"],
    "additionalProperties": False,
}


def chat(content: Any = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}


async def post(
    sandbox: Sandbox, body: dict[str, Any], path: str = "/chat/completions", **headers: str
) -> tuple[int, dict[str, Any], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(sandbox.base_url + path, json=body, headers=headers) as response,
    ):
        return response.status, dict(response.headers), json.loads(await response.text())


async def test_answers_validate_against_chat_result() -> None:
    """A chat answer has the shape of OpenRouter's ChatResult, with usage and cost."""
    async with Sandbox() as sandbox:
        status, _, payload = await post(sandbox, chat())
    assert status == 200
    assert openapi.validation_errors("ChatResult", payload) == []
    assert payload["usage"]["cost"] > 0 and payload["provider"] == "OpenAI"


async def test_json_schema_answers_satisfy_the_schema() -> None:
    """With response_format json_schema, each answer is JSON that validates against the schema."""
    response_format = {"type": "json_schema", "json_schema": {"name": "t", "strict": True, "schema": SCHEMA}}
    async with Sandbox() as sandbox:
        for i in range(20):
            _, _, payload = await post(sandbox, chat(f"ticket {i}", response_format=response_format))
            jsonschema.validate(json.loads(payload["choices"][0]["message"]["content"]), SCHEMA)


async def test_answers_are_deterministic() -> None:
    """The same request gets the same answer, across sandboxes."""
    async with Sandbox() as first, Sandbox() as second:
        a = (await post(first, chat("same")))[2]["choices"][0]["message"]["content"]
        b = (await post(second, chat("same")))[2]["choices"][0]["message"]["content"]
    assert a == b


async def test_invalid_requests_are_refused_like_openrouter() -> None:
    """A body that breaks ChatRequest, or names no valid model, gets a 400 error envelope."""
    async with Sandbox() as sandbox:
        status, _, payload = await post(sandbox, chat(temperature="hot"))
        assert status == 400 and "temperature" in payload["error"]["message"]
        status, _, payload = await post(sandbox, {**chat(), "model": "gpt4"})
        assert status == 400 and "not a valid model ID" in payload["error"]["message"]


async def test_models_fallback_array_is_honoured() -> None:
    """OpenRouter's own `models` array: the first model that is up answers, and says so."""
    config = SandboxConfig(down_models={"openai/gpt-4o-mini"})
    async with Sandbox(config) as sandbox:
        _, _, payload = await post(sandbox, chat(models=["anthropic/claude-3.5-haiku"]))
    assert payload["model"] == "anthropic/claude-3.5-haiku"


async def test_max_tokens_cuts_the_answer() -> None:
    """An answer longer than max_tokens is cut off with finish_reason length."""
    async with Sandbox() as sandbox:
        _, _, payload = await post(sandbox, chat(max_tokens=3))
    assert payload["choices"][0]["finish_reason"] == "length"
    assert payload["usage"]["completion_tokens"] <= 3


async def test_rate_limit_answers_429_with_headers_past_the_rate() -> None:
    """Past R requests in one second the sandbox answers 429 with Retry-After and X-RateLimit-*."""
    async with Sandbox(SandboxConfig(rate_limit=3)) as sandbox:
        statuses = [(await post(sandbox, chat(str(i)))) for i in range(5)]
    assert [s for s, _, _ in statuses] == [200, 200, 200, 429, 429]
    headers = statuses[3][1]
    assert headers["X-RateLimit-Limit"] == "3" and "Retry-After" in headers and len(headers["X-RateLimit-Reset"]) == 13
    assert sandbox.stats.max_requests_in_one_second == 3


async def test_credits_rule_derives_the_rate_and_402s_when_spent() -> None:
    """rate_limit 'credits' gives 1 request/s per credit left; a spent balance answers 402."""
    sandbox = Sandbox(SandboxConfig(rate_limit="credits", credits_usd=Decimal("7.9")))
    assert sandbox.rate_limit_rps() == 7.0
    async with Sandbox(SandboxConfig(credits_usd=Decimal("0"))) as broke:
        status, _, payload = await post(broke, chat())
    assert status == 402 and payload["error"]["code"] == 402


async def test_free_model_daily_cap() -> None:
    """A :free model answers 429 free-models-per-day past its daily cap."""
    async with Sandbox(SandboxConfig(free_daily_cap=2)) as sandbox:
        body = {**chat(), "model": "meta-llama/llama-3.3-70b-instruct:free"}
        statuses = [await post(sandbox, {**body, "seed": i}) for i in range(3)]
    assert [s for s, _, _ in statuses] == [200, 200, 429]
    assert "free-models-per-day" in statuses[2][2]["error"]["message"]


async def test_usage_cost_can_be_withheld() -> None:
    """report_cost=False simulates servers that do not report usage.cost."""
    async with Sandbox(SandboxConfig(report_cost=False)) as sandbox:
        _, _, payload = await post(sandbox, chat())
    assert "cost" not in payload["usage"]


async def test_generation_endpoint_returns_stats() -> None:
    """GET /generation?id= returns what the answer cost, and 404 for an unknown id."""
    async with Sandbox() as sandbox:
        _, _, payload = await post(sandbox, chat())
        async with aiohttp.ClientSession() as session:
            async with session.get(sandbox.base_url + "/generation", params={"id": payload["id"]}) as response:
                data = (await response.json())["data"]
            async with session.get(sandbox.base_url + "/generation", params={"id": "gen-nope"}) as response:
                assert response.status == 404
    assert data["total_cost"] == payload["usage"]["cost"]


def test_unknown_fault_kinds_are_refused() -> None:
    """A typo in a fault name is an error, not a silently faultless sandbox."""
    with pytest.raises(ValueError, match="unknown sandbox fault"):
        SandboxConfig(faults={"ratelimit": 0.5})


async def get(sandbox: Sandbox, path: str, **params: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(sandbox.base_url + path, params=params) as response:
        return response.status, json.loads(await response.text())


@pytest.mark.parametrize("credits_usd", [None, Decimal("12.5")])
async def test_every_response_validates_against_openrouters_documented_shapes(credits_usd: Decimal | None) -> None:
    """GET /key, GET /models, every model's GET /models/{model}/endpoints, GET /generation and chat answers (plain, json_schema, tools, fallbacks) each validate
    against the OpenAPI document's response schema, with and without a credit limit."""
    async with Sandbox(SandboxConfig(credits_usd=credits_usd)) as sandbox:
        status, key = await get(sandbox, "/key")
        assert status == 200 and openapi.validation_errors("KeyResponse", key) == []
        status, models = await get(sandbox, "/models")
        assert status == 200 and openapi.validation_errors("ModelsListResponse", models) == []
        for model in models["data"]:
            if model["id"] != "openrouter/auto":
                status, endpoints = await get(sandbox, f"/models/{model['id']}/endpoints")
                assert status == 200 and openapi.validation_errors("EndpointsResponse", endpoints) == [], model["id"]
        tool = {"type": "function", "function": {"name": "label", "parameters": SCHEMA}}
        response_format = {"type": "json_schema", "json_schema": {"name": "t", "strict": True, "schema": SCHEMA}}
        for body in (
            chat(),
            chat(response_format=response_format),
            chat(tools=[tool]),
            chat(models=["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"]),
        ):
            status, _, answer = await post(sandbox, body)
            assert status == 200 and openapi.validation_errors("ChatResult", answer) == []
            status, generation = await get(sandbox, "/generation", id=answer["id"])
            assert status == 200 and openapi.validation_errors("GenerationResponse", generation) == []


async def test_unknown_models_are_refused_as_openrouter_does() -> None:
    """A well-formed model the catalog lacks gets OpenRouter's 400; so does `stream: true` on /completions."""
    async with Sandbox() as sandbox:
        status, _, payload = await post(sandbox, chat(model="acme/imaginary-model"))
        assert status == 400 and "acme/imaginary-model is not a valid model ID" in payload["error"]["message"]
        status, _, payload = await post(
            sandbox, {"model": "openai/gpt-4o-mini", "prompt": "x", "stream": True}, "/completions"
        )
        assert status == 400 and "stream" in payload["error"]["message"]


async def stream_lines(sandbox: Sandbox, body: dict[str, Any]) -> list[str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(sandbox.base_url + "/chat/completions", json=body) as response,
    ):
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        return (await response.text()).split("\n")


async def test_a_streamed_answer_is_openrouters_chunks_then_usage_then_done() -> None:
    """Keep-alive comments, chunks that validate as ChatStreamChunk and join to the whole answer, a last chunk with
    usage and no choices, then [DONE]; a stream_error fault ends in an error chunk instead, unbilled."""
    async with Sandbox(SandboxConfig(latency_s=0.12)) as sandbox:
        _, _, whole = await post(sandbox, chat("stream me"))
        lines = await stream_lines(sandbox, chat("stream me", stream=True))
    assert lines.count(": OPENROUTER PROCESSING") >= 3  # while it "thinks": 0.12 s at one comment every 0.05 s
    data = [line[6:] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    for chunk in chunks:
        assert openapi.validation_errors("ChatStreamChunk", chunk) == []
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"] | {"cost": chunks[-1]["usage"]["cost"]}
    async with Sandbox(SandboxConfig(faults={"stream_error": 1.0})) as sandbox:
        lines = await stream_lines(sandbox, chat("break", stream=True))
        assert sandbox.stats.charged_usd == 0
    last = json.loads([line for line in lines if line.startswith("data: ")][-1][6:])
    assert last["choices"][0]["finish_reason"] == "error" and last["error"]["code"] == 502


ERROR_SCHEMAS = {
    400: "BadRequestResponse",
    401: "UnauthorizedResponse",
    402: "PaymentRequiredResponse",
    429: "TooManyRequestsResponse",
    500: "InternalServerResponse",
    502: "BadGatewayResponse",
    503: "ServiceUnavailableResponse",
}


@pytest.mark.parametrize(
    ("config", "body"),
    [
        (SandboxConfig(), chat(model="acme/imaginary-model")),
        (SandboxConfig(require_key=True), chat()),
        (SandboxConfig(faults={"in_flight_budget": 1.0}), chat()),
        (SandboxConfig(faults={"rate_limit": 1.0}), chat()),
        (SandboxConfig(faults={"server_error": 1.0}), chat()),
        (SandboxConfig(faults={"bad_gateway": 1.0}), chat()),
        (SandboxConfig(faults={"overloaded": 1.0}), chat()),
    ],
)
async def test_error_answers_validate_against_openrouters_error_envelopes(config: SandboxConfig, body: Any) -> None:
    """Each error status the sandbox sends has the envelope OpenRouter documents for that status."""
    async with Sandbox(config) as sandbox:
        status, _, payload = await post(sandbox, body)
    assert status in ERROR_SCHEMAS and openapi.validation_errors(ERROR_SCHEMAS[status], payload) == []


def test_request_key_ignores_params_that_do_not_change_the_question() -> None:
    """The sandbox's duplicate counter keys on model and prompt."""
    body = {"model": "a/b", "messages": [{"role": "user", "content": "x"}]}
    assert request_key(body) == request_key({**body, "temperature": 1}) != request_key({**body, "model": "a/c"})


SHAPES = Path(__file__).resolve().parent.parent / "sample_data"


def image_part(data: bytes, mime: str = "image/png", detail: str | None = None) -> dict[str, Any]:
    url = {"url": f"data:{mime};base64," + base64.b64encode(data).decode(), **({"detail": detail} if detail else {})}
    return {"type": "image_url", "image_url": url}


def test_the_sandbox_sees_every_sample_shape() -> None:
    """senses.py reads each generated PNG as the shape and colour scripts/make_media_samples.py drew."""
    with (SHAPES / "shapes.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        seen = senses.perceive([{"role": "user", "content": [image_part((SHAPES / row["photo"]).read_bytes())]}])
        assert seen.text == [f"[image: a {row['expected_colour']} {row['expected_shape']}]"], row


async def test_image_parts_count_tokens_and_image_prices() -> None:
    """An image adds 85 tokens at low detail, OpenAI's tile rule otherwise, and the model's per-image price."""
    png = (SHAPES / "shapes" / "img_001.png").read_bytes()
    async with Sandbox() as sandbox:
        _, _, text_only = await post(sandbox, chat("What is this?"))
        content = [{"type": "text", "text": "What is this?"}]
        _, _, low = await post(sandbox, chat([*content, image_part(png, detail="low")]))
        _, _, high = await post(sandbox, chat([*content, image_part(png)]))
    assert low["usage"]["prompt_tokens"] == text_only["usage"]["prompt_tokens"] + 85
    assert high["usage"]["prompt_tokens"] == text_only["usage"]["prompt_tokens"] + 85 + 170  # 96 px: one tile
    assert Decimal(str(low["usage"]["cost"])) - Decimal(str(text_only["usage"]["cost"])) >= Decimal("0.007225")
    assert openapi.validation_errors("ChatResult", high) == []


async def test_inputs_a_model_does_not_take_are_404s_and_unreadable_parts_400s() -> None:
    """Like OpenRouter: an image to a text-only model (or one told to refuse them) is a 404 naming the input;
    a data URL that is not an image is a 400; audio is counted in prompt_tokens_details.audio_tokens."""
    png = (SHAPES / "shapes" / "img_001.png").read_bytes()
    wav = (
        b"RIFF" + (36 + 16000).to_bytes(4, "little") + b"WAVEfmt " + bytes(4) + bytes(8) + (16000).to_bytes(4, "little")
    )
    wav += bytes(44 - len(wav)) + b"\x00" * 16000
    config = SandboxConfig(refuse_inputs={"openai/gpt-4o": {"image"}})
    async with Sandbox(config) as sandbox:
        body = chat([image_part(png)])
        text_model = await post(sandbox, {**body, "model": "deepseek/deepseek-r1"})
        refused = await post(sandbox, {**body, "model": "openai/gpt-4o"})
        not_image = await post(sandbox, chat([image_part(b"%PDF-1.4 hello")]))
        audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
        heard = await post(sandbox, {**chat([audio]), "model": "google/gemini-2.0-flash-001"})
    for status, _, payload in (text_model, refused):
        assert status == 404 and payload["error"]["message"] == "No endpoints found that support image input"
    assert not_image[0] == 400 and "invalid_image" in not_image[2]["error"]["message"]
    assert (
        heard[0] == 200 and heard[2]["usage"]["prompt_tokens_details"]["audio_tokens"] == 32
    )  # 1 s (16,000 bytes at 16,000 a second) at 32 a second


def test_the_request_check_is_built_before_the_first_request() -> None:
    """A sandbox is ready to answer when it starts: the ChatRequest check (jsonschema and the document) is built
    then, not while the first request waits (that stall bunched the requests behind it into one second and set
    off 429s at 100 requests/s in bench/throughput.py)."""
    script = (
        "import asyncio, sys\n"
        "from batchrunner import openapi\n"
        "from batchrunner.sandbox import Sandbox\n"
        "async def main():\n"
        "    sandbox = Sandbox()\n"
        "    await sandbox.start()\n"
        "    print(openapi._validator.cache_info().currsize, 'jsonschema' in sys.modules)\n"
        "    await sandbox.stop()\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "True"]


async def test_byok_answers_bill_the_fee_as_usage_cost_and_the_price_as_upstream() -> None:
    """byok=True: usage.cost is the 5% fee, cost_details.upstream_inference_cost the price, is_byok true; the
    user's bill (charged_usd) counts both, the key's credits only the fee, /generation says the same."""
    async with Sandbox() as plain, Sandbox(SandboxConfig(byok=True, credits_usd=Decimal(10))) as byok:
        _, _, standard = await post(plain, chat("the same question"))
        status, _, payload = await post(byok, chat("the same question"))
        _, generation = await get(byok, "/generation", id=payload["id"])
        _, key = await get(byok, "/key")
    usage, price = payload["usage"], Decimal(str(standard["usage"]["cost"]))
    assert status == 200 and openapi.validation_errors("ChatResult", payload) == []
    assert usage["is_byok"] is True and standard["usage"]["is_byok"] is False
    assert Decimal(str(usage["cost_details"]["upstream_inference_cost"])) == price
    assert Decimal(str(usage["cost"])) == price * Decimal("0.05")
    assert byok.stats.charged_usd == price * Decimal("1.05") and byok.stats.byok_upstream_usd == price
    data = generation["data"]
    assert data["is_byok"] is True and data["total_cost"] == usage["cost"]
    assert data["upstream_inference_cost"] == usage["cost_details"]["upstream_inference_cost"]
    assert Decimal(str(key["data"]["usage"])) == price * Decimal("0.05")
    assert Decimal(str(key["data"]["byok_usage"])) == price


async def test_flex_is_half_price_for_openai_and_google_and_says_so() -> None:
    """service_tier flex: OpenAI's and Google's models answer at half the price with service_tier "flex"; a model
    without a flex tier is served at the default tier and price; each answer says which tier served it."""
    async with Sandbox() as sandbox:
        costs = {}
        for model in ("openai/gpt-4o-mini", "google/gemini-2.5-flash", "anthropic/claude-3.5-haiku"):
            for tier in (None, "flex"):
                extra = {"service_tier": tier} if tier else {}
                status, _, payload = await post(sandbox, {**chat("flex?"), "model": model, **extra})
                assert status == 200 and openapi.validation_errors("ChatResult", payload) == []
                costs[model, tier] = (Decimal(str(payload["usage"]["cost"])), payload["service_tier"])
    for model in ("openai/gpt-4o-mini", "google/gemini-2.5-flash"):
        assert costs[model, "flex"] == (costs[model, None][0] / 2, "flex")
        assert costs[model, None][1] == "default"
    assert costs["anthropic/claude-3.5-haiku", "flex"] == costs["anthropic/claude-3.5-haiku", None]
    assert costs["anthropic/claude-3.5-haiku", "flex"][1] == "default"
    assert sandbox.stats.tiers == {"flex": 2, "default": 4}


async def test_flex_endpoints_are_listed_with_their_own_price() -> None:
    """A model with a flex tier lists a flex endpoint (tag openai/flex, service_tier flex) at half each price."""
    async with Sandbox() as sandbox:
        _, openai = await get(sandbox, "/models/openai/gpt-4o-mini/endpoints")
        _, anthropic = await get(sandbox, "/models/anthropic/claude-3.5-haiku/endpoints")
    standard, flex = openai["data"]["endpoints"]
    assert (standard["service_tier"], flex["service_tier"], flex["tag"]) == (None, "flex", "openai/flex")
    for key in ("prompt", "completion", "input_cache_read", "image"):
        assert Decimal(flex["pricing"][key]) == Decimal(standard["pricing"][key]) / 2
    assert [e["service_tier"] for e in anthropic["data"]["endpoints"]] == [None]


async def test_the_flex_capacity_fault_is_a_429_only_for_flex_requests() -> None:
    """faults={"flex_capacity": 1}: a flex request to a model with a flex tier gets a 429 whose availability is
    capacity_exhausted with the service_tier constraint; other requests are answered as usual."""
    async with Sandbox(SandboxConfig(faults={"flex_capacity": 1.0}, retry_after_s=2)) as sandbox:
        status, headers, payload = await post(sandbox, chat(service_tier="flex"))
        others = [
            (await post(sandbox, body))[0]
            for body in (chat(), {**chat(service_tier="flex"), "model": "anthropic/claude-3.5-haiku"})
        ]
    assert status == 429 and headers["Retry-After"] == "2" and others == [200, 200]
    error = payload["error"]
    assert "Flex tier capacity exhausted" in error["message"]
    assert error["availability"]["code"] == "capacity_exhausted" and error["availability"]["retryable"] is True
    assert error["availability"]["constraint"] == {"field": "service_tier", "detail": "flex"}
    assert sandbox.stats.charged_usd > 0 and sandbox.stats.tiers == {"default": 2}


def test_the_sandbox_command_takes_byok(monkeypatch: pytest.MonkeyPatch) -> None:
    """`batchrunner sandbox --byok` serves BYOK answers (the fee as usage.cost); without it, plain ones."""
    from click.testing import CliRunner

    from batchrunner.cli import main
    from batchrunner.sandbox import server

    served: list[SandboxConfig] = []

    async def serve(config: SandboxConfig, port: int, ready: Any = None) -> None:
        served.append(config)

    monkeypatch.setattr(server, "serve", serve)
    for args in (["--byok"], []):
        result = CliRunner().invoke(main, ["sandbox", "--port", "0", *args])
        assert result.exit_code == 0, result.output
    assert [config.byok for config in served] == [True, False]
