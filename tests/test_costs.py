"""Money: prices from /models, exact cost arithmetic, budgets."""

from __future__ import annotations

from decimal import Decimal

import pytest

from batchrunner.costs import (
    Budget,
    PriceTable,
    Pricing,
    Usage,
    format_usd,
    per_million,
    plugin_allowance_usd,
    to_decimal,
    total_usd,
)


def model(slug: str, **prices: object) -> dict[str, object]:
    return {"id": slug, "pricing": prices, "context_length": 1000, "top_provider": {"max_completion_tokens": 500}}


def test_cost_prices_each_kind_of_token_at_its_own_rate() -> None:
    """Cached reads, cache writes, reasoning and the per-request fee each use their price; discount applies to all."""
    pricing = Pricing.from_model(
        model(
            "a/b",
            prompt="0.000001",
            completion="0.000002",
            request="0.001",
            input_cache_read="0.0000001",
            input_cache_write="0.00000125",
            internal_reasoning="0.000003",
            discount=0.5,
        )
    )
    assert pricing is not None
    usage = Usage(
        prompt_tokens=1000, completion_tokens=300, cached_tokens=600, cache_write_tokens=100, reasoning_tokens=200
    )
    expected = (
        300 * Decimal("0.000001")
        + 600 * Decimal("0.0000001")
        + 100 * Decimal("0.00000125")
        + 100 * Decimal("0.000002")
        + 200 * Decimal("0.000003")
        + Decimal("0.001")
    ) * Decimal("0.5")
    assert pricing.cost_usd(usage) == expected


def test_missing_optional_prices_fall_back_to_the_base_price() -> None:
    """Without cache or reasoning prices, those tokens cost the prompt or completion price."""
    pricing = Pricing.from_model(model("a/b", prompt="0.000001", completion="0.000002"))
    assert pricing is not None
    usage = Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=4, reasoning_tokens=2)
    assert pricing.cost_usd(usage) == 10 * Decimal("0.000001") + 5 * Decimal("0.000002")


def test_price_table_handles_variants_routers_and_unknowns() -> None:
    """:nitro/:floor are priced as the base model, :free as its own entry; router "-1" prices are no prices."""
    table = PriceTable(
        [
            model("a/b", prompt="0.000001", completion="0.000002"),
            model("a/b:free", prompt="0", completion="0"),
            model("openrouter/auto", prompt="-1", completion="-1"),
        ]
    )
    assert table["a/b:nitro"].prompt == Decimal("0.000001")
    assert table["a/b:free"].prompt == 0
    assert "openrouter/auto" not in table and "x/y" not in table
    with pytest.raises(KeyError):
        table["x/y"]


def test_worst_case_bounds_the_cost() -> None:
    """The worst case (every token uncached, answer at its limit) is never below a real cost."""
    pricing = Pricing.from_model(model("a/b", prompt="0.000001", completion="0.000002", internal_reasoning="0.000004"))
    assert pricing is not None
    worst = pricing.worst_case_usd(100, 50)
    assert worst == 100 * Decimal("0.000001") + 50 * Decimal("0.000004")
    assert (
        pricing.cost_usd(Usage(prompt_tokens=100, completion_tokens=50, reasoning_tokens=50, cached_tokens=30)) <= worst
    )


def test_budget_never_lets_spent_plus_reserved_exceed_the_limit() -> None:
    """Reservations that would pass the limit are refused; settling swaps a reservation for the real cost."""
    budget = Budget(Decimal("1.00"))
    assert budget.reserve(Decimal("0.60"))
    assert not budget.reserve(Decimal("0.50"))
    budget.settle(Decimal("0.60"), Decimal("0.20"))
    assert budget.reserve(Decimal("0.50"))
    assert budget.spent_usd + budget.reserved_usd == Decimal("0.70")


def test_money_helpers() -> None:
    """JSON numbers become the decimals they were written as; sums are exact; prices read per million."""
    assert to_decimal(0.000123) == Decimal("0.000123") and to_decimal(1.5e-05) == Decimal("0.000015")
    assert (
        to_decimal(None) is None
        and to_decimal("n/a") is None
        and to_decimal(True) is None
        and to_decimal(float("nan")) is None
    )
    assert total_usd([Decimal("0.1"), None, Decimal("0.2")]) == Decimal("0.3")
    assert format_usd(Decimal("12.345")) == "$12.35" and format_usd(Decimal("0.000675")) == "$0.000675"
    assert per_million(Decimal("0.00000015")) == Decimal("0.15")


def test_web_search_plugins_are_reserved_for() -> None:
    """The web plugin (or an :online model) may add $4 per 1,000 results to a request: 5 by default, or max_results."""
    assert plugin_allowance_usd(None, "openai/gpt-4o-mini") == 0
    assert plugin_allowance_usd(None, "openai/gpt-4o-mini:online") == Decimal("0.02")
    assert plugin_allowance_usd([{"id": "web", "max_results": 10}], "m") == Decimal("0.04")
    assert plugin_allowance_usd([{"id": "web", "enabled": False}], "m") == 0
    assert plugin_allowance_usd([{"id": "file-parser"}], "m") == 0


def test_images_and_audio_are_priced_at_their_own_rates() -> None:
    """Each image adds pricing.image; audio tokens cost pricing.audio instead of the prompt price; the worst case
    counts both, and a missing or negative image price is no price."""
    pricing = Pricing.from_model(model("a/b", prompt="0.000001", completion="0.000002", image="0.005", audio="0.00001"))
    assert pricing is not None
    usage = Usage(prompt_tokens=1000, completion_tokens=10, audio_tokens=100)
    text_cost = Decimal("0.000001") * 900 + Decimal("0.00001") * 100 + Decimal("0.000002") * 10
    assert pricing.cost_usd(usage) == text_cost
    assert pricing.cost_usd(usage, images=3) == text_cost + Decimal("0.015")
    assert pricing.worst_case_usd(1000, 10, images=3) == Decimal("0.00001") * 1000 + Decimal("0.000002") * 10 + Decimal(
        "0.015"
    )
    cheap = Pricing.from_model(model("a/c", prompt="0.000001", completion="0.000002", image="-1"))
    assert cheap is not None and cheap.image == 0


def test_price_table_knows_what_each_model_takes() -> None:
    """architecture.input_modalities is kept per model (variants included); models that take images are listed."""
    table = PriceTable(
        [
            {**model("v/see", prompt="0", completion="0"), "architecture": {"input_modalities": ["text", "image"]}},
            {**model("t/text", prompt="0", completion="0"), "architecture": {"input_modalities": ["text"]}},
            model("u/unknown", prompt="0", completion="0"),
        ]
    )
    assert table.inputs("v/see:nitro") == {"text", "image"}
    assert table.inputs("u/unknown") is None
    assert table.taking("image") == ["v/see"]
