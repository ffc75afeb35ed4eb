"""Each row's request: its prompt, its body for a model, and its fingerprint. Pure.

The fingerprint is the checkpoint key's memory of everything that shapes a request: the
rendered prompt, the endpoint, params, provider, response_format, the model chain, and the
server that answers (so a sandbox answer never stands in for a real one). A
rerun skips a (row, model) whose stored answer has the same fingerprint; editing the
prompt or params changes the fingerprint of exactly the rows whose request changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import astuple, dataclass
from functools import cached_property
from typing import Any

from batchrunner.costs import Pricing
from batchrunner.dataset import Row
from batchrunner.errors import MediaProblem
from batchrunner.media import MIB, Media, MediaLimitsBytes, MediaReader, audio_format
from batchrunner.prompt import MEDIA_PARTS, MediaValue, PromptTemplate
from batchrunner.spec import REQUEST_KEYS, SANDBOX_SERVER, JobSpec
from batchrunner.structured import repair_prompt, resolve_ref

DEFAULT_MAX_COMPLETION_TOKENS = 16_384  # when neither the spec nor /models says


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


@dataclass(frozen=True, slots=True)
class RowRequest:
    """One input row asked of one requested model: the unit of work, and of the checkpoint."""

    row: Row
    model_position: int  # in the spec's `models`
    requested_model: str
    prompt: Any  # rendered messages (chat) or text (completions); media parts hold a URL or a media.Media
    fingerprint: str
    problem: str | None = None  # why the row cannot be sent (a missing or unusable file): it fails, unsent
    sample: int = 0  # which of the spec's `samples` this asking is (0 to samples - 1)

    @property
    def key(self) -> tuple[str, str, str]:
        """The checkpoint key: (row id, requested model, fingerprint)."""
        return (self.row.id, self.requested_model, self.fingerprint)


class RequestBuilder:
    """Builds what the row policy sends and the checkpoint keys, from one spec."""

    def __init__(self, spec: JobSpec, *, server: str = "", media: MediaReader | None = None) -> None:
        self.spec = spec
        self.server = (
            server  # who answers (spec.server()): part of the fingerprint, so a sandbox answer is never a real one
        )
        self.template: PromptTemplate = spec.prompt_template()
        self.prompt_field = "prompt" if spec.endpoint == "completions" else "messages"
        self.has_media = bool(self.template.media_kinds)
        limits = spec.media_limits_mb
        self.media = media or MediaReader(  # reads the files a row names (media.py does that I/O, not this module)
            spec.input_folder(),
            limits=MediaLimitsBytes(
                *(int(getattr(limits, kind) * MIB) for kind in ("image", "file", "audio", "video"))
            ),
            urls_only=spec.mode == "batch",
        )

    @cached_property
    def _shape_digests(self) -> dict[str, hashlib._Hash]:
        """Per requested model: a hash already fed with everything but the prompt."""
        digests = {}
        for model in self.spec.models:
            shape: dict[str, Any] = {key: getattr(self.spec, key) for key in REQUEST_KEYS}
            shape["chain"] = self.spec.model_chain(model)  # CHAIN_KEYS; PROMPT_KEYS are hashed as the prompt
            if self.server:  # OpenRouter's answers keep the fingerprints they had before servers were told apart
                shape["server"] = self.server
            digests[model] = hashlib.sha256(_canonical(shape))
        return digests

    def for_rows(self, rows: Iterable[Row]) -> Iterator[RowRequest]:
        """Every (row, requested model) pair of `rows`, rendered and fingerprinted, in order."""
        models = list(enumerate(self.spec.models))
        samples = range(self.spec.samples)
        for row in rows:
            prompt, problem = self.prompt_of(row)
            for position, model in models:
                for sample in samples:
                    fingerprint = self.fingerprint(prompt, model, sample)
                    yield RowRequest(row, position, model, prompt, fingerprint, problem, sample)

    def prompt(self, row: Row) -> Any:
        """The rendered messages (chat) or text (completions) for a row."""
        return self.prompt_of(row)[0]

    def prompt_of(self, row: Row) -> tuple[Any, str | None]:
        """The row's prompt, and why it cannot be sent (None when it can): its media resolved into URLs
        and file contents (hashed now, read again when sent), or into the problem with each."""
        if self.spec.endpoint == "completions":
            return self.template.render_text(row.values), None
        messages = self.template.render_messages(row.values)
        if not self.has_media:
            return messages, None
        problems = []
        for message in messages:
            if isinstance(message["content"], str):
                continue
            for part in message["content"]:
                if part["type"] not in MEDIA_PARTS:
                    continue
                inner, name = part[part["type"]], MEDIA_PARTS[part["type"]][0]
                wanted: MediaValue = inner[name]
                try:
                    inner[name] = media = self.media.resolve(wanted.kind, wanted.value, column=wanted.column)
                except MediaProblem as exc:
                    inner[name] = {"problem": str(exc)}  # the fingerprint of a row that failed for this reason
                    problems.append(str(exc))
                    continue
                if isinstance(media, Media) and media.kind == "audio":
                    inner.setdefault("format", audio_format(media))
                if isinstance(media, Media) and media.kind == "file":
                    inner.setdefault("filename", media.path.name if media.path else "document.pdf")
        return messages, ("; ".join(problems) + "; nothing was sent") if problems else None

    def body(self, prompt: Any, model: str, sample: int = 0) -> dict[str, Any]:
        """The request for `model`; sample i of several sends `seed + i`, so each sample is reproducible."""
        body = self.spec.request_body(model)
        if sample and isinstance(body.get("seed"), int) and not isinstance(body["seed"], bool):
            body["seed"] += sample
        if self.spec.cache_system_prompt and self.prompt_field == "messages":
            # The shared system prompt as a content part marked for caching: providers that
            # need an explicit breakpoint (Anthropic, Gemini) cache it; others cache implicitly.
            prompt = [{**m, "content": _cached(m["content"])} if m["role"] == "system" else m for m in prompt]
        body[self.prompt_field] = prompt
        if body.get("stream") is True and self.server not in ("", SANDBOX_SERVER) and "stream_options" not in body:
            # vLLM, LiteLLM and OpenAI-style servers report a stream's usage only when asked; OpenRouter always does
            body["stream_options"] = {"include_usage": True}
        return body

    def repaired(self, body: dict[str, Any], answer: str, error: str, *, cut_off: bool) -> dict[str, Any]:
        """The request again, told what was wrong with its answer; with twice the room if it was cut off."""
        body = dict(body)
        if self.prompt_field == "messages":
            feedback = [{"role": "assistant", "content": answer}, {"role": "user", "content": repair_prompt(error)}]
            body["messages"] = [*body["messages"], *feedback]
        if cut_off:
            key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
            body[key] = 2 * int(body.get(key) or self.max_completion_tokens())
        return body

    def max_completion_tokens(self, pricing: Pricing | None = None, body: dict[str, Any] | None = None) -> int:
        """The longest answer a request allows: its max_tokens (the spec's, or a repaired body's), else
        the model's own limit."""
        params = self.spec.params if body is None else body
        for key in ("max_completion_tokens", "max_tokens"):
            if isinstance(params.get(key), int):
                return int(params[key])
        if pricing is not None:
            return pricing.max_completion_tokens or pricing.context_length or DEFAULT_MAX_COMPLETION_TOKENS
        return DEFAULT_MAX_COMPLETION_TOKENS

    def fingerprint(self, prompt: Any, requested_model: str, sample: int = 0) -> str:
        """The checkpoint's memory of the request; sample 0's is the key a single answer always had."""
        digest = self._shape_digests[requested_model].copy()
        digest.update(_prompt_bytes(prompt))
        if sample:
            digest.update(f"\x00sample:{sample}".encode())
        return digest.hexdigest()[:32]


def _cached(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A system message's content with its last part marked as a cache breakpoint."""
    parts: list[dict[str, Any]] = (
        [{"type": "text", "text": content}] if isinstance(content, str) else [dict(p) for p in content]
    )
    parts[-1]["cache_control"] = {"type": "ephemeral"}
    return parts


def _prompt_bytes(prompt: Any) -> bytes:
    """An unambiguous encoding of a rendered prompt: length-prefixed parts, several times
    faster than canonical JSON, which matters at a million rows per resume. Content parts
    are canonical JSON, a file by its content's hash (never its path)."""
    if isinstance(prompt, str):
        parts = [prompt]
    else:
        parts = [text for message in prompt for text in (message["role"], _content_text(message["content"]))]
    return "".join(f"{len(part)}:{part}" for part in parts).encode()


def _content_text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "\x00parts:" + json.dumps(
        content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_identity
    )


def _identity(value: Any) -> str:
    return value.identity if isinstance(value, Media) else str(value)


def body_prompt(body: dict[str, Any]) -> Any:
    """The prompt a request body carries: its messages (chat) or its raw prompt (completions)."""
    return body["messages"] if "messages" in body else body.get("prompt", "")


def prompt_texts(prompt: Any) -> list[str]:
    """The texts of a prompt: a raw prompt, or each message's content (a string, or text parts)."""
    if isinstance(prompt, str):
        return [prompt]
    texts = []
    for message in prompt:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        texts.append(content)
    return texts


# What media may add to a prompt, in tokens, before any answer says. Providers count image and page
# tokens their own way (and by `detail`); these bound them for budgets, and guess them for estimates.
MOST_TOKENS_PER_IMAGE = 10_000  # above Anthropic's ~1,600, OpenAI's high-detail ~2,800, Gemini's tiles of 258
MOST_TOKENS_PER_PAGE = 3_000  # a dense page, or a page sent as an image plus its text
MOST_PAGES_UNKNOWN = 100  # a PDF by URL, whose pages are not known (the request's context bounds it anyway)
AUDIO_BYTES_PER_TOKEN_LEAST = 32  # 32 tokens a second (Gemini) of 8 kbit/s audio
VIDEO_TOKENS_MOST = 1_000_000  # a video: bounded only by the model's context
TYPICAL_TOKENS_PER_IMAGE = 1_000  # a guess: 85 (low detail) to ~2,800 (high detail, large image)
LOW_DETAIL_TOKENS_PER_IMAGE = 85  # OpenAI's fixed price of a low-detail image
TYPICAL_TOKENS_PER_PAGE = 1_000
AUDIO_BYTES_PER_TOKEN_TYPICAL = 500  # 32 tokens a second of 128 kbit/s mp3


@dataclass(frozen=True)
class MediaTally:
    """The media one prompt carries: what costs and estimates count."""

    images: int = 0
    low_detail_images: int = 0  # of them, sent with detail: low (85 tokens each at OpenAI)
    files: int = 0
    pages: int = 0  # counted pages of the PDFs sent as content
    unknown_pages: int = 0  # PDFs by URL, whose pages are not known
    audio: int = 0
    audio_bytes: int = 0
    videos: int = 0

    def most_tokens(self) -> int:
        return (
            self.images * MOST_TOKENS_PER_IMAGE
            + (self.pages + self.unknown_pages * MOST_PAGES_UNKNOWN) * MOST_TOKENS_PER_PAGE
            + self.audio_bytes // AUDIO_BYTES_PER_TOKEN_LEAST
            + self.videos * VIDEO_TOKENS_MOST
        )

    def typical_tokens(self) -> int:
        return (
            (self.images - self.low_detail_images) * TYPICAL_TOKENS_PER_IMAGE
            + self.low_detail_images * LOW_DETAIL_TOKENS_PER_IMAGE
            + self.pages * TYPICAL_TOKENS_PER_PAGE
            + self.audio_bytes // AUDIO_BYTES_PER_TOKEN_TYPICAL
        )

    def most_pages(self) -> int:
        return self.pages + self.unknown_pages * MOST_PAGES_UNKNOWN

    def plus(self, other: MediaTally) -> MediaTally:
        return MediaTally(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


NO_MEDIA = MediaTally()


def media_tally(prompt: Any) -> MediaTally:
    """Count the images, PDFs (and their pages), audio and video of a rendered prompt."""
    if isinstance(prompt, str):
        return NO_MEDIA
    counts: dict[str, int] = dict.fromkeys(
        ("images", "low_detail_images", "files", "pages", "unknown_pages", "audio", "audio_bytes", "videos"), 0
    )
    found = False
    for message in prompt:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in MEDIA_PARTS:
                continue
            found = True
            value = (part.get(kind) or {}).get(MEDIA_PARTS[kind][0])
            if kind == "image_url":
                counts["images"] += 1
                counts["low_detail_images"] += part[kind].get("detail") == "low"
            elif kind == "file":
                counts["files"] += 1
                if isinstance(value, Media):
                    counts["pages"] += value.pages or 1
                else:
                    counts["unknown_pages"] += 1
            elif kind == "input_audio":
                counts["audio"] += 1
                counts["audio_bytes"] += value.size if isinstance(value, Media) else 0
            else:
                counts["videos"] += 1
    return MediaTally(**counts) if found else NO_MEDIA  # one shared tally for the common case: text alone


def estimated_prompt_tokens(prompt: Any) -> int:
    """A tokenizer-free estimate: about four characters a token, plus a few per message, plus a guess for media."""
    texts = prompt_texts(prompt)
    return sum(len(t) for t in texts) // 4 + 4 * len(texts) + 1 + media_tally(prompt).typical_tokens()


def most_prompt_tokens(prompt: Any) -> int:
    """An upper bound for budgets: no tokenizer makes more tokens than UTF-8 bytes, plus role markers,
    plus the most its media may count (capped by the model's context where it is known)."""
    return most_text_tokens(prompt) + media_tally(prompt).most_tokens()


def most_text_tokens(prompt: Any) -> int:
    """The most tokens a prompt's text can be: no tokenizer makes more tokens than UTF-8 bytes, plus role markers."""
    texts = prompt_texts(prompt)
    return sum(len(t.encode()) for t in texts) + 8 * len(texts) + 8


# Fields beside the messages that a provider renders into the prompt: tool definitions, schemas. Each is at most
# its JSON's bytes, plus the template it is wrapped in.
PROMPT_FIELDS = ("tools", "tool_choice", "functions", "function_call", "response_format")
MOST_PREAMBLE_TOKENS = 256  # a provider's words around tools or a schema ("You may call these functions: ...")
_sizes: dict[int, tuple[Any, int]] = {}  # id(value) -> (value, its JSON's bytes): a spec's tools are one object


def most_field_tokens(body: dict[str, Any]) -> int:
    """The most tokens the fields beside the messages add to a request's prompt (tools, schemas)."""
    total = 0
    for name in PROMPT_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        known = _sizes.get(id(value))
        if known is None or known[0] is not value:
            if len(_sizes) >= 256:  # bodies made afresh each time: forget rather than hold them all
                _sizes.clear()
            known = _sizes[id(value)] = (value, len(json.dumps(value, ensure_ascii=False).encode()))
        total += known[1] + MOST_PREAMBLE_TOKENS
    return total


def choices(body: dict[str, Any]) -> int:
    """How many answers a request asks for (`n`): each is billed."""
    n = body.get("n")
    return n if isinstance(n, int) and n > 1 else 1  # True is an int, but not > 1


MOST_BYTES_PER_TOKEN = 32  # longer than any common tokenizer's longest usual token (runs of spaces, dashes)


def least_prompt_tokens(prompt: Any) -> int:
    """The fewest tokens a prompt's text can be: a prompt longer than a model's context even by this bound is
    refused unsent (the byte count, an upper bound, would refuse prompts that fit)."""
    return sum(len(t.encode()) for t in prompt_texts(prompt)) // MOST_BYTES_PER_TOKEN


def expected_completion_tokens(spec: JobSpec, pricing: Pricing | None = None) -> tuple[float, str]:
    """How long an answer should be, before any is seen: (tokens, why)."""
    limit = RequestBuilder(spec).max_completion_tokens(pricing)
    response_format = spec.response_format or {}
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        return min(limit, _schema_tokens(schema, schema, 0)), "the size of a typical answer to the response schema"
    has_limit = any(key in spec.params for key in ("max_tokens", "max_completion_tokens"))
    return (
        (limit / 2, "half of max_tokens")
        if has_limit
        else (256.0, "a guess of 256 tokens (set max_tokens for a better one)")
    )


def _schema_tokens(node: Any, root: dict[str, Any], depth: int) -> float:
    """Rough tokens of a JSON value shaped by `node`: keys, punctuation and typical values."""
    if not isinstance(node, dict) or depth > 8:
        return 4.0
    node = resolve_ref(node, root)
    if node.get("enum"):
        return max(len(json.dumps(v)) for v in node["enum"]) / 4 + 1
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or "properties" in node:
        properties = node.get("properties") or {}
        return 2 + sum(len(name) / 4 + 2 + _schema_tokens(sub, root, depth + 1) for name, sub in properties.items())
    if kind == "array":
        return 2 + 3 * _schema_tokens(node.get("items", {}), root, depth + 1)
    if kind in ("integer", "number", "boolean", "null"):
        return 2.0
    return 12.0  # a free-text string: a short phrase
