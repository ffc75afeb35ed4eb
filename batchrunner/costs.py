"""Money: exact arithmetic in Decimal USD. Pure, no I/O.

OpenRouter reports `usage.cost` as a JSON number; it is read as the decimal it was
written as and summed as Decimal, so a run's total never drifts from what was billed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, TypeVar

ZERO_USD = Decimal(0)
MILLION = Decimal(1_000_000)
T = TypeVar("T")


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer, and what OpenRouter said it cost."""

    prompt_tokens: int = 0
    completion_tokens: int = 0  # reasoning tokens included, as OpenRouter counts them
    cached_tokens: int = 0  # prompt tokens read from the cache
    cache_write_tokens: int = 0  # prompt tokens written to the cache
    reasoning_tokens: int = 0
    audio_tokens: int = 0  # prompt tokens that were audio
    cost_usd: Decimal | None = None  # usage.cost; None when the server does not report it (BYOK: OpenRouter's fee)
    cost_rejected: str | None = None  # why a reported usage.cost was not used (negative, not finite, absurd)
    is_byok: bool = False  # usage.is_byok: served through a provider key of the user's own
    upstream_cost_usd: Decimal | None = None  # usage.cost_details.upstream_inference_cost: what the provider billed
    upstream_rejected: str | None = None  # why a reported upstream cost was not used


@dataclass(frozen=True)
class Pricing:
    """A model's prices from GET /models: USD per token (per request for `request`)."""

    prompt: Decimal = ZERO_USD
    completion: Decimal = ZERO_USD
    request: Decimal = ZERO_USD
    image: Decimal = ZERO_USD  # per input image
    audio: Decimal | None = None  # per input audio token; defaults to the prompt price
    internal_reasoning: Decimal | None = None  # defaults to the completion price
    input_cache_read: Decimal | None = None  # defaults to the prompt price
    input_cache_write: Decimal | None = None  # defaults to the prompt price
    discount: Decimal = ZERO_USD  # prices are multiplied by (1 - discount)
    max_completion_tokens: int | None = None  # the most a single answer can be
    context_length: int | None = None

    @classmethod
    def per_million(cls, prompt_usd: Decimal, completion_usd: Decimal) -> Pricing:
        """Prices given as people write them, in USD per million tokens."""
        return cls(prompt=prompt_usd / MILLION, completion=completion_usd / MILLION)

    @classmethod
    def from_model(cls, model: dict[str, Any]) -> Pricing | None:
        """Prices from one GET /models entry; None when the prompt or completion price is missing, or when any
        price it lists is not one (see `unusable_price`: "-1" for routers, "1e400", "NaN")."""
        prices = model.get("pricing")
        if not isinstance(prices, dict) or unusable_price(prices) is not None:
            return None
        prompt, completion = to_decimal(prices.get("prompt")), to_decimal(prices.get("completion"))
        if prompt is None or completion is None:
            return None
        top: dict[str, Any] = model["top_provider"] if isinstance(model.get("top_provider"), dict) else {}
        return cls(
            prompt=prompt,
            completion=completion,
            request=to_decimal(prices.get("request")) or ZERO_USD,
            image=to_decimal(prices.get("image")) or ZERO_USD,
            audio=to_decimal(prices.get("audio")),
            internal_reasoning=to_decimal(prices.get("internal_reasoning")),
            input_cache_read=to_decimal(prices.get("input_cache_read")),
            input_cache_write=to_decimal(prices.get("input_cache_write")),
            discount=to_decimal(prices.get("discount")) or ZERO_USD,
            max_completion_tokens=_tokens(top.get("max_completion_tokens")),
            context_length=_tokens(model.get("context_length")) or _tokens(top.get("context_length")),
        )

    def cost_usd(self, usage: Usage, *, images: int = 0) -> Decimal:
        """What `usage` costs at these prices: cache reads and writes, audio and reasoning at their own
        rates, and the per-image price for each of the request's `images`."""
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        written = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
        audio = min(usage.audio_tokens, usage.prompt_tokens - cached - written)
        reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
        cost = (
            (usage.prompt_tokens - cached - written - audio) * self.prompt
            + cached * _or(self.input_cache_read, self.prompt)
            + written * _or(self.input_cache_write, self.prompt)
            + audio * _or(self.audio, self.prompt)
            + (usage.completion_tokens - reasoning) * self.completion
            + reasoning * _or(self.internal_reasoning, self.completion)
            + self.request
            + images * self.image
        )
        return cost * (1 - self.discount)

    def estimate_usd(
        self, prompt_tokens: Decimal | int, completion_tokens: Decimal | int, requests: int = 1
    ) -> Decimal:
        """What `requests` requests with these token totals should cost, nothing cached."""
        return (prompt_tokens * self.prompt + completion_tokens * self.completion + requests * self.request) * (
            1 - self.discount
        )

    def worst_case_usd(self, prompt_tokens: int, completion_tokens: int, requests: int = 1, images: int = 0) -> Decimal:
        """The most requests can cost: every prompt token uncached (at the dearer of the prompt and audio
        prices), every answer token at the dearer of the completion and reasoning prices, and each image."""
        prompt = max(self.prompt, _or(self.audio, ZERO_USD))
        completion = max(self.completion, _or(self.internal_reasoning, ZERO_USD))
        return (
            prompt_tokens * prompt + completion_tokens * completion + requests * self.request + images * self.image
        ) * (1 - self.discount)


VARIANT_SUFFIXES = (":nitro", ":floor", ":exacto", ":thinking", ":extended", ":online")
STANDARD_TIER = "standard"
_TIER_NAMES = {"": STANDARD_TIER, "auto": STANDARD_TIER, "default": STANDARD_TIER, "fast": "priority"}


def tier_of(value: Any) -> str:
    """A `service_tier` (asked in a request, said by a response or an endpoint) by the name its price goes by:
    the standard tier for none, `auto` or `default`; `priority` for its alias `fast`; else the name itself."""
    name = value.lower() if isinstance(value, str) else ""
    return _TIER_NAMES.get(name, name)


class PriceTable:
    """Prices by model slug, from GET /models. A routing variant (`:nitro`, `:floor`, ...)
    is priced as its base model; `:free` variants are listed as models of their own.

    `fallback` prices models the server does not price (a spec's `prices:`): a price the server
    lists wins, since it is what the server bills, and a spec's price can go stale. A fallback
    price does not make a model listed (`ids`, `lists`)."""

    def __init__(self, models: list[dict[str, Any]], fallback: Mapping[str, Pricing] | None = None) -> None:
        self._prices: dict[str, Pricing] = {}
        self.ids = {model["id"] for model in models if isinstance(model.get("id"), str)}  # priced or not
        self._inputs: dict[str, frozenset[str]] = {}  # architecture.input_modalities: text, image, file, audio
        for model in models:
            architecture = model.get("architecture")
            modalities = architecture.get("input_modalities") if isinstance(architecture, dict) else None
            if isinstance(model.get("id"), str) and isinstance(modalities, list):
                self._inputs[model["id"]] = frozenset(str(m) for m in modalities)
        self._unusable: dict[str, str] = {}  # why a model that lists prices is unpriced all the same
        for model in models:
            if not isinstance(model.get("id"), str):
                continue
            pricing = Pricing.from_model(model)
            if pricing is not None:
                self._prices[model["id"]] = pricing
            elif isinstance(model.get("pricing"), dict) and (why := unusable_price(model["pricing"])) is not None:
                self._unusable[model["id"]] = why
        unpriced = {slug: pricing for slug, pricing in (fallback or {}).items() if self.get(slug) is None}
        self._prices.update(unpriced)
        self.overridden = sorted(set(fallback or {}) - set(unpriced))  # fallback prices the server's replaced
        self._tiers: dict[str, dict[str, Pricing]] = {}  # model -> tier (flex, priority) -> its endpoints' price

    def get(self, slug: str) -> Pricing | None:
        return _by_slug(self._prices, slug)

    def add_tiers(self, endpoints: Mapping[str, list[dict[str, Any]]]) -> None:
        """The prices of each model's tier endpoints (`service_tier` flex, priority: GET /models/{model}/endpoints),
        for answers a tier served. Of two endpoints of one tier, the dearer (by prompt and completion) is kept:
        an answer whose cost is computed is never counted at less than it may have cost."""
        for slug, listed in endpoints.items():
            for endpoint in listed:
                tier = tier_of(endpoint.get("service_tier"))
                pricing = Pricing.from_model({"pricing": endpoint.get("pricing")})
                if tier == STANDARD_TIER or pricing is None:
                    continue
                known = self._tiers.setdefault(slug, {}).get(tier)
                if known is None or pricing.prompt + pricing.completion > known.prompt + known.completion:
                    self._tiers[slug][tier] = pricing

    def tier(self, slug: str, tier: str) -> Pricing | None:
        """The price of `slug` at `tier` (flex, priority) as its tier endpoints list it; None when none does."""
        tiers = _by_slug(self._tiers, slug)
        return None if tiers is None else tiers.get(tier_of(tier))

    def served(self, slug: str, tier: Any = None) -> Pricing | None:
        """The price an answer from `slug` served at `tier` (the response's `service_tier`) is billed at: the
        tier's endpoint price when the endpoints list one, else the model's own (standard) price."""
        return self.tier(slug, tier) or self.get(slug)

    def unusable(self, slug: str) -> str | None:
        """Why the model's listed prices could not be used (its prompt price '1e400' is not ...), if they could not."""
        return _by_slug(self._unusable, slug)

    def inputs(self, slug: str) -> frozenset[str] | None:
        """What the model takes (text, image, file, audio, video), or None when /models did not say."""
        for candidate in (slug, *(slug.removesuffix(s) for s in VARIANT_SUFFIXES if slug.endswith(s))):
            if candidate in self._inputs:
                return self._inputs[candidate]
        return None

    def taking(self, kind: str) -> list[str]:
        """The models that take `kind` of input."""
        return sorted(slug for slug, kinds in self._inputs.items() if kind in kinds)

    def lists(self, slug: str) -> bool:
        """Whether GET /models named this model (or the model a routing variant of it is)."""
        return slug in self.ids or any(slug.endswith(s) and slug.removesuffix(s) in self.ids for s in VARIANT_SUFFIXES)

    def __contains__(self, slug: object) -> bool:
        return isinstance(slug, str) and self.get(slug) is not None

    def __getitem__(self, slug: str) -> Pricing:
        pricing = self.get(slug)
        if pricing is None:
            raise KeyError(slug)
        return pricing


def _by_slug(table: dict[str, T], slug: str) -> T | None:
    """The entry for `slug`, or for the model a routing variant of it is (`a/b:nitro` is `a/b`)."""
    if slug in table:
        return table[slug]
    for suffix in VARIANT_SUFFIXES:
        if slug.endswith(suffix):
            return table.get(slug.removesuffix(suffix))
    return None


MAX_PRICE_USD = Decimal(1000)  # the dearest a token, a request or an image may be listed at (the dearest sold
# are fractions of a cent a token, cents a request or an image): above it, or below 0, a price is not one, and
# figures made from it (1e400 per token) could not even be rounded to cents
PRICE_KEYS = (
    "prompt",
    "completion",
    "request",
    "image",
    "audio",
    "internal_reasoning",
    "input_cache_read",
    "input_cache_write",
)  # the prices the cost arithmetic uses; a discount is checked apart


def unusable_price(prices: dict[str, Any]) -> str | None:
    """Why a /models `pricing` object cannot price answers: the first price it lists (one the arithmetic uses)
    that is not a number of dollars from 0 to MAX_PRICE_USD, or a discount that is not a number from 0 to 1.
    None when every listed one can be used; a price not listed (absent or null) is not a reason."""
    for key in PRICE_KEYS:
        value = prices.get(key)
        price = to_decimal(value)
        if value is not None and (price is None or not ZERO_USD <= price <= MAX_PRICE_USD):
            return f"its {key} price {_shown(value)} is not a number of dollars from 0 to {MAX_PRICE_USD:,}"
    value = prices.get("discount")
    discount = to_decimal(value)
    if value is not None and (discount is None or not ZERO_USD <= discount <= 1):
        return f"its discount price {_shown(value)} is not a number from 0 to 1"
    return None


def _shown(value: Any) -> str:
    """A value from the server, for a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


MAX_TOKENS = 100_000_000  # the most tokens a context or an answer may be listed at: a larger count is no count


def _tokens(value: Any) -> int | None:
    """A listed context length or answer limit: a count of tokens from 1 to MAX_TOKENS, else no limit."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_TOKENS:
        return value
    return None


WEB_SEARCH_USD_PER_RESULT = Decimal("0.004")  # OpenRouter's web plugin: $4 per 1,000 results
WEB_SEARCH_DEFAULT_RESULTS = 5


def plugin_allowance_usd(plugins: Any, model: str) -> Decimal:
    """The most a request's plugins may add to its token cost: web search results (the `web`
    plugin, or a `:online` model), at $4 per 1,000 results, 5 results unless max_results says."""
    results = WEB_SEARCH_DEFAULT_RESULTS if model.endswith(":online") else 0
    for plugin in plugins if isinstance(plugins, list) else []:
        if isinstance(plugin, dict) and plugin.get("id") == "web" and plugin.get("enabled", True) is not False:
            wanted = plugin.get("max_results")
            results = max(results, wanted if isinstance(wanted, int) and wanted > 0 else WEB_SEARCH_DEFAULT_RESULTS)
    return results * WEB_SEARCH_USD_PER_RESULT


FILE_PARSER_USD_PER_PAGE = Decimal("0.002")  # OpenRouter's file-parser plugin (mistral-ocr): $2 per 1,000 pages


def _or(value: Decimal | None, default: Decimal) -> Decimal:
    return default if value is None else value


def per_million(price: Decimal) -> Decimal:
    """USD per token as USD per million tokens, the unit people compare prices in."""
    return (price * MILLION).normalize()


BYOK_FEE_SHARE = Decimal("0.055")  # OpenRouter's BYOK fee, "about 5%" of the provider's price (reference §12),
# taken as 5.5% wherever it must be assumed: in each request's reservation, and for a fee a BYOK answer leaves out


@dataclass(frozen=True)
class Charge:
    """What one answer cost, and how that is known.

    `cost_usd` is the whole of it. With BYOK (a provider key of the user's own) that is OpenRouter's fee
    (usage.cost) plus what the provider billed the user's key (usage.cost_details.upstream_inference_cost),
    which is `upstream_usd`; without BYOK, `upstream_usd` is None, as usage.cost is then the whole charge."""

    cost_usd: Decimal
    source: str  # reported (every part from usage), computed (a part or all from prices), unknown (no price)
    upstream_usd: Decimal | None = None
    rejected: str | None = None  # why a reported figure was set aside


def charge(usage: Usage, pricing: Pricing | None, *, ceiling_usd: Decimal | None = None, images: int = 0) -> Charge:
    """What `usage` cost: as reported, where the server reported it believably; else from `pricing`.

    A BYOK answer's usage.cost is only OpenRouter's fee: the provider's upstream cost is added to it (never
    when is_byok is not true: a non-BYOK answer may also list the upstream cost, as a breakdown of usage.cost).
    A missing upstream cost is computed from prices; a missing fee is BYOK_FEE_SHARE of the upstream cost.
    What is reported is not used when its total is above `ceiling_usd` (with BYOK, above the ceiling plus the
    fee): a figure no price explains."""
    byok = usage.is_byok
    fee, upstream = usage.cost_usd, usage.upstream_cost_usd if byok else None
    rejected = usage.cost_rejected or (usage.upstream_rejected if byok else None)
    share = BYOK_FEE_SHARE if byok else ZERO_USD
    said = _or(fee, ZERO_USD) + _or(upstream, ZERO_USD)
    if ceiling_usd is not None and said > ceiling_usd * (1 + share):
        parts = f"usage.cost {fee} with the upstream cost {upstream}" if byok else f"usage.cost {fee}"
        fee, upstream, rejected = None, None, f"{parts} is far above what the prices allow"
    priced = None if pricing is None else pricing.cost_usd(usage, images=images)
    if not byok:
        if fee is not None:  # nothing was set aside
            return Charge(fee, "reported")
        if priced is not None:
            return Charge(priced, "computed", rejected=rejected)
        return Charge(ZERO_USD, "unknown", rejected=rejected)
    part = upstream if upstream is not None else priced
    if part is None:  # the provider's bill is not known: the fee alone, a lower bound
        return Charge(_or(fee, ZERO_USD), "unknown", rejected=rejected)
    source = "reported" if fee is not None and upstream is not None else "computed"
    return Charge(_or(fee, part * BYOK_FEE_SHARE) + part, source, part, rejected)


def saving_usd(live_usd: Decimal, paid: Charge) -> Decimal:
    """What an answer bought at a discount (a batch) saved against `live_usd`, its price live: for a BYOK answer
    its whole cost is set against the live price with the same fee share, never its fee alone."""
    if paid.upstream_usd:
        return live_usd * paid.cost_usd / paid.upstream_usd - paid.cost_usd
    return live_usd - paid.cost_usd


class Budget:
    """Spent plus reserved never exceeds the limit: each request reserves its worst case
    before it goes, and settles to its real cost when it comes back."""

    def __init__(self, limit_usd: Decimal) -> None:
        self.limit_usd = limit_usd
        self.spent_usd = ZERO_USD
        self.reserved_usd = ZERO_USD

    def reserve(self, amount_usd: Decimal) -> bool:
        if self.spent_usd + self.reserved_usd + amount_usd > self.limit_usd:
            return False
        self.reserved_usd += amount_usd
        return True

    def settle(self, reserved_usd: Decimal, actual_usd: Decimal) -> None:
        self.reserved_usd -= reserved_usd
        self.spent_usd += actual_usd


def to_decimal(value: Any) -> Decimal | None:
    """A JSON number (or numeric string) as the Decimal it was written as; None if it is not one.

    Floats go through their shortest round-tripping repr, so 0.000123 becomes
    Decimal('0.000123'), not the binary float's 0.000122999999999999994...
    """
    if value is None or isinstance(value, bool):
        return None
    try:
        result = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return result if result.is_finite() else None


def total_usd(costs: Iterable[Decimal | None]) -> Decimal:
    """The exact sum of the known costs."""
    return sum((c for c in costs if c is not None), ZERO_USD)


def format_usd(amount: Decimal) -> str:
    """Dollars for people: cents for large sums, more digits for the fractions of a cent LLM calls cost."""
    if amount == 0:
        return "$0.00"
    if abs(amount) >= 1:
        return f"${amount.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):,}"
    return f"${amount:.6f}".rstrip("0").rstrip(".") if abs(amount) >= Decimal("0.000001") else f"${amount:.2E}"


def format_cost(amount: Decimal, unpriced: int) -> str:
    """A total for people that never shows an unknown cost as $0.00: "unknown" when nothing was
    priced, "at least $X" when `unpriced` attempts had no price."""
    if not unpriced:
        return format_usd(amount)
    return "unknown" if amount == 0 else f"at least {format_usd(amount)}"
