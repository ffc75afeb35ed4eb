"""Money: prices from /models, exact cost arithmetic, budgets."""

from __future__ import annotations

from decimal import Decimal

import pytest

from batchrunner.costs import (
    BYOK_FEE_SHARE,
    Budget,
    Charge,
    PriceTable,
    Pricing,
    Usage,
    charge,
    format_cost,
    format_usd,
    per_million,
    plugin_allowance_usd,
    saving_usd,
    tier_of,
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
    counts both; a missing image price is free, a negative one leaves the model unpriced."""
    pricing = Pricing.from_model(model("a/b", prompt="0.000001", completion="0.000002", image="0.005", audio="0.00001"))
    assert pricing is not None
    usage = Usage(prompt_tokens=1000, completion_tokens=10, audio_tokens=100)
    text_cost = Decimal("0.000001") * 900 + Decimal("0.00001") * 100 + Decimal("0.000002") * 10
    assert pricing.cost_usd(usage) == text_cost
    assert pricing.cost_usd(usage, images=3) == text_cost + Decimal("0.015")
    assert pricing.worst_case_usd(1000, 10, images=3) == Decimal("0.00001") * 1000 + Decimal("0.000002") * 10 + Decimal(
        "0.015"
    )
    free = Pricing.from_model(model("a/c", prompt="0.000001", completion="0.000002"))
    assert free is not None and free.image == 0
    assert Pricing.from_model(model("a/c", prompt="0.000001", completion="0.000002", image="-1")) is None


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


# Hand-computed tables. Prices per token: $1 per million prompt tokens, $4 per million completion tokens.
PROMPT, COMPLETION = Decimal("0.000001"), Decimal("0.000004")
EVERY_RATE = Pricing(
    prompt=PROMPT,
    completion=COMPLETION,
    input_cache_read=Decimal("0.0000001"),  # $0.10 per million
    input_cache_write=Decimal("0.000002"),  # $2 per million
    audio=Decimal("0.000008"),  # $8 per million
    internal_reasoning=Decimal("0.000016"),  # $16 per million
)


@pytest.mark.parametrize(
    "entry",
    [
        {"id": "a/b"},
        {"id": "a/b", "pricing": "free"},
        {"id": "a/b", "pricing": {"completion": "0.000004"}},
        {"id": "a/b", "pricing": {"prompt": "0.000001"}},
        {"id": "a/b", "pricing": {"prompt": "-1", "completion": "0.000004"}},
        {"id": "a/b", "pricing": {"prompt": "0.000001", "completion": "-1"}},
        {"id": "a/b", "pricing": {"prompt": "n/a", "completion": "0.000004"}},
    ],
)
def test_a_model_without_both_base_prices_has_no_pricing(entry: dict[str, object]) -> None:
    """Unless both the prompt and the completion price are non-negative numbers, a /models entry is unpriced."""
    assert Pricing.from_model(entry) is None


@pytest.mark.parametrize(
    ("limits", "max_completion_tokens", "context_length"),
    [
        ({"context_length": 8000, "top_provider": {"max_completion_tokens": 500, "context_length": 4000}}, 500, 8000),
        ({"top_provider": {"context_length": 4000}}, None, 4000),
        ({"context_length": 8000}, None, 8000),
        ({"context_length": 0, "top_provider": {"max_completion_tokens": 0}}, None, None),
        ({"top_provider": None}, None, None),
        ({}, None, None),
        ({"context_length": "8000", "top_provider": {"max_completion_tokens": 500.5}}, None, None),
        ({"context_length": True, "top_provider": {"max_completion_tokens": 10**400}}, None, None),
        ({"context_length": -5, "top_provider": {"max_completion_tokens": -1}}, None, None),
        ({"context_length": 100_000_001, "top_provider": {"context_length": 4000}}, None, 4000),
        ({"context_length": 100_000_000, "top_provider": {"max_completion_tokens": 1}}, 1, 100_000_000),
    ],
)
def test_limits_come_from_the_model_then_its_top_provider(
    limits: dict[str, object], max_completion_tokens: int | None, context_length: int | None
) -> None:
    """The model's context length wins over its top provider's; zero, missing, or not a count from 1 to 100 million
    tokens (text, a bool, negative, past 100 million) is no limit."""
    pricing = Pricing.from_model({"id": "a/b", "pricing": {"prompt": "0.000001", "completion": "0.000004"}, **limits})
    assert pricing is not None
    assert (pricing.max_completion_tokens, pricing.context_length) == (max_completion_tokens, context_length)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (Usage(prompt_tokens=1000, completion_tokens=500), "0.003"),
        (Usage(prompt_tokens=100, cached_tokens=150), "0.00001"),  # cached capped at the prompt: 100 x $0.10/M
        (Usage(prompt_tokens=100, cached_tokens=60, cache_write_tokens=70), "0.000086"),  # 60 read, only 40 written
        (Usage(prompt_tokens=100, cached_tokens=30, cache_write_tokens=20, audio_tokens=80), "0.000443"),  # 50 audio
        (Usage(completion_tokens=10, reasoning_tokens=20), "0.00016"),  # reasoning capped at the answer: 10 x $16/M
        (
            Usage(
                prompt_tokens=1000,
                completion_tokens=500,
                cached_tokens=200,
                cache_write_tokens=100,
                audio_tokens=50,
                reasoning_tokens=300,
            ),
            "0.00687",  # 650 x $1 + 200 x $0.10 + 100 x $2 + 50 x $8 + 200 x $4 + 300 x $16, per million
        ),
    ],
)
def test_cost_splits_tokens_between_rates_without_counting_any_twice(usage: Usage, expected: str) -> None:
    """Cached, written and audio tokens are carved out of the prompt, reasoning out of the answer, each capped."""
    assert EVERY_RATE.cost_usd(usage) == Decimal(expected)


@pytest.mark.parametrize(
    ("pricing", "kwargs", "expected"),
    [
        (Pricing(prompt=PROMPT, completion=COMPLETION), {}, "0.003"),
        (Pricing(prompt=PROMPT, completion=COMPLETION, request=Decimal("0.001"), image=Decimal("0.005")), {}, "0.004"),
        (
            Pricing(prompt=PROMPT, completion=COMPLETION, request=Decimal("0.001"), image=Decimal("0.005")),
            {"requests": 3, "images": 2},
            "0.016",  # 0.003 + 3 x 0.001 + 2 x 0.005
        ),
        (
            Pricing(prompt=PROMPT, completion=COMPLETION, request=Decimal("0.001"), discount=Decimal("0.25")),
            {},
            "0.003",
        ),
        (Pricing(prompt=PROMPT, completion=COMPLETION, audio=Decimal("0.000008")), {}, "0.01"),  # audio is dearer
        (Pricing(prompt=PROMPT, completion=COMPLETION, audio=Decimal("0.0000005")), {}, "0.003"),  # audio is cheaper
        (Pricing(prompt=PROMPT, completion=COMPLETION, internal_reasoning=Decimal("0.000016")), {}, "0.009"),
    ],
)
def test_worst_case_of_1000_prompt_and_500_answer_tokens(
    pricing: Pricing, kwargs: dict[str, int], expected: str
) -> None:
    """The worst case takes the dearer rates, one request and no image by default, fees and the discount."""
    assert pricing.worst_case_usd(1000, 500, **kwargs) == Decimal(expected)


@pytest.mark.parametrize(
    ("pricing", "requests", "expected"),
    [
        (Pricing(prompt=PROMPT, completion=COMPLETION), None, "0.003"),
        (Pricing(prompt=PROMPT, completion=COMPLETION, request=Decimal("0.001")), None, "0.004"),
        (Pricing(prompt=PROMPT, completion=COMPLETION, request=Decimal("0.001")), 3, "0.006"),
        (Pricing(prompt=PROMPT, completion=COMPLETION, request=Decimal("0.001"), discount=Decimal("0.25")), 1, "0.003"),
    ],
)
def test_estimate_of_1000_prompt_and_500_answer_tokens(pricing: Pricing, requests: int | None, expected: str) -> None:
    """An estimate is tokens at the base rates plus each request's fee (one by default), less the discount."""
    estimate = pricing.estimate_usd(1000, 500) if requests is None else pricing.estimate_usd(1000, 500, requests)
    assert estimate == Decimal(expected)


def listed_models() -> list[dict[str, object]]:
    return [
        model("a/b", prompt="0.000001", completion="0.000004"),
        model("openrouter/auto", prompt="-1", completion="-1"),
        {"pricing": {"prompt": "0.000001", "completion": "0.000004"}},  # no id: ignored
    ]


def listed() -> PriceTable:
    """Built inside each test (not at import), so mutation testing sees the tests that depend on __init__."""
    return PriceTable(listed_models())


@pytest.mark.parametrize(
    ("slug", "named", "priced"),
    [
        ("a/b", True, True),
        ("a/b:nitro", True, True),
        ("openrouter/auto", True, False),
        ("openrouter/auto:floor", True, False),
        ("x/y", False, False),
        ("x/y:nitro", False, False),
        (":nitro", False, False),
    ],
)
def test_price_table_lists_every_named_model_and_prices_only_priced_ones(slug: str, named: bool, priced: bool) -> None:
    """A model /models named is listed even when unpriced; a routing variant counts as its base model."""
    table = listed()
    assert table.lists(slug) is named
    assert (slug in table) is priced


SPEC_PRICE = Pricing(prompt=Decimal("0.000009"), completion=Decimal("0.000009"))  # $9 per million, both


@pytest.mark.parametrize(
    ("slug", "prompt", "overridden", "named"),
    [
        ("a/b", "0.000001", True, True),  # the server prices it: its price wins
        ("a/b:nitro", "0.000001", True, True),  # a variant of a priced model is priced by the server
        ("openrouter/auto", "0.000009", False, True),  # listed without a price: the spec's
        ("x/y", "0.000009", False, False),  # not listed at all: priced by the spec, still not listed
        ("x/y:nitro", "0.000009", False, False),
    ],
)
def test_a_fallback_price_applies_only_where_the_server_has_none(
    slug: str, prompt: str, overridden: bool, named: bool
) -> None:
    """A spec's price prices a model the server does not; the server's own price wins; it lists nothing."""
    table = PriceTable(listed_models(), {slug: SPEC_PRICE})
    assert table[slug].prompt == Decimal(prompt)
    assert table.overridden == ([slug] if overridden else [])
    assert table.lists(slug) is named
    assert "q/r" not in table


def test_a_table_without_fallback_prices_overrides_nothing() -> None:
    """No spec prices: nothing was replaced, and an unpriced model stays unpriced."""
    table = PriceTable(listed_models())
    assert table.overridden == [] and "openrouter/auto" not in table


@pytest.mark.parametrize(
    ("prompt_per_mtok", "completion_per_mtok", "prompt", "completion"),
    [
        ("0.15", "0.60", "0.00000015", "0.0000006"),
        ("1", "4", "0.000001", "0.000004"),
        ("0", "2.5", "0", "0.0000025"),
        ("1000000", "3000000", "1", "3"),
    ],
)
def test_prices_per_million_tokens_are_read_per_token(
    prompt_per_mtok: str, completion_per_mtok: str, prompt: str, completion: str
) -> None:
    """$0.15 per million prompt tokens is $0.00000015 a token, exactly; nothing else is priced."""
    pricing = Pricing.per_million(Decimal(prompt_per_mtok), Decimal(completion_per_mtok))
    assert (pricing.prompt, pricing.completion) == (Decimal(prompt), Decimal(completion))
    assert pricing == Pricing(prompt=Decimal(prompt), completion=Decimal(completion))


def test_looking_up_an_unpriced_model_names_it() -> None:
    """The KeyError for a model without prices carries its slug."""
    with pytest.raises(KeyError) as raised:
        listed()["openrouter/auto"]
    assert raised.value.args == ("openrouter/auto",)


@pytest.mark.parametrize(
    ("plugins", "model_slug", "expected"),
    [
        ([{"id": "web"}], "m", "0.02"),
        ([{"id": "web", "max_results": 1}], "m", "0.004"),
        ([{"id": "web", "max_results": 0}], "m", "0.02"),
        ([{"id": "web", "max_results": -3}], "m", "0.02"),
        ([{"id": "web", "max_results": "10"}], "m", "0.02"),
        ([{"id": "web", "enabled": True, "max_results": 2}], "m", "0.008"),
        ([{"id": "web", "max_results": 3}], "m:online", "0.02"),
        ([{"id": "web", "max_results": 10}], "m:online", "0.04"),
        ([{"id": "file-parser"}, {"id": "web", "max_results": 2}], "m", "0.008"),
        (["web"], "m", "0"),
        ({"id": "web"}, "m", "0"),
    ],
)
def test_web_search_allowance_by_plugin_settings(plugins: object, model_slug: str, expected: str) -> None:
    """$0.004 a result: max_results when it is a positive int, else 5; an :online model reserves at least 5."""
    assert plugin_allowance_usd(plugins, model_slug) == Decimal(expected)


@pytest.mark.parametrize(
    ("amounts", "granted", "reserved"),
    [
        (["1.00"], [True], "1.00"),
        (["0.30", "0.30", "0.30"], [True, True, True], "0.90"),
        (["0.60", "0.40"], [True, True], "1.00"),
        (["0.60", "0.41", "0.40"], [True, False, True], "1.00"),
    ],
)
def test_reservations_add_up_to_the_limit_and_no_further(
    amounts: list[str], granted: list[bool], reserved: str
) -> None:
    """Reservations accumulate; one that brings the total to exactly the limit is granted, one past it is not."""
    budget = Budget(Decimal("1.00"))
    assert [budget.reserve(Decimal(amount)) for amount in amounts] == granted
    assert budget.reserved_usd == Decimal(reserved)


@pytest.mark.parametrize(
    ("actual_costs", "spent", "reserved"),
    [
        (["0.10"], "0.10", "0.60"),
        (["0.10", "0.25"], "0.35", "0.30"),
        (["0.10", "0.25", "0.30"], "0.65", "0"),
    ],
)
def test_settling_swaps_each_reservation_for_its_real_cost(actual_costs: list[str], spent: str, reserved: str) -> None:
    """Each settlement releases its $0.30 reservation and adds its real cost to what was spent."""
    budget = Budget(Decimal("1.00"))
    assert all(budget.reserve(Decimal("0.30")) for _ in range(3))
    for actual in actual_costs:
        budget.settle(Decimal("0.30"), Decimal(actual))
    assert (budget.spent_usd, budget.reserved_usd) == (Decimal(spent), Decimal(reserved))


@pytest.mark.parametrize(
    ("costs", "expected"),
    [([], "0"), ([None], "0"), ([Decimal("0.1"), None, Decimal("0.2")], "0.3")],
)
def test_total_is_always_a_decimal(costs: list[Decimal | None], expected: str) -> None:
    """The total of no known costs is Decimal zero, not the int 0, so callers can quantize it."""
    total = total_usd(costs)
    assert type(total) is Decimal and total == Decimal(expected)


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        ("0", "$0.00"),
        ("1", "$1.00"),
        ("1.5", "$1.50"),
        ("1234.5", "$1,234.50"),
        ("0.5", "$0.5"),
        ("0.000001", "$0.000001"),
        ("0.0000015", "$0.000002"),
        ("0.0000001", "$1.00E-7"),
        ("0.9999999", "$1"),  # rounds up to a whole dollar at six places: the trailing point goes too
    ],
)
def test_format_usd(amount: str, shown: str) -> None:
    """Cents from a dollar up, micro-dollars without trailing zeros below it, scientific below a micro-dollar."""
    assert format_usd(Decimal(amount)) == shown


@pytest.mark.parametrize(
    ("amount", "unpriced", "shown"),
    [
        ("0", 0, "$0.00"),
        ("0.5", 0, "$0.5"),
        ("0", 3, "unknown"),
        ("0.5", 2, "at least $0.5"),
        ("1", 1, "at least $1.00"),
    ],
)
def test_format_cost_never_shows_an_unknown_cost_as_zero(amount: str, unpriced: int, shown: str) -> None:
    """With unpriced attempts the total is "unknown" (nothing priced) or "at least" what was priced."""
    assert format_cost(Decimal(amount), unpriced) == shown


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("prompt", "1e400"),  # finite as a Decimal, but no price: its dollar figure cannot be rounded to cents
        ("prompt", "1e999999999"),  # multiplying overflows
        ("prompt", "inf"),
        ("completion", "NaN"),
        ("prompt", "-1"),  # routers (openrouter/auto) list -1: the price is not known
        ("completion", "-0.000001"),
        ("prompt", "1000.000001"),  # above any price a token, request or image is sold at
        ("request", "1e400"),
        ("image", "-1"),
        ("audio", "-1"),
        ("internal_reasoning", "NaN"),
        ("input_cache_read", "n/a"),
        ("input_cache_write", True),
        ("discount", 5),  # prices times (1 - 5): negative
        ("discount", -0.5),
        ("discount", "1.000001"),
        ("discount", "NaN"),
    ],
)
def test_a_listed_price_that_is_not_a_usable_number_leaves_the_model_unpriced(key: str, value: object) -> None:
    """Any price the cost arithmetic uses must be a number of dollars from 0 to 1,000 (a discount from 0 to 1):
    otherwise the model is unpriced, and the table says which price, and what it was, for the warning."""
    entry = model("a/b", **{"prompt": "0.000001", "completion": "0.000004", key: value})
    assert Pricing.from_model(entry) is None
    table = PriceTable([entry, model("c/d", prompt="0.000001", completion="0.000004")])
    assert "a/b" not in table and table.lists("a/b") and "c/d" in table
    assert (
        table.unusable("a/b:nitro")
        == table.unusable("a/b")
        == f"its {key} price {value!r} is not "
        + ("a number from 0 to 1" if key == "discount" else "a number of dollars from 0 to 1,000")
    )
    assert table.unusable("c/d") is None and table.unusable("x/y") is None


@pytest.mark.parametrize(
    ("prices", "expected"),
    [
        ({}, "0.003"),  # 1000 x $1/M + 500 x $4/M
        ({"prompt": "0"}, "0.002"),
        ({"prompt": "1000"}, "1000000.002"),  # the dearest price a token may be listed at: 1000 x $1,000
        ({"request": "1000"}, "1000.003"),
        ({"request": "0", "image": "0", "audio": "0"}, "0.003"),
        ({"prompt": "1e-7", "completion": "4E-6"}, "0.0021"),
        ({"discount": 0}, "0.003"),
        ({"discount": "0.5"}, "0.0015"),
        ({"discount": 1}, "0"),
        ({"request": None, "audio": None, "discount": None}, "0.003"),  # null is not listed
    ],
)
def test_prices_from_0_to_1000_and_discounts_from_0_to_1_are_used(prices: dict[str, object], expected: str) -> None:
    """The bounds themselves are prices: a free prompt, $1,000 a token or a request, a whole discount."""
    entry = model("a/b", **{"prompt": "0.000001", "completion": "0.000004", **prices})
    pricing = Pricing.from_model(entry)
    assert pricing is not None and PriceTable([entry]).unusable("a/b") is None
    assert pricing.worst_case_usd(1000, 500) == Decimal(expected)


@pytest.mark.parametrize(
    ("listed_value", "shown"),
    [
        ("x" * 38, "'" + "x" * 38 + "'"),  # 40 characters: shown whole
        ("x" * 39, "'" + "x" * 36 + "..."),  # 41: cut to 37 and an ellipsis
        (-1, "-1"),
        ([1, 2], "[1, 2]"),
    ],
)
def test_an_unusable_price_is_shown_as_listed_and_cut_short(listed_value: object, shown: str) -> None:
    """The reason names the price as the server listed it (its repr), at most 40 characters of it."""
    table = PriceTable([model("a/b", prompt="0.000001", completion="0.000004", request=listed_value)])
    assert table.unusable("a/b") == f"its request price {shown} is not a number of dollars from 0 to 1,000"


def test_an_entry_without_an_id_is_skipped_and_the_rest_are_read() -> None:
    """A /models entry with no id (or a number for one) does not stop the entries after it being priced."""
    table = PriceTable(
        [
            {"pricing": {"prompt": "-1", "completion": "-1"}},
            {"id": 7, "pricing": {"prompt": "0.000001", "completion": "0.000004"}},
            model("a/b", prompt="0.000001", completion="0.000004"),
            model("c/d", prompt="-1", completion="0.000004"),
        ]
    )
    assert (
        "a/b" in table and table.unusable("c/d") == "its prompt price '-1' is not a number of dollars from 0 to 1,000"
    )


def test_a_service_tier_goes_by_the_name_of_its_price() -> None:
    """None, auto, default and standard are the standard tier; fast is priority; flex is flex, in any case."""
    standard = [None, "", "auto", "default", "Default", "standard", 3]
    assert [tier_of(value) for value in standard] == ["standard"] * len(standard)
    assert [tier_of(value) for value in ("flex", "FLEX", "fast", "priority", "scale")] == [
        "flex",
        "flex",
        "priority",
        "priority",
        "scale",
    ]


PRICED = Pricing(prompt=Decimal("0.000001"), completion=Decimal("0.000002"))  # 10 and 5 tokens: $0.00002
TOKENS = {"prompt_tokens": 10, "completion_tokens": 5}
AT_PRICES = Decimal("0.00002")


def test_a_plain_answer_costs_what_it_reported_else_its_prices_else_nothing_known() -> None:
    """Not BYOK: usage.cost is the whole (an upstream cost beside it is a breakdown of it, never added); without
    it the prices; without those, unknown at $0."""
    both = Usage(**TOKENS, cost_usd=Decimal("0.00003"), upstream_cost_usd=Decimal("0.00003"))
    assert charge(both, PRICED) == Charge(Decimal("0.00003"), "reported")
    assert charge(Usage(**TOKENS), PRICED) == Charge(AT_PRICES, "computed")
    assert charge(Usage(**TOKENS), None) == Charge(Decimal(0), "unknown")
    told = Usage(**TOKENS, cost_rejected="usage.cost -1 is negative")
    assert charge(told, PRICED) == Charge(AT_PRICES, "computed", rejected="usage.cost -1 is negative")
    assert charge(told, None).rejected == "usage.cost -1 is negative"
    aside = Usage(**TOKENS, cost_usd=Decimal("0.00003"), upstream_rejected="its upstream cost is not a number")
    assert charge(aside, PRICED) == Charge(Decimal("0.00003"), "reported"), "not BYOK: the upstream cost is not read"
    assert charge(Usage(**TOKENS, upstream_rejected="x"), PRICED) == Charge(AT_PRICES, "computed")


def test_a_byok_answer_costs_its_fee_plus_what_the_provider_billed() -> None:
    """BYOK: the fee (usage.cost) plus the upstream cost, both reported; a missing upstream cost is the prices', a
    missing fee BYOK_FEE_SHARE of the upstream cost (computed); with neither prices nor upstream, the fee alone is a
    lower bound (unknown)."""
    fee, upstream = Decimal("0.000001"), Decimal("0.00002")
    reported = Usage(**TOKENS, cost_usd=fee, is_byok=True, upstream_cost_usd=upstream)
    assert charge(reported, PRICED) == Charge(fee + upstream, "reported", upstream)
    assert charge(reported, None) == Charge(fee + upstream, "reported", upstream)
    no_upstream = Usage(**TOKENS, cost_usd=Decimal(0), is_byok=True)
    assert charge(no_upstream, PRICED) == Charge(AT_PRICES, "computed", AT_PRICES)
    no_fee = Usage(**TOKENS, is_byok=True, upstream_cost_usd=upstream)
    assert charge(no_fee, None) == Charge(upstream * Decimal("1.055"), "computed", upstream)
    assert charge(Usage(**TOKENS, is_byok=True), PRICED) == Charge(AT_PRICES * Decimal("1.055"), "computed", AT_PRICES)
    assert charge(Usage(**TOKENS, cost_usd=fee, is_byok=True), None) == Charge(fee, "unknown")
    assert charge(Usage(**TOKENS, is_byok=True), None) == Charge(Decimal(0), "unknown")
    bad = Usage(**TOKENS, cost_usd=fee, is_byok=True, upstream_rejected="upstream NaN")
    assert charge(bad, PRICED) == Charge(fee + AT_PRICES, "computed", AT_PRICES, "upstream NaN")
    assert Decimal("0.055") == BYOK_FEE_SHARE


def test_the_ceiling_judges_a_byok_answers_whole_cost() -> None:
    """A reported cost above the ceiling is set aside for the prices: with BYOK, the fee plus the upstream cost is
    judged against the ceiling plus the fee's share (a fee alone under the ceiling does not pass a total above it);
    exactly at the ceiling is kept."""
    ceiling = Decimal("0.0002")
    high = Usage(**TOKENS, cost_usd=Decimal("0.0001"), is_byok=True, upstream_cost_usd=Decimal("0.0002"))
    judged = charge(high, PRICED, ceiling_usd=ceiling)
    assert judged == Charge(
        AT_PRICES * Decimal("1.055"),
        "computed",
        AT_PRICES,
        "usage.cost 0.0001 with the upstream cost 0.0002 is far above what the prices allow",
    )
    at_most = Usage(**TOKENS, cost_usd=Decimal("0.000011"), is_byok=True, upstream_cost_usd=Decimal("0.0002"))
    assert charge(at_most, PRICED, ceiling_usd=ceiling).source == "reported"  # 0.000211 == 0.0002 x 1.055
    plain = Usage(**TOKENS, cost_usd=ceiling)
    assert charge(plain, PRICED, ceiling_usd=ceiling) == Charge(ceiling, "reported")
    over = charge(Usage(**TOKENS, cost_usd=Decimal("0.00021")), PRICED, ceiling_usd=ceiling)
    assert over == Charge(AT_PRICES, "computed", rejected="usage.cost 0.00021 is far above what the prices allow")
    upstream_only = Usage(**TOKENS, cost_usd=Decimal("0.0001"), upstream_cost_usd=Decimal("1"))  # not BYOK
    assert charge(upstream_only, PRICED, ceiling_usd=ceiling).source == "reported"
    assert charge(Usage(**TOKENS, is_byok=True, upstream_cost_usd=Decimal(1)), None, ceiling_usd=ceiling).rejected


def test_an_answers_images_are_priced_when_its_cost_is_computed() -> None:
    """The images a request sent are part of a computed cost, BYOK or not."""
    pricing = Pricing(prompt=Decimal("0.000001"), completion=Decimal("0.000002"), image=Decimal("0.001"))
    assert charge(Usage(**TOKENS), pricing).cost_usd == AT_PRICES, "no images, no image price"
    assert charge(Usage(**TOKENS), pricing, images=2).cost_usd == AT_PRICES + Decimal("0.002")
    byok = charge(Usage(**TOKENS, cost_usd=Decimal(0), is_byok=True), pricing, images=2)
    assert byok.upstream_usd == AT_PRICES + Decimal("0.002")


def test_a_discount_is_set_against_the_whole_cost() -> None:
    """What a batch answer saved: the live price less what it cost; with BYOK, the live price with the fee share it
    paid less its whole cost (never the live price less the fee alone)."""
    assert saving_usd(Decimal("0.0004"), Charge(Decimal("0.0001"), "reported")) == Decimal("0.0003")
    byok = Charge(Decimal("0.000105"), "reported", Decimal("0.0001"))
    assert saving_usd(Decimal("0.0002"), byok) == Decimal("0.000105")
    assert saving_usd(Decimal("0.0002"), Charge(Decimal("0.00001"), "reported", Decimal(0))) == Decimal("0.00019")


def endpoint(tier: object, prompt: str, completion: str = "0.000001") -> dict[str, object]:
    return {"service_tier": tier, "pricing": {"prompt": prompt, "completion": completion}}


def test_tier_prices_come_from_the_models_tier_endpoints() -> None:
    """A tier's price is its endpoint's (the dearer of two), for the model and its routing variants; a tier no
    endpoint lists, a standard endpoint, or an unusable price leave the model's own price."""
    table = PriceTable([model("a/b", prompt="0.000002", completion="0.000004")])
    table.add_tiers(
        {
            "a/b": [
                endpoint(None, "0.000005"),
                endpoint("default", "0.000005"),
                endpoint("flex", "0.000001"),
                endpoint("FLEX", "0.0000011"),
                endpoint("flex", "0.0000009"),
                endpoint("flex", "0.0000010", completion="0.0000011"),
                endpoint("priority", "-1"),
            ],
            "c/d": [],
        }
    )
    flex = table.tier("a/b", "flex")
    assert flex is not None and flex.prompt == Decimal("0.0000011") and flex.completion == Decimal("0.000001")
    assert table.tier("a/b:floor", "flex") == flex and table.served("a/b", "flex") == flex
    assert table.tier("a/b", "standard") is None and table.tier("a/b", "priority") is None
    assert table.tier("c/d", "flex") is None and table.tier("e/f", "flex") is None
    assert table.served("a/b", "default") == table.get("a/b") == table.served("a/b")
    assert table.served("a/b", "priority") == table.get("a/b") and table.served("e/f", "flex") is None
    first = PriceTable([])
    first.add_tiers({"a/b": [endpoint("flex", "0.000001", "0.000002"), endpoint("flex", "0.000002", "0.000001")]})
    kept = first.tier("a/b", "flex")
    assert kept is not None and kept.prompt == Decimal("0.000001"), "an equal price does not replace the first"
