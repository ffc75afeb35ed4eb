"""Generate the sample datasets in sample_data/ (deterministic: same seed, same files).

python scripts/make_sample_data.py
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

OUT = Path(__file__).resolve().parent.parent / "sample_data"

PRODUCTS = [
    "the mobile app",
    "the web dashboard",
    "the API",
    "the desktop client",
    "the billing portal",
    "the Android widget",
]
ISSUES = [
    ("bug", "crashes when I {action}", "high"),
    ("bug", "shows a blank screen after I {action}", "medium"),
    ("bug", "returns a 500 error whenever I {action}", "high"),
    ("billing", "charged me twice this month after I {action}", "high"),
    ("billing", "still shows the old plan price even though I {action}", "medium"),
    ("account", "won't let me log in since I {action}", "high"),
    ("account", "keeps asking for two-factor codes every time I {action}", "low"),
    ("feature_request", "would be so much better if I could {action} in bulk", "low"),
    ("feature_request", "needs a dark mode; my eyes hurt when I {action} at night", "low"),
    ("question", "- how do I {action}? I couldn't find it in the docs", "low"),
    ("question", "- is it possible to {action} without admin rights?", "low"),
]
ACTIONS = [
    "export a report to CSV",
    "upload a profile photo",
    "switch workspaces",
    "change my password",
    "add a new team member",
    "connect my Slack account",
    "update my card details",
    "open an old invoice",
    "search for a customer",
    "sync my calendar",
    "rotate an API key",
    "downgrade to the free plan",
]
OPENERS = ["Hi,", "Hello team,", "Urgent:", "Hey there,", "Good morning,", "", "Not happy.", "Quick question:"]
CLOSERS = [
    "Thanks.",
    "Please fix asap!",
    "Any help appreciated.",
    "",
    "This is blocking my whole team.",
    "Cheers, Sam",
    "Regards",
]
TIERS = ["free", "pro", "business", "enterprise"]
CHANNELS = ["email", "chat", "web_form", "phone"]

REVIEW_PRODUCTS = [
    ("B-1001", "Aero wireless earbuds"),
    ("B-1002", "Trailblazer hiking boots"),
    ("B-1003", "SteamPro espresso machine"),
    ("B-1004", "Nimbus memory-foam pillow"),
    ("B-1005", "Volt 65W USB-C charger"),
    ("B-1006", "Atlas 28L travel backpack"),
]
PRAISE = [
    "works exactly as described",
    "great value for the price",
    "arrived a day early",
    "battery lasts forever",
    "very comfortable",
    "solid build quality",
]
COMPLAINTS = [
    "stopped working after two weeks",
    "smaller than the photos suggest",
    "the left side crackles",
    "instructions were useless",
    "smells of chemicals",
    "the zipper broke on day one",
]


def tickets(rng: random.Random, n: int) -> pl.DataFrame:
    start = datetime(2026, 10, 1, 8, 0)
    rows = []
    for i in range(n):
        category, pattern, _urgency = rng.choice(ISSUES)
        action = rng.choice(ACTIONS)
        product = rng.choice(PRODUCTS)
        sentence = f"{product[0].upper()}{product[1:]} {pattern.format(action=action)}"
        sentence += "" if sentence.endswith("?") else "."
        body = f"{rng.choice(OPENERS)} {sentence} {rng.choice(CLOSERS)}".strip()
        rows.append(
            {
                "ticket_id": f"T-{10000 + i}",
                "created_at": (start + timedelta(minutes=37 * i + rng.randint(0, 30))).isoformat(timespec="minutes"),
                "customer_tier": rng.choice(TIERS),
                "channel": rng.choice(CHANNELS),
                "subject": f"{product[0].upper()}{product[1:]}: {action}",
                "text": body,
                "expected_category": category,  # the reference for the evaluation example (jobs/ticket_eval.yaml)
            }
        )
    return pl.DataFrame(rows)


def reviews(rng: random.Random, n: int) -> pl.DataFrame:
    rows = []
    for i in range(n):
        sku, name = rng.choice(REVIEW_PRODUCTS)
        stars = rng.choices([1, 2, 3, 4, 5], weights=[2, 1, 2, 4, 6])[0]
        good, bad = rng.choice(PRAISE), rng.choice(COMPLAINTS)
        if stars >= 4:
            text = f"{name}: {good}. " + (f"Only gripe: {bad}." if rng.random() < 0.3 else "Would buy again.")
        elif stars == 3:
            text = f"Mixed feelings. It {good}, but {bad}."
        else:
            text = f"Disappointed - {bad}. " + ("Returned it." if rng.random() < 0.5 else "Support never replied.")
        rows.append(
            {
                "review_id": i + 1,
                "sku": sku,
                "product": name,
                "stars": stars,
                "review": text,
                "verified_purchase": rng.random() < 0.8,
            }
        )
    return pl.DataFrame(rows)


def main() -> None:
    rng = random.Random(20261125)
    OUT.mkdir(exist_ok=True)
    tickets(rng, 300).write_csv(OUT / "tickets.csv")
    reviews(rng, 240).write_parquet(OUT / "reviews.parquet")
    print(f"wrote {OUT / 'tickets.csv'} and {OUT / 'reviews.parquet'}")


if __name__ == "__main__":
    main()
