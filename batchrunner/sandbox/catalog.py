"""The sandbox's model catalog: slugs, prices (USD per token, as strings) and context lengths.

Prices follow OpenRouter's listed prices for these models at the time of writing; they are
only there so that costs in the sandbox look like real ones. Any other `author/model` slug
is served too, at DEFAULT_PRICING, so users can dry-run jobs naming models not listed here.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

DEFAULT_PRICING = {"prompt": "0.0000005", "completion": "0.0000015"}

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
    "meta-llama/llama-3.3-70b-instruct:free": {
        "name": "Meta: Llama 3.3 70B Instruct (free)",
        "prompt": "0",
        "completion": "0",
        "context_length": 65536,
        "provider": "Chutes",
    },
}
AUTO_ROUTER = "openrouter/auto"
AUTO_ROUTES_TO = "openai/gpt-4o-mini"
VARIANT_SUFFIXES = (":nitro", ":floor", ":exacto", ":thinking", ":extended", ":online")


def base_slug(model: str) -> str:
    """The slug without a routing variant (`:nitro`, `:floor`, ...); `:free` is its own model."""
    for suffix in VARIANT_SUFFIXES:
        if model.endswith(suffix):
            return model[: -len(suffix)]
    return model


def is_valid_slug(model: str) -> bool:
    author, _, name = model.partition("/")
    return bool(author and name and " " not in model)


def pricing(model: str) -> dict[str, str]:
    slug = base_slug(model)
    if slug.endswith(":free"):
        return {"prompt": "0", "completion": "0"}
    entry = MODELS.get(slug)
    if entry is None:
        return dict(DEFAULT_PRICING)
    return {key: entry[key] for key in ("prompt", "completion", "input_cache_read") if key in entry}


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Decimal:
    prices = pricing(model)
    cache_read = Decimal(prices.get("input_cache_read", prices["prompt"]))
    return (
        Decimal(prices["prompt"]) * (prompt_tokens - cached_tokens)
        + cache_read * cached_tokens
        + Decimal(prices["completion"]) * completion_tokens
    )


def provider_name(model: str) -> str:
    entry = MODELS.get(base_slug(model))
    return entry["provider"] if entry else "Sandbox"


def model_objects(created: int) -> list[dict[str, Any]]:
    """The catalog in the shape of OpenRouter's GET /models."""
    objects = []
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
                    "modality": "text->text",
                    "input_modalities": ["text"],
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
                "supported_parameters": [
                    "max_tokens",
                    "temperature",
                    "top_p",
                    "seed",
                    "stop",
                    "response_format",
                    "structured_outputs",
                    "tools",
                ],
                "default_parameters": None,
                "supported_voices": None,
                "links": {"details": f"/api/v1/models/{slug}/endpoints"},
            }
        )
    return objects
