"""What a job (or a user) can ask the server without a completion: the estimate (GET /key, /models,
each model's endpoints), the model list, one model's endpoints, one generation, cancelling batches.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from batchrunner.accounts import Accounts, Pricer
from batchrunner.client import Client
from batchrunner.connect import Connection
from batchrunner.costs import ZERO_USD, PriceTable, Pricing, per_million
from batchrunner.dataset import Dataset
from batchrunner.errors import ApiError, Problem, RunHalted, SpecError, first_line
from batchrunner.media import Media
from batchrunner.offline import existing_checkpoint
from batchrunner.pending import pending
from batchrunner.preflight import check_endpoints, check_output, prepare
from batchrunner.request import (
    MOST_TOKENS_PER_IMAGE,
    TYPICAL_TOKENS_PER_IMAGE,
    TYPICAL_TOKENS_PER_PAGE,
    MediaTally,
    RequestBuilder,
    RowRequest,
    estimated_prompt_tokens,
    expected_completion_tokens,
    media_tally,
)
from batchrunner.runner import check_on_server, fetch_endpoints, fetch_prices, plan_limits
from batchrunner.sandbox import SandboxConfig
from batchrunner.spec import JobSpec, env_base_url, is_openrouter
from batchrunner.store import Store

log = logging.getLogger("batchrunner")

BATCH_PRICE_SHARE = Decimal("0.5")  # what a batch typically costs, as a share of the live price


@dataclass
class Cancelled:
    """What `batchrunner cancel` did: batches asked to cancel, and batches that had ended (collected by the next
    run, never discarded: their answers are paid for)."""

    cancelling: list[str] = field(default_factory=list)
    ended: list[tuple[str, str]] = field(default_factory=list)  # (batch id, its status)


async def cancel_batches(spec: JobSpec, *, sandbox: SandboxConfig | None = None) -> Cancelled:
    """Ask the Batch API to cancel the job's batches still running (POST .../cancel). A cancelled batch returns no
    result rows, while the requests it had finished are billed: the next run records that cost and asks its pairs
    again. A batch that has already ended is left for the next run to collect."""
    from batchrunner.batch import ENDED, request_count

    if sandbox is not None:
        raise SpecError(
            Problem(
                "--sandbox",
                "the built-in sandbox ends with each command, and its batches with it: there is nothing of an "
                "earlier run's to cancel; start `batchrunner sandbox --port 8080 --batch-turnaround 60` and point "
                "OPENROUTER_BASE_URL at it to try cancel",
            )
        )
    checkpoint = existing_checkpoint(spec)
    done = Cancelled()
    with Store.open(checkpoint, job=spec.name) as store:
        async with Connection(spec, timeout_s=60) as connection:
            for record in store.open_batches():
                batch_id = record["batch_id"]
                if batch_id is None or record["state"] == "cancelling":  # lost (the next run looks), or asked already
                    continue
                try:
                    batch = await connection.client.batch(batch_id)
                    if batch["status"] in ENDED:
                        done.ended.append((batch_id, batch["status"]))
                        continue
                    completed = request_count(batch, "completed")
                    log.warning(
                        "cancelling batch %s: the %s requests it has finished are billed, and a cancelled batch returns "
                        "no answers",
                        batch_id,
                        "unknown number of" if completed is None else completed,
                    )
                    await connection.client.cancel_batch(batch_id)
                except ApiError as exc:
                    if exc.status == 409:  # it ended meanwhile: collected by the next run
                        done.ended.append((batch_id, "ended"))
                        continue
                    if exc.status in (403, 404, 405):
                        raise RunHalted(
                            f"the Batch API would not cancel batch {batch_id} (HTTP {exc.status}): cancelling is "
                            "enabled per organization; the batch runs on and the next run collects it"
                        ) from exc
                    raise RunHalted(f"could not cancel batch {batch_id}: {first_line(exc)}; rerun cancel") from exc
                store.batch_state(record["intent_id"], "cancelling")
                done.cancelling.append(batch_id)
    return done


async def estimate_job(
    spec: JobSpec, *, limit: int | None = None, sandbox: SandboxConfig | None = None
) -> dict[str, Any]:
    """What the rows still to do should cost and take, without sending a completion.

    Prompt tokens are estimated without a tokenizer (about four characters a token); the
    expected answer length comes from this job's answers so far, else from the response
    schema, else half of max_tokens. The worst case is the sum of what each request would reserve
    against a budget (accounts.Pricer.worst_case: every prompt byte a token, every answer at
    max_tokens, plugins, PDF pages, the dearer tier, OpenRouter's BYOK fee): one definition.
    """
    dataset = prepare(spec)
    connection = Connection(spec, sandbox=sandbox, timeout_s=60)
    requests = RequestBuilder(spec, server=connection.server)
    checkpoint = spec.checkpoint_path()
    store = Store.open(checkpoint, job=spec.name) if checkpoint.exists() else None
    async with connection:
        prices = await fetch_prices(connection.client, spec)
        endpoints = await fetch_endpoints(connection.client, spec)
        check_endpoints(spec, endpoints)
        prices.add_tiers(endpoints)  # the flex tier's own prices, where a model has one
        limits, _ = await plan_limits(spec, connection.client, connection.key, count_free_usage=False)
        # the run's own worst case: with OpenRouter's BYOK fee where the server may bill it (runner.answerer_of)
        byok_fee = connection.client.openrouter or (sandbox is not None and sandbox.byok)
    try:
        pricer = Pricer(spec, requests, Accounts.of(prices, byok_fee=byok_fee))
        per_model = _tally_pending(spec, dataset, requests, store, pricer, limit=limit)
        history = store.completion_tokens_by_model() if store else {}
    finally:
        if store is not None:
            store.close()

    models: dict[str, Any] = {}
    expected_total: Decimal | None = ZERO_USD
    flex_total: Decimal | None = ZERO_USD
    worst_total: Decimal | None = ZERO_USD
    for model, counts in per_model.items():
        entry = _model_estimate(spec, requests, prices, model, counts, history.get(model, (0, 0)))
        if entry["expected_cost_usd"] is None:
            expected_total = flex_total = worst_total = None
        elif expected_total is not None and flex_total is not None and worst_total is not None:
            expected_total += Decimal(entry["expected_cost_usd"])
            flex_total += Decimal(entry["expected_flex_cost_usd"])
            worst_total += Decimal(entry["max_cost_usd"])
        models[model] = entry
    requests_n = sum(entry["rows"] for entry in models.values())
    rate = limits.pacer.rate_rps
    limited = 0 < rate < math.inf
    media = next(iter(per_model.values())).media if per_model else MediaTally()  # every model sends the same
    unsendable = next(iter(per_model.values())).unsendable if per_model else 0
    return {
        "job": spec.name,
        "rows": requests_n,
        "expected_cost_usd": None if expected_total is None else str(expected_total),
        # OpenRouter's Batch API is "typically 50% of the sync per-token price": an estimate, not a quote
        "expected_batch_cost_usd": None if expected_total is None else str(expected_total * BATCH_PRICE_SHARE),
        # live at the flex tier (params.service_tier: flex): each model's flex endpoint price, else its standard one
        "expected_flex_cost_usd": None if flex_total is None else str(flex_total),
        "max_cost_usd": None if worst_total is None else str(worst_total),
        # null when no rate limit is known (a server without GET /key): then only concurrency and the server's
        # speed bound the run, which nothing here measures; never Infinity (not JSON) nor "0 s"
        "expected_duration_s": round(requests_n / rate, 3) if limited else None,
        "rate_rps": rate if limited else None,
        "prompt_tokens_note": "estimated without a tokenizer: about 4 characters a token",
        "models": models,
        **(_media_report(media, unsendable) if requests.has_media else {}),
    }


def _tally_pending(
    spec: JobSpec,
    dataset: Dataset,
    requests: RequestBuilder,
    store: Store | None,
    pricer: Pricer,
    *,
    limit: int | None,
) -> dict[str, _Tally]:
    """Per requested model, the pairs still to send and their tokens; with dedupe, a pair whose request another
    pair asks, or whose answer the checkpoint holds, is counted as a copy (nothing sent)."""
    per_model = {model: _Tally() for model in spec.models}
    asked: set[tuple[str, str]] = set()  # distinct requests (dedupe): each is sent once
    for batch in pending(dataset, requests, store, limit=limit, batch_size=20_000):
        keys = {(todo.request.requested_model, todo.request.fingerprint) for todo in batch.todo}
        stored = store.answers_to(keys - asked) if spec.dedupe and store is not None else {}
        for todo in batch.todo:
            request = todo.request
            key = (request.requested_model, request.fingerprint)
            if spec.dedupe and request.problem is None and (key in asked or key in stored):
                per_model[request.requested_model].copies += 1  # answered by a copy: nothing sent
                continue
            asked.add(key)
            per_model[request.requested_model].add(request, pricer)
    return per_model


def _model_estimate(
    spec: JobSpec,
    requests: RequestBuilder,
    prices: PriceTable,
    model: str,
    counts: _Tally,
    history: tuple[int, int],
) -> dict[str, Any]:
    """One model's part of the estimate: its requests, tokens, and expected, flex and worst-case costs (None
    without a price). `history`: (answers so far, their completion tokens), the best guess once there are 10."""
    pricing = prices.get(model)
    answered_n, answered_tokens = history
    if answered_n >= 10:
        completion, basis = answered_tokens / answered_n, f"the average of {answered_n} answers so far"
    else:
        completion, basis = expected_completion_tokens(spec, pricing)
    rows = counts.rows
    entry: dict[str, Any] = {
        "rows": rows,
        "deduplicated_rows": counts.copies,
        "estimated_prompt_tokens": counts.prompt_tokens,
        "expected_completion_tokens_per_row": round(completion, 1),
        "completion_estimate_basis": basis,
        "expected_cost_usd": None,
        "expected_flex_cost_usd": None,
        "flex_tier": prices.tier(model, "flex") is not None,
        "max_cost_usd": None,
    }
    if pricing is not None:
        answers = Decimal(str(round(completion * rows, 3)))
        expected = _expected_usd(pricing, counts, answers)
        # at the flex tier's price; a model without a flex endpoint serves a flex request at its standard price
        flex = _expected_usd(prices.tier(model, "flex") or pricing, counts, answers)
        entry["expected_flex_cost_usd"] = str(flex.quantize(Decimal("1E-9")))
        entry["expected_cost_usd"] = str(expected.quantize(Decimal("1E-9")))
        if counts.worst_usd is not None:
            entry["max_cost_usd"] = str(counts.worst_usd.quantize(Decimal("1E-9")))
    return entry


def _expected_usd(pricing: Pricing, counts: _Tally, completion_tokens: Decimal) -> Decimal:
    """What a model's requests still to do should cost at `pricing`: their prompts, the answers expected, images."""
    return pricing.estimate_usd(counts.prompt_tokens, completion_tokens, counts.rows) + counts.media.images * (
        pricing.image * (1 - pricing.discount)
    )


@dataclass
class _Tally:
    """What one model's pairs still to do add up to."""

    rows: int = 0
    prompt_tokens: int = 0
    worst_usd: Decimal | None = ZERO_USD  # what the requests would reserve against a budget; None: a model unpriced
    unsendable: int = 0  # rows whose media cannot be sent: they fail, unsent and unpaid
    copies: int = 0  # rows whose request another row (or the checkpoint) answers: copied, not sent
    media: MediaTally = field(default_factory=MediaTally)

    def add(self, request: RowRequest, pricer: Pricer) -> None:
        if request.problem is not None:
            self.unsendable += 1
            return
        self.rows += 1
        self.prompt_tokens += estimated_prompt_tokens(request.prompt)
        if self.worst_usd is not None:
            model = request.requested_model
            body = pricer.requests.body(request.prompt, model, request.sample)
            try:
                self.worst_usd += pricer.worst_case(body, model)
            except KeyError:  # a model of its chain has no price: no worst case
                self.worst_usd = None
        if isinstance(request.prompt, list):
            self.media = self.media.plus(media_tally(request.prompt))


def _media_report(media: MediaTally, unsendable: int) -> dict[str, Any]:
    """What the estimate counted of the rows' media, and what it could not know."""
    return {
        "media": {
            "images": media.images,
            "pdfs": media.files,
            "pdf_pages": media.pages,
            "pdfs_by_url": media.unknown_pages,
            "audio_files": media.audio,
            "audio_mb": round(media.audio_bytes / 1_048_576, 1),
            "videos": media.videos,
            "rows_that_cannot_be_sent": unsendable,
        },
        "media_note": (
            f"image tokens vary by provider and detail (85 to ~2,800 an image): assumed {TYPICAL_TOKENS_PER_IMAGE:,} "
            f"an image (85 at detail: low) and {TYPICAL_TOKENS_PER_PAGE:,} a PDF page, plus each model's per-image price; pages of PDFs "
            "by URL, and video, are not known before they are sent; the worst case allows "
            f"{MOST_TOKENS_PER_IMAGE:,} tokens an image and the file-parser's price for every page"
        ),
    }


async def list_models(
    *, search: str | None, free_only: bool, sandbox: SandboxConfig | None = None
) -> list[dict[str, Any]]:
    """GET /models, filtered, with prices per million tokens (no key needed)."""
    async with Connection(None, sandbox=sandbox) as connection:
        try:
            models = await connection.client.models()
        except ApiError as exc:
            raise RunHalted(f"could not list models at {connection.base_url}: {exc}") from exc
    listing = []
    for model in models:
        pricing = Pricing.from_model(model)
        text = f"{model.get('id', '')} {model.get('name', '')}".lower()
        if search and search.lower() not in text:
            continue
        is_free = pricing is not None and pricing.prompt == 0 and pricing.completion == 0
        if free_only and not is_free:
            continue
        listing.append(
            {
                "id": str(model.get("id")),
                "prompt_per_m": "-" if pricing is None else f"{per_million(pricing.prompt):f}",
                "completion_per_m": "-" if pricing is None else f"{per_million(pricing.completion):f}",
                "context_length": model.get("context_length"),
            }
        )
    return sorted(listing, key=lambda m: m["id"])


async def list_endpoints(model: str, *, sandbox: SandboxConfig | None = None) -> list[dict[str, str]]:
    """GET /models/{model}/endpoints, as text rows: provider, quantization, limits, prices, parameters, uptime."""
    if model.count("/") != 1 or not all(model.split("/")):
        raise SpecError(
            Problem("--endpoints", f"{model!r} is not a model slug; write AUTHOR/SLUG, e.g. openai/gpt-4o-mini")
        )
    async with Connection(None, sandbox=sandbox) as connection:
        try:
            listed = await connection.client.endpoints(model)
        except ApiError as exc:
            raise RunHalted(f"could not read the endpoints of {model} at {connection.base_url}: {exc}") from exc
    rows = []
    for endpoint in listed:
        pricing = Pricing.from_model({"pricing": endpoint.get("pricing")})
        uptime = endpoint.get("uptime_last_30m")
        rows.append(
            {
                "provider": str(endpoint.get("provider_name") or "-"),
                "tag": str(endpoint.get("tag") or "-"),
                "quant.": str(endpoint.get("quantization") or "-"),
                "context": str(endpoint.get("context_length") or "-"),
                "max out": str(endpoint.get("max_completion_tokens") or "-"),
                "prompt $/M": "-" if pricing is None else f"{per_million(pricing.prompt):f}",
                "compl. $/M": "-" if pricing is None else f"{per_million(pricing.completion):f}",
                "uptime 30m": "-" if not isinstance(uptime, (int, float)) else f"{uptime:.1f}%",
                "status": str(endpoint.get("status", "-")),
                "parameters": ",".join(str(p) for p in endpoint.get("supported_parameters") or []),
            }
        )
    return rows


async def lookup_generation(generation_id: str, *, sandbox: SandboxConfig | None = None) -> dict[str, Any]:
    """GET /generation?id=: what OpenRouter (or, with `sandbox`, the sandbox) kept of one answer. Uses
    $OPENROUTER_API_KEY. An id the server does not know is the user's input, not the server's trouble: a
    SpecError (exit 2) saying so; the sandbox's ids carry their record, so a sandbox started for this one
    lookup knows every answer an earlier --sandbox run was given."""
    if sandbox is not None:
        async with Connection(None, sandbox=sandbox, timeout_s=60) as connection:
            return await _generation(connection.client, generation_id, "the sandbox")
    key = os.environ.get("OPENROUTER_API_KEY", "").strip()
    base_url = env_base_url()
    if not key and is_openrouter(base_url):
        raise SpecError(
            Problem("OPENROUTER_API_KEY", "is not set; GET /generation needs the key that made the request")
        )
    async with Client(base_url, api_key=key or None, timeout_s=60) as client:
        return await _generation(client, generation_id, base_url)


async def _generation(client: Client, generation_id: str, where: str) -> dict[str, Any]:
    """One GET /generation; a 404 is the id's fault (SpecError), any other failure the server's (RunHalted)."""
    try:
        return await client.generation(generation_id)
    except ApiError as exc:
        if exc.status == 404:
            raise SpecError(
                Problem(
                    "GENERATION_ID",
                    f"{where} has no generation {generation_id!r}: give one from the output's generation_id "
                    "column (add --sandbox for a --sandbox run's; OpenRouter may take a few seconds to record "
                    "a new answer)",
                )
            ) from exc
        raise RunHalted(f"could not read generation {generation_id!r} at {where}: {exc}") from exc


def dry_run(spec: JobSpec, *, rows: int, server: str) -> list[dict[str, Any]]:
    """The exact requests the first `rows` rows still to do would send, with their checkpoint keys; nothing is
    sent, and no file is created (the checkpoint is read only when it exists). Files are shown by name, size
    and type, never as base64."""
    dataset = prepare(spec)
    requests = RequestBuilder(spec, server=server)
    checkpoint = spec.checkpoint_path()
    store = Store.open(checkpoint, job=spec.name) if checkpoint.exists() else None
    shown: list[dict[str, Any]] = []
    seen_rows: set[str] = set()
    try:
        for batch in pending(dataset, requests, store):
            for todo in batch.todo:
                request = todo.request
                if request.row.id not in seen_rows and len(seen_rows) == rows:
                    return shown
                seen_rows.add(request.row.id)
                entry: dict[str, Any] = {
                    "row_id": request.row.id,
                    "model": request.requested_model,
                    "models_chain": spec.model_chain(request.requested_model),
                    "checkpoint_key": request.fingerprint,
                }
                if spec.samples > 1:
                    entry["sample"] = request.sample
                if request.problem is not None:
                    entry["fails_unsent"] = request.problem
                else:
                    body = requests.body(request.prompt, request.requested_model, request.sample)
                    entry["body"] = json.loads(json.dumps(body, default=_described))
                shown.append(entry)
    finally:
        if store is not None:
            store.close()
    return shown


def _described(value: Any) -> Any:
    """A file in a request body, as the dry run shows it: what it is, not its bytes."""
    if isinstance(value, Media):
        where = value.path.name if value.path is not None else "bytes from the input"
        pages = f", {value.pages} pages" if value.pages else ""
        return f"<{value.mime}, {value.size:,} bytes{pages}: {where}>"
    return str(value)


async def validate(spec: JobSpec, *, sandbox: SandboxConfig | None = None) -> list[str]:
    """Every check `run` makes before its first request: the spec, the input, the output path, the key, the
    models and their endpoints (where the server lists them), the budget. SpecError if one fails; warnings are
    logged. Returns what was checked, for the user."""
    dataset = prepare(spec)
    check_output(spec, dataset)
    async with Connection(spec, sandbox=sandbox, timeout_s=60) as connection:
        prices, _, endpoints = await check_on_server(spec, connection)
    return [
        f"spec: {len(spec.models)} model(s), {len(spec.template_fields())} template field(s)",
        f"input: {dataset.rows:,} rows, columns {', '.join(dataset.columns)}",
        f"output: {spec.output} can be written",
        "models: " + ("listed by the server" if prices.ids else "not checked (the server lists none)"),
        f"endpoints: read for {len(endpoints)} of {len({*spec.models, *spec.fallbacks})} model(s)",
    ]
