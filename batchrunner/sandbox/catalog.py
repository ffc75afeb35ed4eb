"""The sandbox's model catalog: slugs, prices (USD per token, as strings) and context lengths.

Prices follow OpenRouter's listed prices for these models at the time of writing (roughly:
they are only there so that costs in the sandbox look like real ones). Like OpenRouter, the
sandbox refuses a model it does not list (400 "... is not a valid model ID"); routing
variants (`:nitro`, `:floor`, ...) of a listed model are served at its price.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

MODELS: dict[str, dict[str, Any]] = {
    "openai/gpt-4o-mini": {
        "name": "OpenAI: GPT-4o-mini",
        "prompt": "0.00000015",
        "completion": "0.0000006",
        "input_cache_read": "0.000000075",
        "context_length": 128000,
        "provider": "OpenAI",
    },
    "openai/gpt-4o": {
        "name": "OpenAI: GPT-4o",
        "prompt": "0.0000025",
        "completion": "0.00001",
        "input_cache_read": "0.00000125",
        "context_length": 128000,
        "provider": "OpenAI",
    },
    "anthropic/claude-3.5-haiku": {
        "name": "Anthropic: Claude 3.5 Haiku",
        "prompt": "0.0000008",
        "completion": "0.000004",
        "input_cache_read": "0.00000008",
        "context_length": 200000,
        "provider": "Anthropic",
    },
    "google/gemini-2.0-flash-001": {
        "name": "Google: Gemini 2.0 Flash",
        "prompt": "0.0000001",
        "completion": "0.0000004",
        "context_length": 1048576,
        "provider": "Google",
    },
    "meta-llama/llama-3.1-8b-instruct": {
        "name": "Meta: Llama 3.1 8B Instruct",
        "prompt": "0.00000002",
        "completion": "0.00000005",
        "context_length": 131072,
        "provider": "DeepInfra",
    },
    "mistralai/mistral-small-3.1-24b-instruct": {
        "name": "Mistral: Mistral Small 3.1 24B",
        "prompt": "0.00000005",
        "completion": "0.0000001",
        "context_length": 131072,
        "provider": "Mistral",
    },
    "openai/gpt-4.1": {
        "name": "OpenAI: GPT-4.1",
        "prompt": "0.000002",
        "completion": "0.000008",
        "context_length": 1047576,
        "provider": "OpenAI",
    },
    "openai/gpt-4.1-mini": {
        "name": "OpenAI: GPT-4.1 Mini",
        "prompt": "0.0000004",
        "completion": "0.0000016",
        "context_length": 1047576,
        "provider": "OpenAI",
    },
    "openai/gpt-4.1-nano": {
        "name": "OpenAI: GPT-4.1 Nano",
        "prompt": "0.0000001",
        "completion": "0.0000004",
        "context_length": 1047576,
        "provider": "OpenAI",
    },
    "openai/gpt-5": {
        "name": "OpenAI: GPT-5",
        "prompt": "0.00000125",
        "completion": "0.00001",
        "context_length": 400000,
        "provider": "OpenAI",
    },
    "openai/gpt-5-mini": {
        "name": "OpenAI: GPT-5 Mini",
        "prompt": "0.00000025",
        "completion": "0.000002",
        "context_length": 400000,
        "provider": "OpenAI",
    },
    "openai/o4-mini": {
        "name": "OpenAI: o4 Mini",
        "prompt": "0.0000011",
        "completion": "0.0000044",
        "context_length": 200000,
        "provider": "OpenAI",
    },
    "anthropic/claude-3.7-sonnet": {
        "name": "Anthropic: Claude 3.7 Sonnet",
        "prompt": "0.000003",
        "completion": "0.000015",
        "context_length": 200000,
        "provider": "Anthropic",
    },
    "anthropic/claude-sonnet-4": {
        "name": "Anthropic: Claude Sonnet 4",
        "prompt": "0.000003",
        "completion": "0.000015",
        "context_length": 200000,
        "provider": "Anthropic",
    },
    "anthropic/claude-haiku-4.5": {
        "name": "Anthropic: Claude Haiku 4.5",
        "prompt": "0.000001",
        "completion": "0.000005",
        "context_length": 200000,
        "provider": "Anthropic",
    },
    "google/gemini-2.5-flash": {
        "name": "Google: Gemini 2.5 Flash",
        "prompt": "0.0000003",
        "completion": "0.0000025",
        "context_length": 1048576,
        "provider": "Google",
    },
    "google/gemini-2.5-flash-lite": {
        "name": "Google: Gemini 2.5 Flash Lite",
        "prompt": "0.0000001",
        "completion": "0.0000004",
        "context_length": 1048576,
        "provider": "Google",
    },
    "google/gemini-2.5-pro": {
        "name": "Google: Gemini 2.5 Pro",
        "prompt": "0.00000125",
        "completion": "0.00001",
        "context_length": 1048576,
        "provider": "Google",
    },
    "deepseek/deepseek-chat-v3-0324": {
        "name": "DeepSeek: DeepSeek V3 0324",
        "prompt": "0.00000027",
        "completion": "0.0000011",
        "context_length": 163840,
        "provider": "DeepSeek",
    },
    "deepseek/deepseek-r1": {
        "name": "DeepSeek: R1",
        "prompt": "0.0000005",
        "completion": "0.00000215",
        "context_length": 163840,
        "provider": "DeepSeek",
    },
    "qwen/qwen3-32b": {
        "name": "Qwen: Qwen3 32B",
        "prompt": "0.0000001",
        "completion": "0.0000003",
        "context_length": 40960,
        "provider": "DeepInfra",
    },
    "qwen/qwen-2.5-72b-instruct": {
        "name": "Qwen2.5 72B Instruct",
        "prompt": "0.00000012",
        "completion": "0.00000039",
        "context_length": 32768,
        "provider": "DeepInfra",
    },
    "meta-llama/llama-3.3-70b-instruct": {
        "name": "Meta: Llama 3.3 70B Instruct",
        "prompt": "0.0000001",
        "completion": "0.00000025",
        "context_length": 131072,
        "provider": "DeepInfra",
    },
    "meta-llama/llama-4-maverick": {
        "name": "Meta: Llama 4 Maverick",
        "prompt": "0.00000015",
        "completion": "0.0000006",
        "context_length": 1048576,
        "provider": "DeepInfra",
    },
    "mistralai/mistral-nemo": {
        "name": "Mistral: Mistral Nemo",
        "prompt": "0.00000002",
        "completion": "0.00000004",
        "context_length": 131072,
        "provider": "Mistral",
    },
    "x-ai/grok-3-mini": {
        "name": "xAI: Grok 3 Mini",
        "prompt": "0.0000003",
        "completion": "0.0000005",
        "context_length": 131072,
        "provider": "xAI",
    },
    "meta-llama/llama-3.3-70b-instruct:free": {
        "name": "Meta: Llama 3.3 70B Instruct (free)",
        "prompt": "0",
        "completion": "0",
        "context_length": 65536,
        "provider": "Chutes",
    },
}
# What each model takes besides text (architecture.input_modalities), and its price per input image.
VISION = ("text", "image", "file")
INPUTS: dict[str, tuple[str, ...]] = {
    **{slug: VISION for slug in MODELS if slug.startswith(("openai/", "anthropic/"))},
    **{slug: (*VISION, "audio", "video") for slug in MODELS if slug.startswith("google/")},
    "meta-llama/llama-4-maverick": ("text", "image"),
}
IMAGE_PRICES = {
    "openai/gpt-4o": "0.003613",
    "openai/gpt-4o-mini": "0.007225",
    "openai/gpt-4.1": "0.001",
    "anthropic/claude-3.5-haiku": "0.0008",
    "google/gemini-2.0-flash-001": "0.0000258",
}
# The parameters each model's endpoints take (supported_parameters). A reasoning model without structured
# outputs, and a model one of whose two providers lacks them, as real listings have.
PARAMETERS = ["max_tokens", "temperature", "top_p", "seed", "stop", "response_format", "structured_outputs", "tools"]
NO_STRUCTURED = ["max_tokens", "temperature", "top_p", "seed", "stop", "reasoning", "include_reasoning"]
SECOND_PROVIDER = {"meta-llama/llama-3.3-70b-instruct": ("Together", "together", "fp8", NO_STRUCTURED)}
AUTO_ROUTER = "openrouter/auto"
AUTO_ROUTES_TO = "openai/gpt-4o-mini"
VARIANT_SUFFIXES = (":nitro", ":floor", ":exacto", ":thinking", ":extended", ":online")
# The flex tier (`service_tier: "flex"`): OpenAI's and Google's models, at half the price, as on OpenRouter.
FLEX_AUTHORS = ("openai/", "google/")
FLEX_PRICE_SHARE = Decimal("0.5")


def base_slug(model: str) -> str:
    """The slug without a routing variant (`:nitro`, `:floor`, ...); `:free` is its own model."""
    for suffix in VARIANT_SUFFIXES:
        if model.endswith(suffix):
            return model[: -len(suffix)]
    return model


def is_listed(model: str) -> bool:
    """Whether the sandbox serves `model` (a listed slug, a routing variant of one, or the auto router)."""
    return base_slug(model) in MODELS or model == AUTO_ROUTER


def pricing(model: str) -> dict[str, str]:
    slug = base_slug(model)
    if slug.endswith(":free"):
        return {"prompt": "0", "completion": "0"}
    entry = MODELS[slug]
    prices: dict[str, str] = {key: entry[key] for key in ("prompt", "completion", "input_cache_read") if key in entry}
    if slug in IMAGE_PRICES:
        prices["image"] = IMAGE_PRICES[slug]
    return prices


def has_flex(model: str) -> bool:
    """Whether `model` has a flex-tier endpoint (OpenAI's and Google's models; not their `:free` variants)."""
    slug = base_slug(model)
    return slug.startswith(FLEX_AUTHORS) and slug in MODELS


def flex_pricing(model: str) -> dict[str, str]:
    """The flex tier's prices: each of the standard ones at FLEX_PRICE_SHARE."""
    return {key: str(Decimal(price) * FLEX_PRICE_SHARE) for key, price in pricing(model).items()}


def inputs(model: str) -> tuple[str, ...]:
    """What the model takes: text, and maybe image, file, audio, video."""
    return INPUTS.get(base_slug(model).removesuffix(":free"), ("text",))


def cost_usd(
    model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, images: int = 0
) -> Decimal:
    prices = pricing(model)
    cache_read = Decimal(prices.get("input_cache_read", prices["prompt"]))
    return (
        Decimal(prices["prompt"]) * (prompt_tokens - cached_tokens)
        + cache_read * cached_tokens
        + Decimal(prices["completion"]) * completion_tokens
        + Decimal(prices.get("image", "0")) * images
    )


def provider_name(model: str) -> str:
    entry = MODELS.get(base_slug(model))
    return entry["provider"] if entry else "Sandbox"


def supported_parameters(model: str) -> list[str]:
    """What every endpoint of `model` takes, at least (the model's own list at /models)."""
    return NO_STRUCTURED if base_slug(model) == "deepseek/deepseek-r1" else PARAMETERS


def endpoints(model: str) -> list[dict[str, Any]]:
    """GET /models/{model}/endpoints' endpoints, in OpenRouter's shape: one per provider serving it."""
    slug = base_slug(model)
    entry = MODELS[slug]
    tag = entry["provider"].lower().replace(" ", "-")
    closed = slug.startswith(("openai/", "anthropic/", "google/", "x-ai/"))
    providers = [(entry["provider"], tag, "unknown" if closed else "bf16", supported_parameters(slug))]
    if slug in SECOND_PROVIDER:
        providers.append(SECOND_PROVIDER[slug])
    listed = [_endpoint(slug, entry, *provider, tier=None, prices=pricing(model)) for provider in providers]
    if has_flex(slug):  # the flex tier is an endpoint of its own, at its own price, for requests that ask it
        first = providers[0]
        listed.append(
            _endpoint(slug, entry, first[0], f"{first[1]}/flex", *first[2:], tier="flex", prices=flex_pricing(slug))
        )
    return listed


def _endpoint(
    slug: str,
    entry: dict[str, Any],
    provider: str,
    provider_tag: str,
    quantization: str,
    parameters: list[str],
    *,
    tier: str | None,
    prices: dict[str, str],
) -> dict[str, Any]:
    """One endpoint of a model in OpenRouter's shape (the SDK's PublicEndpoint)."""
    return {
        "name": f"{provider}{' (' + tier + ')' if tier else ''} | {slug}",
        "model_id": slug,
        "model_name": entry["name"],
        "context_length": entry["context_length"],
        "pricing": {"request": "0", **prices},
        "provider_name": provider,
        "tag": provider_tag,
        "quantization": quantization,
        "max_completion_tokens": 16384,
        "max_prompt_tokens": None,
        "status": 0,
        "supported_parameters": parameters,
        "uptime_last_5m": 100.0,
        "uptime_last_30m": 99.9,
        "uptime_last_1d": 99.7,
        "supports_implicit_caching": slug.startswith(("openai/", "google/", "deepseek/")),
        "supports_tool_choice": dict.fromkeys(("auto", "none", "required", "function"), "tools" in parameters),
        "supports_diarization": False,  # a speech-to-text feature: no sandbox endpoint transcribes
        "native_tools": {},  # no provider-native server tools (web search and the like) are simulated
        "service_tier": tier,  # None: the standard tier; "flex" for the flex tier's endpoint
        "latency_last_30m": None,
        "throughput_last_30m": None,
    }


def model_objects(created: int) -> list[dict[str, Any]]:
    """The catalog in the shape of OpenRouter's GET /models; the auto router has no price ("-1"), as there."""
    objects = [_auto_router(created)]
    for slug, entry in MODELS.items():
        objects.append(
            {
                "id": slug,
                "canonical_slug": slug,
                "name": entry["name"],
                "created": created,
                "description": f"{entry['name']}, as simulated by the batchrunner sandbox.",
                "context_length": entry["context_length"],
                "architecture": {
                    "modality": "+".join(inputs(slug)) + "->text",
                    "input_modalities": list(inputs(slug)),
                    "output_modalities": ["text"],
                    "tokenizer": "Other",
                    "instruct_type": None,
                },
                "pricing": {"request": "0", **pricing(slug)},
                "top_provider": {
                    "context_length": entry["context_length"],
                    "max_completion_tokens": 16384,
                    "is_moderated": False,
                },
                "per_request_limits": None,
                "supported_parameters": supported_parameters(slug),
                "default_parameters": None,
                "supported_voices": None,
                "links": {"details": f"/api/v1/models/{slug}/endpoints"},
            }
        )
    return objects


def _auto_router(created: int) -> dict[str, Any]:
    return {
        "id": AUTO_ROUTER,
        "canonical_slug": AUTO_ROUTER,
        "name": "Auto Router",
        "created": created,
        "description": f"Routes each request to a model; in the sandbox, always {AUTO_ROUTES_TO}.",
        "context_length": 2000000,
        "architecture": {
            "modality": "text->text",
            "input_modalities": ["text"],
            "output_modalities": ["text"],
            "tokenizer": "Router",
            "instruct_type": None,
        },
        "pricing": {"prompt": "-1", "completion": "-1"},
        "top_provider": {"context_length": None, "max_completion_tokens": None, "is_moderated": False},
        "per_request_limits": None,
        "supported_parameters": ["max_tokens", "temperature", "response_format", "tools"],
        "default_parameters": None,
        "supported_voices": None,
        "links": {"details": f"/api/v1/models/{AUTO_ROUTER}/endpoints"},
    }
