"""The run's money as the row flow sees it: what a request may cost, what an answer did cost. Pure.

Two objects, because a run can hold several jobs (the answers, then a judge's grades) that
share one budget and one set of prices:

- `Accounts` is the run's: the price table, the budget, and what the run learned about
  prices as answers came back (OpenRouter's BYOK fee is billed; a request cost more than
  its worst case, so the prices are too low), plus what batches saved. Every job of the run
  and every pair share it.
- `Pricer` is one job's view of it: the spec's plugins, tier and fallbacks price a request.
  It computes a request's worst case (its reservation), refuses a request that cannot fit
  (the context, the whole budget) before it is sent, and makes an attempt's charge.

Neither waits, sends or reads a clock: the drivers (live.py, batch.py) own waiting for the
budget; `Accounts.settle` only says when the run must stop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from batchrunner.costs import (
    BYOK_FEE_SHARE,
    FILE_PARSER_USD_PER_PAGE,
    ZERO_USD,
    Budget,
    Charge,
    PriceTable,
    Usage,
    charge,
    format_usd,
    plugin_allowance_usd,
    tier_of,
)
from batchrunner.errors import RequestRejected
from batchrunner.request import (
    MOST_BYTES_PER_TOKEN,
    NO_MEDIA,
    PROMPT_FIELDS,
    MediaTally,
    RequestBuilder,
    body_prompt,
    choices,
    least_prompt_tokens,
    media_tally,
    most_field_tokens,
    most_text_tokens,
)
from batchrunner.spec import JobSpec

log = logging.getLogger("batchrunner")


@dataclass
class Accounts:
    """What every job and pair of one run share about money."""

    pricing: PriceTable = field(default_factory=lambda: PriceTable([]))
    budget: Budget | None = None
    # The share of a request's worst case OpenRouter's BYOK fee may add: reserved from the first request where
    # the server may bill BYOK (OpenRouter), else from the first BYOK answer on.
    fee_share: Decimal = ZERO_USD
    underpriced: Decimal = Decimal(1)  # how many times its worst case a request cost, at most: reservations scale
    saved_usd: Decimal = ZERO_USD  # batches: what their answers would have cost more at live prices
    fee_said: bool = False  # the fee in reservations is told once, when it is learned from an answer
    tiers_said: set[str] = field(default_factory=set)  # models warned of answers served at a tier not asked for

    @classmethod
    def of(cls, pricing: PriceTable | None = None, budget: Budget | None = None, *, byok_fee: bool = False) -> Accounts:
        return cls(
            pricing or PriceTable([]), budget, fee_share=BYOK_FEE_SHARE if byok_fee else ZERO_USD, fee_said=byok_fee
        )

    def settle(self, reserved_usd: Decimal, actual_usd: Decimal) -> str | None:
        """Turn a reservation into what was spent; the reason the run must stop, if it must.

        A request that cost more than its worst case means the prices it was reserved at are too low (a stale
        `prices:` entry, a provider dearer than listed): later requests reserve that many times more, and once
        the budget is passed the run stops, saying why."""
        budget = self.budget
        if budget is None:
            return None
        budget.settle(reserved_usd, actual_usd)
        if not actual_usd > reserved_usd > 0:
            return None
        ratio = actual_usd / reserved_usd
        if self.learn(reserved_usd, actual_usd):
            log.warning(
                "a request cost %s, %.1f times its worst case at the model's prices: they are too low (a stale "
                "prices: entry?); later requests reserve that many times more",
                format_usd(actual_usd),
                ratio,
            )
        if budget.spent_usd + budget.reserved_usd > budget.limit_usd:
            return (
                f"budget of {format_usd(budget.limit_usd)} passed: {format_usd(budget.spent_usd)} spent, as "
                f"requests cost up to {ratio:.1f} times what the model's prices allow; check its prices"
            )
        return None

    def learn(self, reserved_usd: Decimal, actual_usd: Decimal) -> bool:
        """What a settled request teaches about prices: one that cost more than its worst case scales later
        reservations by as much (True when this is news). A worker process whose budget its parent holds learns
        here too, so its reservations scale as the parent's would."""
        if not actual_usd > reserved_usd > 0 or actual_usd / reserved_usd <= self.underpriced:
            return False
        self.underpriced = actual_usd / reserved_usd
        return True

    def exhausted(self, worst_usd: Decimal) -> str | None:
        """Why the run stops when a request's worst case does not fit and nothing in flight can free any."""
        budget = self.budget
        if budget is None or budget.reserved_usd > 0:
            return None
        return (
            f"budget of {format_usd(budget.limit_usd)} reached: {format_usd(budget.spent_usd)} spent, "
            f"and the next request could cost up to {format_usd(worst_usd)}"
        )


class Pricer:
    """One job's prices: a request's worst case, its refusal before it is sent, an attempt's charge."""

    def __init__(self, spec: JobSpec, requests: RequestBuilder, accounts: Accounts) -> None:
        self.spec = spec
        self.requests = requests
        self.accounts = accounts

    def reservation(self, body: dict[str, Any], model: str) -> Decimal:
        """What a request reserves against the budget: its worst case; nothing without a budget."""
        return ZERO_USD if self.accounts.budget is None else self.worst_case(body, model)

    def refusal(self, body: dict[str, Any], model: str, reserve_usd: Decimal) -> RequestRejected | None:
        """Why a request must not be sent at all, or None: a prompt that even its fewest possible tokens would
        not fit in the model's context (unless OpenRouter's middle-out transform is asked to make it fit), or a
        worst case more than the whole budget."""
        pricing = self.accounts.pricing.get(model)
        if pricing is not None and pricing.context_length and not _middle_out(body):
            prompt = body_prompt(body)
            if most_text_tokens(prompt) > pricing.context_length or any(f in body for f in PROMPT_FIELDS):
                least = least_prompt_tokens(prompt) + (most_field_tokens(body) // MOST_BYTES_PER_TOKEN)
                if least > pricing.context_length:
                    return RequestRejected(
                        f"the prompt is at least {least:,} tokens, more than {model}'s context of "
                        f"{pricing.context_length:,} (nothing was sent): shorten it, or ask for params.transforms: "
                        "[middle-out]",
                        code="context_length",
                    )
        budget = self.accounts.budget
        if budget is not None and reserve_usd > budget.limit_usd:
            return RequestRejected(
                f"this request could cost up to {format_usd(reserve_usd)}, more than the whole budget of "
                f"{format_usd(budget.limit_usd)} (nothing was sent): shorten the prompt or lower max_tokens",
                code="over_budget",
            )
        return None

    def worst_case(self, body: dict[str, Any], model: str) -> Decimal:
        """The most one request can cost: its prompt, its max_tokens, and what plugins may add, at the dearer of
        the standard tier's prices and those of the tier it asks (a flex request without a flex endpoint is served
        at the standard ones; a priority one costs more), with OpenRouter's BYOK fee on top where it may be billed
        (fee_share). With server-side fallbacks OpenRouter may answer with any model of the chain: the dearest."""
        accounts = self.accounts
        candidates = self.spec.model_chain(model) if self.spec.server_fallbacks else [model]
        prompt = body_prompt(body)
        text_tokens, media = most_text_tokens(prompt) + most_field_tokens(body), media_tally(prompt)
        fitted = _middle_out(body)  # OpenRouter cuts the prompt to the context: it bills no more than that
        worst = []
        for name in candidates:
            pricing = accounts.pricing[name]
            context = pricing.context_length
            # Servers bill the prompt they were sent, longer than the context or not: the text is never capped.
            # What media adds is a guess; a provider resizes images and pages to what the model takes.
            tokens = text_tokens + min(media.most_tokens(), context or media.most_tokens())
            if fitted and context:
                tokens = min(tokens, context)
            completion = self.requests.max_completion_tokens(pricing, body) * choices(body)
            tiered = accounts.pricing.tier(name, body.get("service_tier") or "")  # a dearer tier (priority)
            for listed in (pricing, *([tiered] if tiered is not None else [])):
                worst.append(
                    listed.worst_case_usd(tokens, completion, images=media.images) + self.allowance(name, media)
                )
        return max(worst) * (1 + accounts.fee_share) * accounts.underpriced

    def allowance(self, model: str, media: MediaTally | None = None) -> Decimal:
        """What a request may cost beyond its tokens: web search results, and parsing its PDFs' pages."""
        pages = media.most_pages() if media is not None else 0
        return plugin_allowance_usd(self.spec.params.get("plugins"), model) + pages * FILE_PARSER_USD_PER_PAGE

    def estimate(self, body: dict[str, Any], model: str, reserved_usd: Decimal) -> tuple[Decimal, str]:
        """An attempt whose reply was abandoned (a timeout, a cap, a stop), at its worst case, `estimated`: the
        server may have billed it, and counting too much is safer than counting nothing; `unknown` unpriced."""
        if self.accounts.budget is not None:
            return reserved_usd, "estimated"
        try:
            return self.worst_case(body, model), "estimated"
        except KeyError:  # a model without prices
            return ZERO_USD, "unknown"

    def charged(
        self,
        usage: Usage,
        model: str,
        requested: str | None = None,
        generation_id: str | None = None,
        media: MediaTally | None = None,
        tier: str | None = None,
    ) -> Charge:
        """One answer's cost: reported, else computed from prices, else unknown (costs.charge). With BYOK it is
        OpenRouter's fee and the provider's upstream cost together; an answer served at a tier (flex) is priced
        at that tier's endpoint price when it must be computed.

        A reported cost is not used when it is not believable: negative or not a number
        (the client set it aside), or far above what the model's prices allow for the
        tokens (ten times the worst case, plus what plugins such as web search may add; the
        whole of a BYOK answer's cost is judged, not the fee alone)."""
        accounts = self.accounts
        pricing = accounts.pricing.get(model) or accounts.pricing.get(requested or model)
        media = media or NO_MEDIA
        ceiling = None
        if pricing is not None:
            ceiling = 10 * pricing.worst_case_usd(
                usage.prompt_tokens, usage.completion_tokens, images=media.images
            ) + self.allowance(requested or model, media)
        served = accounts.pricing.tier(model, tier or "") or accounts.pricing.tier(requested or model, tier or "")
        paid = charge(usage, served or pricing, ceiling_usd=ceiling, images=media.images)
        if paid.rejected is not None:
            log.warning(
                "%s: %s (generation %s): the cost is %s instead",
                model,
                paid.rejected,
                generation_id or "unknown",
                "computed from prices" if pricing else "unknown",
            )
        if usage.is_byok and accounts.fee_share < BYOK_FEE_SHARE:
            accounts.fee_share = BYOK_FEE_SHARE
        if usage.is_byok and accounts.budget is not None and not accounts.fee_said:
            accounts.fee_said = True
            log.warning(
                "%s answered through your own provider key (BYOK): each request now reserves its worst case plus "
                "OpenRouter's fee (%s%%) against the budget",
                model,
                f"{BYOK_FEE_SHARE * 100:g}",
            )
        self._say_tier(requested or model, tier)
        return paid

    def _say_tier(self, model: str, tier: str | None) -> None:
        """Warn once a model when an answer was served at another tier than the job asked (params.service_tier):
        flex asked, and the standard tier served it at its price, is never silent."""
        asked = self.spec.params.get("service_tier")
        said = self.accounts.tiers_said
        if asked is None or tier is None or tier_of(tier) == tier_of(asked) or model in said:
            return
        said.add(model)
        log.warning(
            "params.service_tier %s: %s answered at the %s tier, billed at its price (service_tier column)",
            asked,
            model,
            tier,
        )


def _middle_out(body: dict[str, Any]) -> bool:
    """Whether the request asks OpenRouter to cut its prompt to fit the context (transforms: [middle-out])."""
    transforms = body.get("transforms")
    return isinstance(transforms, list) and "middle-out" in transforms
