"""What the sandbox answers: deterministic text, schema-conforming JSON, token counts. Pure.

Answers depend only on the model and the prompt, so a rerun of the same job gets the same
answers, and a test can tell which prompt an answer belongs to.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import Any

from batchrunner.structured import resolve_ref

WORDS = [
    "clear",
    "concise",
    "careful",
    "direct",
    "useful",
    "plain",
    "brief",
    "thorough",
    "measured",
    "steady",
    "precise",
    "calm",
    "likely",
    "possible",
    "urgent",
    "routine",
    "minor",
    "major",
    "customer",
    "product",
    "billing",
    "shipping",
    "account",
]


def seeded_rng(*parts: object) -> random.Random:
    """A Random whose stream is fixed by `parts`: same inputs, same choices, any process."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def count_tokens(text: str) -> int:
    """The sandbox's tokenizer: about four characters a token, at least one."""
    return max(1, math.ceil(len(text) / 4))


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Tokens of a chat prompt: its text plus a few per message for the role markers."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        total += count_tokens(str(content or "")) + 4
    return total


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def text_answer(model: str, prompt: str) -> str:
    """A plain answer that quotes its prompt, so each answer can be traced to its row."""
    rng = seeded_rng(model, prompt)
    quoted = " ".join(prompt.split())
    if len(quoted) > 80:
        quoted = quoted[:77] + "..."
    adjectives = " and ".join(rng.sample(WORDS[:12], 2))
    return f"Simulated answer from {model}: a {adjectives} reply to “{quoted}”."


# Simulated skill, for evaluation examples: how often a model picks the enum value its prompt
# gives away (see KEYWORDS). Sandbox scores are simulated; they only make the example report
# show models that really differ.
SKILL = {
    "anthropic/claude-3.5-haiku": 0.92,
    "openai/gpt-4o-mini": 0.85,
    "google/gemini-2.0-flash-001": 0.8,
    "meta-llama/llama-3.1-8b-instruct": 0.6,
}
DEFAULT_SKILL = 0.75
# Phrases that give an enum value away (the sample tickets' issue patterns, scripts/make_sample_data.py).
KEYWORDS = {
    "bug": ("crashes", "blank screen", "500 error"),
    "billing": ("charged me", "plan price"),
    "account": ("log in", "two-factor"),
    "feature_request": ("in bulk", "dark mode"),
    "question": ("how do i", "is it possible"),
}


def derived_value(prompt: str, options: list[Any]) -> Any:
    """The enum value the prompt gives away: one named in it, or one whose KEYWORDS it contains; else None."""
    text = prompt.casefold()
    named = [option for option in options if isinstance(option, str)]
    for option in named:  # the telling phrases first: they are specific
        if any(word in text for word in KEYWORDS.get(option, ())):
            return option
    for option in named:
        if option.casefold().replace("_", " ") in text:
            return option
    return None


def schema_answer(model: str, prompt: str, schema: dict[str, Any]) -> Any:
    """A JSON value that satisfies `schema` (the subset of JSON Schema structured outputs use).

    An enum the prompt gives away (derived_value) is answered right with the model's SKILL as
    probability, else with another value: the same model and prompt always answer the same."""
    skill = SKILL.get(model.split(":")[0], DEFAULT_SKILL)
    return _instance(schema, schema, seeded_rng(model, prompt, "json"), depth=0, prompt=prompt, skill=skill)


def _instance(
    node: Any, root: dict[str, Any], rng: random.Random, depth: int, prompt: str = "", skill: float = 0.0
) -> Any:
    if not isinstance(node, dict):
        return None
    node = resolve_ref(node, root)
    if "const" in node:
        return node["const"]
    if node.get("enum"):
        options = list(node["enum"])
        truth = derived_value(prompt, options)
        right = rng.random() < skill
        if truth is None:
            return rng.choice(options)
        others = [option for option in options if option != truth]
        return truth if right or not others else rng.choice(others)
    for key in ("anyOf", "oneOf"):
        options = [o for o in node.get(key, []) if isinstance(o, dict) and o.get("type") != "null"]
        if options:
            return _instance(rng.choice(options), root, rng, depth + 1, prompt, skill)
    if node.get("allOf"):
        merged: dict[str, Any] = {}
        for part in node["allOf"]:
            merged.update(resolve_ref(part, root))
        return _instance(merged, root, rng, depth + 1, prompt, skill)
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in node else "string"
    if kind == "object":
        properties = node.get("properties", {})
        return {name: _instance(sub, root, rng, depth + 1, prompt, skill) for name, sub in properties.items()}
    if kind == "array":
        low = int(node.get("minItems", 1))
        high = max(low, min(int(node.get("maxItems", low + 2)), low + 3))
        count = 0 if depth > 6 else rng.randint(low, high)
        items = [
            _instance(node.get("items", {"type": "string"}), root, rng, depth + 1, prompt, skill) for _ in range(count)
        ]
        if node.get("uniqueItems"):
            unique: list[Any] = []
            for item in items:
                if item not in unique:
                    unique.append(item)
            items = unique
        return items
    if kind == "integer":
        low = int(node.get("minimum", 0))
        high = int(node.get("maximum", low + 10))
        return rng.randint(low, max(low, high))
    if kind == "number":
        smallest = float(node.get("minimum", 0.0))
        largest = float(node.get("maximum", smallest + 1.0))
        return round(rng.uniform(smallest, largest), 3)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    # string
    low = int(node.get("minLength", 0))
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
    while len(words) < low:
        words += " " + rng.choice(WORDS)
    if "maxLength" in node:
        words = words[: int(node["maxLength"])]
    return words


def json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
