"""The job spec: its YAML keys (the public interface), their validation, and the request it implies.

Pure apart from reading the spec file itself. Every mistake becomes a SpecError whose
problems name the field by its path in the spec and its line in the file, and say the fix,
so the CLI can refuse the job (exit 2) before a single request is sent.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from batchrunner import openapi
from batchrunner.costs import Pricing
from batchrunner.errors import Problem, SpecError
from batchrunner.jsontext import non_finite
from batchrunner.prompt import (
    MEDIA_PARTS,
    MessageTemplate,
    PartTemplate,
    PromptTemplate,
    Template,
    TemplateError,
    parse_template,
)
from batchrunner.structured import schema_problems
from batchrunner.urls import (
    OUTPUT_SCHEMES,
    STORAGE_OPTION_KEYS,
    Location,
    ObjectURL,
    as_location,
    is_url,
    scheme_of_option,
)

log = logging.getLogger("batchrunner")

OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"
SANDBOX_SERVER = "sandbox"
MAX_SPEC_NODES = 100_000  # values in a spec once YAML aliases are expanded
MAX_SPEC_DEPTH = 64  # levels of nesting (a deep JSON schema needs a dozen)
MAX_BUDGET_USD = 1_000_000  # the most `budget_usd` (or --max-cost, max_cost=) may say
INPUT_SUFFIXES = (".csv", ".parquet", ".jsonl", ".ndjson")
OUTPUT_SUFFIXES = (".parquet", ".csv", ".jsonl")
# What shapes a request, and so a pair's fingerprint, said once: request.RequestBuilder fingerprints these,
# rerun.py tells them from RUN_ONLY_KEYS, JobSpec.request_body sends them. A new key of JobSpec belongs in one
# of these or in RUN_ONLY_KEYS, or is read by neither (test_spec checks that no key is in two).
# The keys that render the prompt (JobSpec.prompt_template): fingerprinted as the prompt they render.
PROMPT_KEYS = ("system", "prompt", "messages", "images", "files", "audio", "image_detail")
# The keys that name the models: fingerprinted as the chain a requested model is answered by (model_chain).
CHAIN_KEYS = ("models", "fallbacks")
# The rest of a request: each fingerprinted as it is written.
REQUEST_KEYS = ("endpoint", "cache_system_prompt", "server_fallbacks", "params", "provider", "response_format")
REQUEST_SHAPING_KEYS = frozenset({*PROMPT_KEYS, *CHAIN_KEYS, *REQUEST_KEYS})
BODY_KEYS = ("provider", "response_format")  # sent in a request's body under their own names
# The keys that change how a run goes, never which pairs there are, what they ask or the output: a rerun that
# changed only these still skips what the last complete run answered without reading it (rerun.py).
RUN_ONLY_KEYS = frozenset(
    {
        "concurrency",
        "max_concurrency",
        "workers",
        "executor",
        "ray_address",
        "timeout_s",
        "unreachable_timeout_s",
        "rate_limit",
        "free_requests_per_day",
        "retry",
        "budget_usd",
        "prices",  # what computed costs and reservations use, for answers still to come
        "batch",
        "mode",
        "storage_options",  # how the data is reached (credentials among them), never what it is: never hashed or kept
    }
)
# Request fields the spec sets through its own keys, so `params` may not set them too.
SPEC_OWNED_FIELDS = {
    "model": "models",
    "models": "models and fallbacks",
    "messages": "system/prompt or messages",
    "prompt": "prompt",
    **{key: key for key in BODY_KEYS},
}

Slug = Annotated[str, Field(min_length=1, pattern=r"^\S+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _variable_name(value: str | None) -> str | None:
    """`api_key_env` names an environment variable: a value that cannot be one is most likely the key itself, which
    is refused without repeating it (the key is never printed)."""
    if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(
            "not an environment variable's name (letters, digits and _): it names the variable that holds the key, "
            "e.g. OPENROUTER_API_KEY; a key is never read from the spec: remove it and export it in that variable"
        )
    return value


class EndpointSettings(_Strict):
    """One server of a pool (`api.endpoints`): its URL, the requests it takes at once, the variable of its key."""

    base_url: str  # the server's base URL, e.g. http://gpu-1:8000/v1
    concurrency: Annotated[int, Field(ge=1, le=4096)] | None = None  # default: the spec's `concurrency`
    api_key_env: str | None = None  # default: api.api_key_env

    _api_key_env = field_validator("api_key_env")(_variable_name)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if problem := base_url_problem(value):
            raise ValueError(problem)
        return value.rstrip("/")


class ApiSettings(_Strict):
    """Where requests go and how they authenticate."""

    base_url: str | None = None  # default: $OPENROUTER_BASE_URL, else https://openrouter.ai/api/v1
    api_key_env: str = "OPENROUTER_API_KEY"  # the environment variable holding the key
    headers: dict[str, str] = {}  # sent with every request, e.g. HTTP-Referer, X-OpenRouter-Title
    endpoints: list[EndpointSettings] | None = None  # a pool of servers (or URLs) answering the same models

    _api_key_env = field_validator("api_key_env")(_variable_name)

    @field_validator("endpoints", mode="before")
    @classmethod
    def _urls_or_mappings(cls, value: Any) -> Any:
        """A bare URL is an endpoint with the defaults: `endpoints: [http://a:8000/v1, http://b:8000/v1]`."""
        if isinstance(value, list):
            return [{"base_url": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("endpoints")
    @classmethod
    def _distinct(cls, value: list[EndpointSettings] | None) -> list[EndpointSettings] | None:
        """Two entries for one server would double its share and its cap: name each server once."""
        if value is None:
            return value
        if not value:
            raise ValueError("an empty pool; list at least one endpoint, or remove `endpoints`")
        seen: set[str] = set()
        for endpoint in value:
            if endpoint.base_url in seen:
                raise ValueError(f"{endpoint.base_url} is listed twice; name each server once")
            seen.add(endpoint.base_url)
        return value

    @model_validator(mode="after")
    def _one_way(self) -> ApiSettings:
        if self.endpoints is not None and self.base_url is not None:
            raise ValueError("give either base_url or endpoints, not both (a pool of one is `endpoints: [URL]`)")
        return self

    @field_validator("headers")
    @classmethod
    def _header_lines(cls, value: dict[str, str]) -> dict[str, str]:
        """A header name is a token, and no value may carry a line break: it would forge headers."""
        for name, text in value.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not a valid header name (letters, digits and -)")
            if re.search(r"[\x00-\x1f\x7f]", text):
                raise ValueError(f"the value of {name!r} contains a line break or control character; remove it")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and (problem := base_url_problem(value)):
            raise ValueError(problem)
        return value.rstrip("/") if value else value


def base_url_problem(url: str) -> str | None:
    """What is wrong with a base URL (api.base_url, $OPENROUTER_BASE_URL), or None. A user name or password in
    it would be printed in messages, logged and stored in the checkpoint with the URL: refused, with the way
    to send it instead."""
    if not re.match(r"^https?://", url):
        return "must start with http:// or https://, e.g. https://openrouter.ai/api/v1"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # a port that is not a number raises here
    except ValueError:
        return "is not a URL batchrunner can use; check its host and port"
    if parts.username is not None or parts.password is not None:
        host = parts.hostname or ""
        safe = urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))
        return (
            f"carries a user name or password ({parts.scheme}://***@{host}...), which would be printed and "
            f"stored with the URL: use {safe} and send the credential as a header, e.g. api.headers: "
            "{Proxy-Authorization: Basic ...} (or Authorization, when the server needs no API key)"
        )
    return None


def env_base_url() -> str:
    """$OPENROUTER_BASE_URL, checked as api.base_url is, else OpenRouter's own."""
    value = os.environ.get("OPENROUTER_BASE_URL", "").strip().rstrip("/")
    if not value:
        return OPENROUTER_BASE_URL
    if problem := base_url_problem(value):
        raise SpecError(Problem("$OPENROUTER_BASE_URL", problem))
    return value


class RateLimit(_Strict):
    """An explicit rate instead of the one OpenRouter's credit rule gives."""

    requests_per_second: Annotated[float, Field(gt=0, le=10_000, allow_inf_nan=False)] | None = None  # one of the two
    requests_per_minute: Annotated[float, Field(gt=0, le=600_000, allow_inf_nan=False)] | None = None  # one of the two

    @model_validator(mode="after")
    def _exactly_one(self) -> RateLimit:
        if (self.requests_per_second is None) == (self.requests_per_minute is None):
            raise ValueError(
                "give exactly one of requests_per_second or requests_per_minute (or write `rate_limit: auto`)"
            )
        return self

    @property
    def rps(self) -> float:
        return (
            self.requests_per_second if self.requests_per_second is not None else (self.requests_per_minute or 0) / 60
        )


class RetrySettings(_Strict):
    """How hard to try one model before its fallbacks: attempts, and backoff between them."""

    max_attempts: Annotated[int, Field(ge=1, le=50)] = 5  # requests per model, the first included
    base_delay_s: Annotated[float, Field(ge=0, le=3_600, allow_inf_nan=False)] = 1.0  # first backoff; doubles
    max_delay_s: Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)] = 60.0  # the longest backoff


class RepairSettings(_Strict):
    """What to do with a structured answer that does not parse or validate."""

    same_model: Annotated[int, Field(ge=0, le=5)] = 1  # re-asks on the same model, the error fed back


MetricName = Literal["exact", "numeric", "f1", "regex", "contains", "json_match", "python", "judge"]


class JudgeSettings(_Strict):
    """Another model grades each answer with a rubric you write (see judging.py)."""

    model: Slug  # the grading model (listed, and priced when there is a budget)
    rubric: Annotated[str, Field(min_length=1)]  # a template: {answer}, {reference} and the input columns
    scale: Annotated[int, Field(ge=2, le=100)] = 5  # grades 1..scale; the score is (grade - 1) / (scale - 1)


class MetricSettings(_Strict):
    """One scoring rule: a metric and its options (see scoring.py)."""

    metric: MetricName | None = None  # may be left out when `python:` names the function
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$", max_length=40)] | None = None  # column score_<name>
    ignore_case: bool = True  # text comparisons ignore case
    strip: bool = True  # surrounding whitespace ignored
    normalize: bool = False  # unicode NFKC, punctuation removed, whitespace collapsed
    abs_tol: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0  # numeric: the absolute difference accepted
    rel_tol: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0  # numeric: the relative difference accepted
    python: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")] | None = None  # module:function
    judge: JudgeSettings | None = None  # another model grades the answer (metric judge)

    @model_validator(mode="after")
    def _python_names_a_function(self) -> MetricSettings:
        if self.kind == "judge" and self.judge is None:
            raise ValueError("a judge metric needs judge: {model: ..., rubric: ..., scale: 5}")
        if self.kind == "python" and self.python is None:
            raise ValueError(
                "name the metric (exact, numeric, f1, regex, contains, json_match), or give python: module:function"
            )
        return self

    @property
    def kind(self) -> str:
        return self.metric or ("judge" if self.judge is not None else "python")


class EvaluateSettings(_Strict):
    """Scoring each answer against a reference column (an evaluation run)."""

    reference: Annotated[str, Field(min_length=1)] | None = None  # the input column with the expected answer
    field: str | None = None  # the structured-answer property to compare; absent: the whole answer text
    metric: MetricName | MetricSettings | list[MetricName | MetricSettings] = "exact"

    @field_validator("metric", mode="before")
    @classmethod
    def _python_shorthand(cls, value: Any) -> Any:
        """`metric: {python: mod:fn}` and `- python: mod:fn` are metrics of kind python."""

        def one(item: Any) -> Any:
            return (
                {**item, "metric": item.get("metric", "python")}
                if isinstance(item, dict) and "python" in item
                else item
            )

        return [one(item) for item in value] if isinstance(value, list) else one(value)

    @model_validator(mode="after")
    def _reference_unless_only_judges(self) -> EvaluateSettings:
        if self.reference is None and any(rule.kind != "judge" for rule in self.rules()):
            raise ValueError("name the input column with the expected answers: reference: COLUMN")
        return self

    def judges(self) -> list[MetricSettings]:
        """The metrics another model grades."""
        return [rule for rule in self.rules() if rule.judge is not None]

    def rules(self) -> list[MetricSettings]:
        """The metrics, each with its options; a bare name is the metric with default options."""
        items = self.metric if isinstance(self.metric, list) else [self.metric]
        return [MetricSettings(metric=item) if isinstance(item, str) else item for item in items]


class BatchSettings(_Strict):
    """How `mode: batch` waits for OpenRouter's Batch API."""

    poll_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 5.0  # first wait between looks
    max_poll_s: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = 300.0  # waits double up to this
    fallback_to_realtime: bool = False  # run a model the Batch API refuses as live requests instead


Detail = Literal["auto", "low", "high", "original"]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str  # an https URL, a local path or a bytes column: usually "{column}"
    detail: Detail | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


class FileData(_Strict):
    file_data: str  # a PDF: an https URL, a local path or a bytes column
    filename: str | None = None  # default: the file's name


class FilePart(_Strict):
    type: Literal["file"]
    file: FileData


class AudioData(_Strict):
    data: str  # a local path or a bytes column (OpenRouter takes audio as data only)
    format: str | None = None  # default: read from the content (wav, mp3, flac, ...)

    @field_validator("data")
    @classmethod
    def _not_a_url(cls, value: str) -> str:
        if re.match(r"^\s*https?://", value):
            raise ValueError(
                "input_audio takes the audio itself, not a URL (OpenRouter does not fetch audio); "
                "name a column of local files or bytes"
            )
        return value


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: AudioData


class VideoUrl(_Strict):
    url: str


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoUrl


ContentPart = Annotated[TextPart | ImagePart | FilePart | AudioPart | VideoPart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)]

    @model_validator(mode="after")
    def _media_from_user(self) -> Message:
        """Images, files and audio go in user messages; system and developer messages are text."""
        if isinstance(self.content, list) and self.role != "user":
            media = [part.type for part in self.content if part.type != "text"]
            if media:
                raise ValueError(
                    f"a {self.role} message takes text parts only, not {media[0]}; move it to a user message"
                )
        return self


class MediaLimitsMb(_Strict):
    """The largest file of each kind a row may send, in MB; a larger one fails its row, unsent. The
    defaults follow the providers' documented limits: 20 MB an image (OpenAI), 32 MB a PDF (Anthropic,
    OpenAI), 20 MB inline audio and video (Gemini)."""

    image: Annotated[float, Field(gt=0, le=2048, allow_inf_nan=False)] = 20
    file: Annotated[float, Field(gt=0, le=2048, allow_inf_nan=False)] = 32
    audio: Annotated[float, Field(gt=0, le=2048, allow_inf_nan=False)] = 20
    video: Annotated[float, Field(gt=0, le=2048, allow_inf_nan=False)] = 20


class ModelPrices(_Strict):
    """What a model costs, for a server that does not list its price at /models (LiteLLM, vLLM,
    llama-server): used to reserve a budget and to compute costs the server does not report. A price
    the server lists wins (see costs.PriceTable)."""

    prompt_per_mtok_usd: Annotated[Decimal, Field(ge=0, le=1_000_000, allow_inf_nan=False)]
    completion_per_mtok_usd: Annotated[Decimal, Field(ge=0, le=1_000_000, allow_inf_nan=False)]

    def pricing(self) -> Pricing:
        return Pricing.per_million(self.prompt_per_mtok_usd, self.completion_per_mtok_usd)


class JobSpec(_Strict):
    """A batch job, as written in YAML. Paths are already resolved against the spec's folder."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)]
    input: Location  # a local file, or an s3://, gs://, az:// or hf:// URL (a glob of objects too)
    id_column: str | None = None
    output: Location  # a local file, or an s3://, gs:// or az:// URL
    checkpoint: Path | None = None  # the SQLite checkpoint store, always local; default: beside the output
    # polars' (object_store's) options for object storage input and output (credentials, region, endpoint); unset
    # keys come from the store's environment (AWS_*, GOOGLE_*, AZURE_*). Kept out of repr and of every dump (rerun's state, JSON): it may hold a secret.
    storage_options: dict[str, str] = Field(default_factory=dict, repr=False, exclude=True)
    models: list[Slug] = Field(min_length=1)
    fallbacks: list[Slug] = []
    system: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    images: list[str] = []  # columns whose images are added to the user message
    files: list[str] = []  # columns whose PDFs are added to the user message
    audio: list[str] = []  # columns whose audio is added to the user message
    image_detail: Detail | None = None  # `detail` of the images added by `images:`
    media_limits_mb: MediaLimitsMb = MediaLimitsMb()
    params: dict[str, Any] = {}
    provider: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    concurrency: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = 16
    max_concurrency: Annotated[int, Field(ge=1, le=4096)] = 64  # the ceiling of `concurrency: auto`
    workers: Annotated[int, Field(ge=1, le=256)] = 1  # processes answering pairs (processes.py): every core
    # where workers run: processes of this machine (processes.py), or Ray actors of a cluster (cluster.py)
    executor: Literal["local", "ray"] = "local"
    ray_address: Annotated[str, Field(min_length=1)] | None = (
        None  # the Ray cluster to join; none: RAY_ADDRESS or a new one here
    )
    endpoint: Literal["chat", "completions"] = "chat"
    timeout_s: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = 300.0  # per request; doubled for :free
    unreachable_timeout_s: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = (
        60.0  # stop when the server is gone this long
    )
    # A streamed answer, keep-alives and all, ends within this: long reasoning answers think for minutes
    stream_max_s: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = 3600.0
    max_reply_mb: Annotated[float, Field(gt=0, le=4096, allow_inf_nan=False)] = (
        64.0  # one completion's reply, decompressed
    )
    rate_limit: Literal["auto"] | RateLimit = "auto"
    free_requests_per_day: Annotated[int, Field(ge=1, le=1_000_000)] = 200
    retry: RetrySettings = RetrySettings()
    budget_usd: Annotated[Decimal, Field(gt=0, le=MAX_BUDGET_USD, allow_inf_nan=False)] | None = (
        None  # most a run may spend
    )
    prices: dict[Slug, ModelPrices] = {}  # for models the server does not price
    cache_system_prompt: bool = False  # mark the system message for prompt caching (cache_control)
    repair: RepairSettings = RepairSettings()
    evaluate: EvaluateSettings | None = None  # score answers against a reference column
    mode: Literal["live", "batch"] = "live"  # batch: OpenRouter's Batch API, about half the price, within 24 h
    batch: BatchSettings = BatchSettings()
    server_fallbacks: bool = False  # also send `fallbacks` in OpenRouter's `models` array
    dedupe: bool = True  # identical requests (same model, prompt, params) sent once, the answer copied
    samples: Annotated[int, Field(ge=1, le=100)] = 1  # each (row, model) asked this many times (a `sample` column)
    output_prefix: str = ""  # put before each structured-answer column's name
    api: ApiSettings = ApiSettings()
    _locate: Callable[[str], str] | None = PrivateAttr(default=None)  # field -> "file:line: field"

    def __getstate__(self) -> dict[Any, Any]:
        """A spec pickles (to a worker process) without `_locate`, a closure over the YAML it was read from."""
        state = super().__getstate__()
        return {**state, "__pydantic_private__": {**(state.get("__pydantic_private__") or {}), "_locate": None}}

    @field_validator("models", "fallbacks", "images", "files", "audio", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("input", "output", mode="before")
    @classmethod
    def _url(cls, value: Any) -> Any:
        """An s3:// (gs://, az://, hf://) URL as an ObjectURL (a malformed one, or another scheme, refused naming
        the fix)."""
        return as_location(value)

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _local_checkpoint(cls, value: Any) -> Any:
        """The checkpoint is SQLite, which needs a local file it can lock and write in place: never a URL."""
        if is_url(value):
            raise ValueError(
                "the checkpoint is a local SQLite file; give a local path (the output may be an s3://, gs:// or az:// URL)"
            )
        return value

    @field_validator("storage_options", mode="before")
    @classmethod
    def _storage_options(cls, value: Any) -> Any:
        """polars' option names only (a misspelt key would be ignored or fail at the end of the run), each value
        as text (what polars takes: `aws_allow_http: true` is "true"). Values are never quoted in a message."""
        if not isinstance(value, Mapping):
            return value
        unknown = sorted(str(key) for key in value if key not in STORAGE_OPTION_KEYS)
        if unknown:
            raise ValueError(
                f"unknown storage option(s) {', '.join(map(repr, unknown))}; use {', '.join(sorted(STORAGE_OPTION_KEYS))}"
            )
        return {
            str(key): (str(item).lower() if isinstance(item, bool) else str(item))
            for key, item in value.items()
            if item is not None
        }

    @model_validator(mode="after")
    def _bind_objects(self) -> JobSpec:
        """Give an s3:// input or output the spec's storage options and the checkpoint's folder for its
        temporaries (both travel with the URL, outside its text). A storage option for a store no URL of the job
        is in is refused: it would be silently unused (a gs:// job given aws_region), or a sign of the wrong store."""
        if isinstance(self.output, ObjectURL) and self.output.scheme not in OUTPUT_SCHEMES:
            raise ValueError(
                f"output: {self.output.scheme}:// is read-only here; write the output to a local path or an "
                "s3://, gs:// or az:// URL"
            )
        schemes = {value.scheme for value in (self.input, self.output) if isinstance(value, ObjectURL)}
        for key in sorted(self.storage_options):
            scheme = scheme_of_option(key)
            if scheme not in schemes:
                named = ", ".join(f"{name}://" for name in sorted(schemes)) or "no object storage URL"
                raise ValueError(
                    f"storage_options: {key!r} is for {scheme}:// URLs, and this job's input and output name "
                    f"{named}; remove it, or use that store's options"
                )
        scratch = self.checkpoint_path().parent
        for name in ("input", "output"):
            value = getattr(self, name)
            if isinstance(value, ObjectURL):
                object.__setattr__(self, name, value.bound(self.storage_options, scratch))
        return self

    @field_validator("input", "output")
    @classmethod
    def _file_format(cls, value: Location, info: ValidationInfo) -> Location:
        """Only formats polars reads (input) or writes (output), named by the file's extension."""
        allowed = INPUT_SUFFIXES if info.field_name == "input" else OUTPUT_SUFFIXES
        if value.suffix.lower() not in allowed:
            raise ValueError(
                f"unsupported {info.field_name} format {value.suffix or '(none)'!r}; use one of {', '.join(allowed)}"
            )
        return value

    @model_validator(mode="after")
    def _pool(self) -> JobSpec:
        """A pool is live requests at fixed caps: the Batch API is one server's, and `auto` learns one server."""
        if not self.api.endpoints:
            return self
        if self.mode == "batch":
            raise ValueError("mode batch submits to one server; use api.base_url, or mode live with api.endpoints")
        if self.concurrency == "auto":
            raise ValueError("concurrency: auto learns one server's limit; give a number (or each endpoint's)")
        return self

    @model_validator(mode="after")
    def _workers(self) -> JobSpec:
        """Worker processes send live requests: the Batch API's submits and polls are one process's."""
        if self.workers > 1 and self.mode == "batch":
            raise ValueError("mode batch submits from one process; remove `workers` or use mode live")
        if self.executor == "ray" and self.mode == "batch":
            raise ValueError("mode batch submits from one process; remove `executor: ray` or use mode live")
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError("ray_address is the cluster of `executor: ray`; add `executor: ray` or remove it")
        return self

    @model_validator(mode="after")
    def _batchable(self) -> JobSpec:
        """What the Batch API cannot take, refused before anything is sent."""
        if self.mode != "batch":
            return self
        if self.endpoint != "chat":
            raise ValueError("mode batch sends chat requests; remove `endpoint: completions` or use mode live")
        if self.server_fallbacks:
            raise ValueError("mode batch runs fallbacks as later batches, not within one; remove server_fallbacks")
        extra = sorted(set(self.provider or {}) - {"only", "allow_fallbacks"})
        if extra:
            raise ValueError(
                f"mode batch takes only provider.only and provider.allow_fallbacks, not {', '.join(extra)}"
            )
        return self

    @model_validator(mode="after")
    def _prompt_shape(self) -> JobSpec:
        if self.endpoint == "completions":
            if self.messages is not None or self.system is not None:
                raise ValueError("endpoint 'completions' takes a raw `prompt`; remove `system` and `messages`")
            if self.images or self.files or self.audio:
                raise ValueError(
                    "endpoint 'completions' takes text only; use endpoint chat for images, files and audio"
                )
            if self.prompt is None:
                raise ValueError("endpoint 'completions' needs a `prompt` template")
        elif self.messages is not None:
            if self.prompt is not None or self.system is not None:
                raise ValueError("give either `messages` or `system`/`prompt`, not both")
            if not self.messages:
                raise ValueError("`messages` is empty; add at least one {role: user, content: ...}")
            if (self.images or self.files or self.audio) and not any(m.role == "user" for m in self.messages):
                raise ValueError("images, files and audio are added to the last user message; `messages` has none")
        elif self.prompt is None:
            raise ValueError('no prompt: add `prompt: "... {column} ..."` (or a `messages` list)')
        return self

    # -- what the spec implies ------------------------------------------------------------

    def _message_sources(self) -> list[tuple[str, str, str | list[tuple[str, str, dict[str, str]]]]]:
        """(field, role, content) of each message the spec makes: content is a template's text, or its parts
        as (field, type, {name: template text}), the `images:`/`files:`/`audio:` columns added to the last
        user message."""
        if self.endpoint == "completions":
            return [("prompt", "user", self.prompt or "")]
        messages: list[tuple[str, str, str | list[tuple[str, str, dict[str, str]]]]] = []
        if self.messages is None:
            if self.system is not None:
                messages.append(("system", "system", self.system))
            messages.append(("prompt", "user", self.prompt or ""))
        else:
            for i, message in enumerate(self.messages):
                field = f"messages[{i}].content"
                if isinstance(message.content, str):
                    messages.append((field, message.role, message.content))
                else:
                    messages.append(
                        (field, message.role, [_part_source(f"{field}[{j}]", p) for j, p in enumerate(message.content)])
                    )
        added = self._added_parts()
        if added:
            last = max(i for i, (_, role, _) in enumerate(messages) if role == "user")
            field, role, content = messages[last]
            parts = [(field, "text", {"text": content})] if isinstance(content, str) else list(content)
            messages[last] = (field, role, parts + added)
        return messages

    def _added_parts(self) -> list[tuple[str, str, dict[str, str]]]:
        """The parts `images:`, `files:` and `audio:` add, each naming its column."""
        added = []
        for i, column in enumerate(self.images):
            image = {"url": _placeholder(column), **({"detail": self.image_detail} if self.image_detail else {})}
            added.append((f"images[{i}]", "image_url", image))
        added += [(f"files[{i}]", "file", {"file_data": _placeholder(c)}) for i, c in enumerate(self.files)]
        added += [(f"audio[{i}]", "input_audio", {"data": _placeholder(c)}) for i, c in enumerate(self.audio)]
        return added

    def template_fields(self) -> list[tuple[str, Template]]:
        """Each template with the spec field it comes from, to name it in messages."""
        return [(field, template) for field, _, template in self._templates()]

    def media_fields(self) -> list[tuple[str, str, Template]]:
        """(spec field, kind of media, template) of each field that names an image, file, audio or video."""
        return [(field, kind, template) for field, kind, template in self._templates() if kind is not None]

    def _templates(self) -> list[tuple[str, str | None, Template]]:
        """(field, kind of media or None for text, template) of every template the spec has."""
        fields: list[tuple[str, str | None, Template]] = []
        for field, _, content in self._message_sources():
            if isinstance(content, str):
                fields.append((field, None, _parse_field(field, content)))
                continue
            for part_field, part_type, texts in content:
                media_field, kind = MEDIA_PARTS.get(part_type, ("", None))
                for name, text in texts.items():
                    if part_field.startswith(("images", "files", "audio")):
                        where = part_field
                    else:
                        where = f"{part_field}.text" if part_type == "text" else f"{part_field}.{part_type}.{name}"
                    fields.append((where, kind if name == media_field else None, _parse_field(where, text)))
        return fields

    def prompt_template(self) -> PromptTemplate:
        """The parsed prompt; raises SpecError naming the field whose template is malformed."""
        sources = self._message_sources()
        templates = iter(template for _, template in self.template_fields())
        if self.endpoint == "completions":
            return PromptTemplate(text=next(templates))
        messages = []
        for _, role, content in sources:
            if isinstance(content, str):
                messages.append(MessageTemplate(role, next(templates)))
            else:
                parts = tuple(
                    PartTemplate(kind, tuple((name, next(templates)) for name in texts)) for _, kind, texts in content
                )
                messages.append(MessageTemplate(role, parts))
        return PromptTemplate(messages=tuple(messages))

    def locate(self, field: str) -> str:
        """Where `field` is written: "job.yaml:7: prompt", or the field alone for a spec built in code."""
        return self._locate(field) if self._locate is not None else field

    @property
    def adaptive(self) -> bool:
        """`concurrency: auto`: the requests in flight are learned from the server's answers (adaptive.py)."""
        return self.concurrency == "auto"

    @property
    def most_in_flight(self) -> int:
        """The most requests in flight: `concurrency`, or with `auto` its ceiling, `max_concurrency`; with a pool,
        every endpoint's cap together."""
        if self.api.endpoints:
            return sum(cap for _, cap in self.endpoint_caps())
        return self.max_concurrency if self.concurrency == "auto" else self.concurrency

    def model_chain(self, model: str) -> list[str]:
        """The models a row requested for `model` may be answered by, in order."""
        return [model, *(f for f in self.fallbacks if f != model)]

    def request_body(self, model: str) -> dict[str, Any]:
        """Everything in a request except its prompt: model, params, provider, response_format.

        With `server_fallbacks`, the models after `model` in its chain also go in OpenRouter's
        `models` array, so OpenRouter itself falls back within the one request."""
        body: dict[str, Any] = {"model": model, **self.params}
        if self.server_fallbacks:
            rest = [m for m in self.fallbacks if m != model]
            if rest:
                body["models"] = [model, *rest]
        for key in BODY_KEYS:
            if (value := getattr(self, key)) is not None:
                body[key] = value
        return body

    def answer_column(self) -> str:
        """The output column an evaluation scores: the structured answer's `evaluate.field`, else `response`."""
        field = self.evaluate.field if self.evaluate is not None else None
        return self.output_prefix + field if field else "response"

    def checkpoint_path(self) -> Path:
        """out/triage.parquet -> out/triage.checkpoint.sqlite, unless `checkpoint` says where; for an s3:// output
        (a JobSpec made without load_spec, which puts it beside the spec), triage.checkpoint.sqlite here."""
        if self.checkpoint is not None:
            return self.checkpoint
        name = self.output.stem + ".checkpoint.sqlite"
        return Path(name) if isinstance(self.output, ObjectURL) else self.output.with_name(name)

    def input_folder(self) -> Path:
        """Where a row's relative media paths start: the input's folder, or for an s3:// input the checkpoint's."""
        return self.input.parent if isinstance(self.input, Path) else self.checkpoint_path().parent

    def pricing(self) -> dict[str, Pricing]:
        """The spec's prices (`prices:`), per model, for a costs.PriceTable."""
        return {model: prices.pricing() for model, prices in self.prices.items()}

    def base_url(self) -> str:
        """Where requests go; with a pool (`api.endpoints`) its first endpoint, which also answers the start-up
        questions (the key, the models) and names the server in the checkpoint."""
        if self.api.endpoints:
            return self.api.endpoints[0].base_url
        return self.api.base_url or env_base_url()

    def endpoint_caps(self) -> list[tuple[str, int]]:
        """Each pool endpoint's URL and the requests it takes at once (its own `concurrency`, else the spec's);
        empty without a pool."""
        default = self.concurrency if isinstance(self.concurrency, int) else self.max_concurrency
        return [(e.base_url, e.concurrency or default) for e in self.api.endpoints or ()]

    def server(self, *, sandbox: bool) -> str:
        """Who answers this job's requests, as the checkpoint tells answers apart: "" for OpenRouter,
        "sandbox" for the built-in sandbox, else the base URL. Answers from one are never another's."""
        if sandbox:
            return SANDBOX_SERVER
        base_url = self.base_url()
        return "" if base_url == OPENROUTER_BASE_URL else base_url


FIELD_HELP = {  # each top-level key's description in the JSON Schema (`batchrunner schema`), for editors
    "name": "The job's name: letters, digits, . _ - (used in logs and the summary).",
    "input": "The input file (.csv, .parquet, .jsonl, .ndjson), relative to this spec's folder, or an s3://, gs://, az:// or hf:// URL (a glob too).",
    "id_column": "A column whose values identify each row (unique, never empty); default: the row's position.",
    "output": "The output file (.parquet, .csv, .jsonl), relative to this spec's folder, or an s3://, gs:// or az:// URL.",
    "checkpoint": "The SQLite checkpoint, a local path; default: beside the output, named after it (beside the spec for an object storage output).",
    "storage_options": "For object storage input and output: polars' options (aws_access_key_id, aws_region, aws_endpoint_url, google_service_account, azure_storage_account_name, azure_endpoint, ...), each for its store's URLs; unset ones come from the environment (AWS_*, GOOGLE_*, AZURE_*).",
    "models": "One model slug or a list; each row is asked of each (e.g. openai/gpt-4o-mini).",
    "fallbacks": "Models tried in order for a row whose model fails.",
    "system": "The system message (a template over the row's columns).",
    "prompt": "The user message: {column} placeholders over the row; {{ and }} are literal braces.",
    "messages": "Instead of system/prompt: chat messages; a content may be a list of parts (text, image_url, file, input_audio, video_url).",
    "images": "Columns of images (paths, https URLs, bytes) added to the user message.",
    "files": "Columns of PDFs added to the user message.",
    "audio": "Columns of audio (paths, bytes) added to the user message.",
    "image_detail": "`detail` of the images added by `images`.",
    "media_limits_mb": "The largest file of each kind a row may send, in MB; larger ones fail their row, unsent.",
    "params": "Request parameters: any of OpenRouter's ChatRequest fields (temperature, max_tokens, seed, tools, stream, ...).",
    "provider": "OpenRouter provider routing (order, only, ignore, sort, require_parameters, max_price, ...).",
    "response_format": "Structured answers: {type: json_schema, json_schema: {name, strict, schema}} or {type: json_object}.",
    "concurrency": "Most requests in flight; `auto` finds it (for servers that publish no limit), up to max_concurrency.",
    "max_concurrency": "The most requests in flight `concurrency: auto` may reach (default 64).",
    "workers": "Processes answering pairs (default 1): for a server faster than one core can keep busy; concurrency is shared among them.",
    "executor": "Where the workers run: local (default: processes of this machine) or ray (Ray actors of a cluster; the `ray` extra).",
    "ray_address": "executor: ray, the cluster to join (auto, ray://host:10001); default: RAY_ADDRESS, else a cluster of this machine.",
    "endpoint": "chat (default) or completions (then `prompt` is the raw prompt).",
    "timeout_s": "Seconds a request may take (for streams: may stay silent); doubled for :free models.",
    "unreachable_timeout_s": "Stop the run when the server has refused every connection this long.",
    "stream_max_s": "Seconds a streamed answer may take in all, keep-alives included (default 3600); then the row's error.",
    "max_reply_mb": "The most one completion's reply may be, decompressed, in MB (default 64); a larger one is the row's error.",
    "rate_limit": "auto (OpenRouter's credit rule, from GET /key) or {requests_per_second: N} / {requests_per_minute: N}.",
    "free_requests_per_day": "The daily cap on :free model requests.",
    "retry": "Attempts per model before its fallbacks, and the backoff between them.",
    "budget_usd": "The most one run may spend, in USD; requests reserve their worst case before they go.",
    "prices": "Per model, {prompt_per_mtok_usd, completion_per_mtok_usd}: USD per million tokens, for models the server lists no price for (a listed price wins).",
    "cache_system_prompt": "Mark the system message for prompt caching (cache_control).",
    "repair": "Re-asks of an invalid structured answer on the same model, before the fallbacks.",
    "evaluate": "Score answers against a reference column (see `batchrunner report`).",
    "mode": "live (default) or batch: OpenRouter's Batch API, about half price, within 24 h.",
    "batch": "How batch mode waits and what it does with models the Batch API refuses.",
    "server_fallbacks": "Also send `fallbacks` in OpenRouter's `models` array (it falls back within one request).",
    "dedupe": "Send identical requests once and copy the answer to each row (deduped_from).",
    "samples": "Ask each (row, model) this many times (a `sample` column; seed + i each).",
    "output_prefix": "Put before each structured-answer column's name.",
    "api": "Where requests go (base_url, or a pool of endpoints), the variable holding the key, and extra headers.",
}
ONE_OR_MANY = ("models", "fallbacks", "images", "files", "audio")


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a job spec, for editors (yaml-language-server) and `batchrunner schema`."""
    schema = JobSpec.model_json_schema()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "batchrunner job spec"}
    for name, text in FIELD_HELP.items():
        schema["properties"][name]["description"] = text
    for name in ONE_OR_MANY:  # a single string is accepted where a list is
        listed = schema["properties"][name]
        schema["properties"][name] = {
            "description": listed.pop("description", ""),
            "anyOf": [{"type": "string", "minLength": 1}, listed],
        }
    return schema


def _placeholder(column: str) -> str:
    """A template that is `column`'s value alone (braces in a name cannot be written, so none are)."""
    return "{" + column + "}"


def _part_source(field: str, part: Any) -> tuple[str, str, dict[str, str]]:
    """(field, type, {name: template text}) of one content part of a message."""
    if isinstance(part, TextPart):
        return (field, "text", {"text": part.text})
    inner = getattr(part, part.type)  # each part's object is named after its type
    return (field, part.type, {name: value for name, value in inner.model_dump(exclude_none=True).items()})


def _parse_field(where: str, text: str) -> Template:
    try:
        return parse_template(text)
    except TemplateError as exc:
        raise SpecError(Problem(where, f"{exc} (at character {exc.position + 1})")) from exc


# -- loading ------------------------------------------------------------------------------


DATA_SUFFIXES = (".csv", ".parquet", ".jsonl", ".ndjson", ".tsv", ".xlsx", ".xls")  # inputs, not specs


def load_spec(path: str | Path, *, overrides: dict[str, Any] | None = None, sending: bool = True) -> JobSpec:
    """Read, validate and resolve a job spec file; raise SpecError listing every problem.

    `overrides` replace top-level keys after loading (command-line options); paths among
    them resolve against the current directory, not the spec's. Commands that send nothing
    (status, export, score, report) pass `sending=False`: the request body is not checked
    against OpenRouter's ChatRequest schema, which costs them a jsonschema import and a
    validator build for a check that only matters to a request."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(Problem(str(path), "a folder, not a job spec; give the spec's file (a .yaml)"))
    if path.suffix.lower() in DATA_SUFFIXES:  # `batchrunner run data.csv`: no YAML or codec error says why
        raise SpecError(
            Problem(
                str(path),
                f"a data file, not a job spec (YAML naming the input, the models and the prompt); write one for it "
                f"with `batchrunner init {path}`, then run that",
            )
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(Problem(str(path), "no such job spec file")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(Problem(str(path), f"cannot read the job spec: {exc}")) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_size(path, root)
        data = yaml.safe_load(text)
    except RecursionError:
        raise SpecError(Problem(str(path), f"nested too deeply (at most {MAX_SPEC_DEPTH} levels)")) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f"{path}:{mark.line + 1}" if mark else str(path)
        detail = getattr(exc, "problem", None) or str(exc)
        raise SpecError(Problem(place, f"malformed YAML: {detail}")) from None
    if not isinstance(data, dict):
        raise SpecError(
            Problem(str(path), "a job spec is a YAML mapping of keys such as name, input, output, models, prompt")
        )

    return _resolved(data, root, str(path), path.parent, overrides=overrides, sending=sending)


def spec_from_mapping(
    data: Mapping[str, Any],
    *,
    folder: str | Path = ".",
    overrides: dict[str, Any] | None = None,
    sending: bool = True,
) -> JobSpec:
    """A job spec given as a dict (the Python API), checked exactly as a file is; its relative paths resolve
    against `folder` (the current directory by default). Problems are named `job: <field>`."""
    if not isinstance(data, Mapping):
        raise SpecError(Problem("job", "a job spec is a mapping of keys such as name, input, output, models, prompt"))
    _check_expansion(  # as a file is: past these, copying and checking it passes Python's stack, or never ends
        data, _values_in, lambda _: "job", hint="(one value shared many times?); build it plainly"
    )
    return _resolved(copy.deepcopy(dict(data)), None, "job", Path(folder), overrides=overrides, sending=sending)


def with_overrides(spec: JobSpec, overrides: dict[str, Any]) -> JobSpec:
    """`spec` with top-level keys replaced (the command line's options, given to the Python API with a JobSpec),
    checked as a spec's keys are; its checkpoint stays where the job keeps it. Problems are named `job: <field>`."""
    data = {name: getattr(spec, name) for name in JobSpec.model_fields} | overrides
    try:
        changed = JobSpec.model_validate(data)
    except ValidationError as exc:

        def where(loc: tuple[str | int, ...]) -> str:
            return f"job: {_dotted(loc)}"

        raise SpecError(_by_line([_problem(error, where) for error in _without_union_noise(exc.errors())])) from None
    changed._locate = spec._locate
    return changed


def _resolved(
    data: dict[str, Any],
    root: yaml.Node | None,
    label: str,
    folder: Path,
    *,
    overrides: dict[str, Any] | None,
    sending: bool,
) -> JobSpec:
    """Validate a spec's data (paths resolved against `folder`, `overrides` applied) into a JobSpec; every
    problem named by `label` and, when `root` (its YAML) is known, the line."""
    for key in ("input", "output", "checkpoint"):
        if isinstance(data.get(key), str) and not is_url(data[key]):
            data[key] = os.path.normpath(folder / data[key])
    if isinstance(data.get("output"), str) and data.get("checkpoint") is None:
        # The checkpoint belongs to the job, not to where one run writes: --output does not move it. It is
        # local: an s3:// output's is beside the spec.
        if is_url(data["output"]):
            stem = Path(data["output"]).stem
            data["checkpoint"] = os.path.normpath(folder / f"{stem}.checkpoint.sqlite")
        else:
            output = Path(data["output"])
            data["checkpoint"] = str(output.with_name(output.stem + ".checkpoint.sqlite"))
    for key, value in (overrides or {}).items():
        data[key] = value

    def where(loc: tuple[str | int, ...]) -> str:
        line = _line_of(root, loc)
        field = _dotted(loc)
        return f"{label}:{line}: {field}" if line else f"{label}: {field}"

    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_by_line([_problem(error, where) for error in _without_union_noise(exc.errors())])) from None

    problems = _request_problems(spec, where, against_schema=sending)
    if spec.response_format and spec.response_format.get("type") == "json_schema":
        schema = (spec.response_format.get("json_schema") or {}).get("schema")
        loc = ("response_format", "json_schema", "schema")
        problems += [Problem(where(loc), f"{message}; fix the schema") for message in schema_problems(schema)]
    try:
        spec.prompt_template()
    except SpecError as exc:
        problems += [Problem(where(tuple(_split_dotted(p.where))), p.message) for p in exc.problems]
    if problems:
        raise SpecError(_by_line(problems))
    spec._locate = lambda field: where(tuple(_split_dotted(field)))
    return spec


def _check_size(path: Path, root: yaml.Node | None) -> None:
    """Refuse a spec whose aliases expand it past MAX_SPEC_NODES values, or nested past MAX_SPEC_DEPTH:
    `&a [*b, *b, ...]` ten levels deep is a few lines that expand to billions of values."""

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [part for pair in node.value for part in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    if root is not None:
        _check_expansion(
            root,
            children,
            lambda node: f"{path}:{node.start_mark.line + 1}",
            hint="(YAML aliases?); write it out plainly",
        )


def _values_in(value: Any) -> list[Any]:
    """A dict job's values inside `value` (a mapping's keys and values, a list's items), as _check_size's nodes."""
    if isinstance(value, Mapping):
        return [part for pair in value.items() for part in pair]
    return list(value) if isinstance(value, list | tuple) else []


def _check_expansion(
    root: Any, children: Callable[[Any], list[Any]], where: Callable[[Any], str], *, hint: str
) -> None:
    """Refuse a spec (a file's YAML nodes, or a dict job's values) nested past MAX_SPEC_DEPTH or holding itself, or
    expanding past MAX_SPEC_NODES values: each shared part is measured once (its size and height kept), so a tree of
    2^40 paths over 40 parts takes 40 steps, not 2^40."""
    measured: dict[int, tuple[int, int]] = {}  # id -> (values once expanded, levels below)
    on_path: set[int] = set()

    def measure(node: Any, depth: int) -> tuple[int, int]:
        known = measured.get(id(node))
        if known is None:
            if depth > MAX_SPEC_DEPTH or id(node) in on_path:
                raise SpecError(Problem(where(node), f"nested deeper than {MAX_SPEC_DEPTH} levels"))
            on_path.add(id(node))
            size, height = 1, 0
            for child in children(node):
                child_size, child_height = measure(child, depth + 1)
                size, height = size + child_size, max(height, child_height + 1)
                if size > MAX_SPEC_NODES:
                    raise SpecError(
                        Problem(where(node), f"the spec expands to more than {MAX_SPEC_NODES:,} values {hint}")
                    )
            on_path.discard(id(node))
            known = measured[id(node)] = (size, height)
        if depth + known[1] > MAX_SPEC_DEPTH:
            raise SpecError(Problem(where(node), f"nested deeper than {MAX_SPEC_DEPTH} levels"))
        return known

    measure(root, 0)


def _by_line(problems: list[Problem]) -> list[Problem]:
    """Problems in the order they appear in the file, so the first one to fix comes first."""

    def line(problem: Problem) -> int:
        match = re.search(r":(\d+): ", problem.where + " ")
        return int(match.group(1)) if match else 0

    return sorted(problems, key=line)


def _request_problems(spec: JobSpec, where: Any, *, against_schema: bool = True) -> list[Problem]:
    """Check params, provider and response_format: against OpenRouter's ChatRequest schema when the job
    goes to OpenRouter; another server takes parameters OpenRouter does not know (llama.cpp's
    `cache_prompt`, vLLM's `guided_json`), so there an unknown key is a warning and is sent."""
    strict = is_openrouter(spec.base_url())
    problems = []
    requested = {"params": spec.params, "provider": spec.provider, "response_format": spec.response_format}
    for loc in non_finite(requested):
        if strict:  # OpenRouter reads JSON: every row would be refused
            problems.append(Problem(where(loc), "not a finite number: JSON has no NaN or infinity; give a number"))
        else:  # Python's servers (vLLM) read -Infinity as json writes it: a job that ran there still does
            log.warning(
                "%s: not a finite number, which JSON has not; sent as Python's json writes it (NaN, Infinity), "
                "which %s may refuse",
                where(loc),
                spec.base_url(),
            )
    if problems:
        return problems
    known = openapi.request_fields()
    for key in spec.params:
        if key in SPEC_OWNED_FIELDS:
            problems.append(
                Problem(
                    where(("params", key)), f"set this with the spec's `{SPEC_OWNED_FIELDS[key]}` key, not in params"
                )
            )
        elif key == "stream" and spec.params[key] is True and (spec.mode == "batch" or spec.endpoint != "chat"):
            problems.append(
                Problem(where(("params", key)), "only live chat requests stream; remove `stream` (or use mode: live)")
            )
        elif key not in known:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            if strict:
                fix = f"did you mean {hint[0]!r}?" if hint else "see OpenRouter's ChatRequest fields"
                problems.append(Problem(where(("params", key)), f"unknown request parameter; {fix}"))
            else:
                maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
                log.warning(
                    "%s: not an OpenRouter request parameter%s; sent as it is to %s",
                    where(("params", key)),
                    maybe,
                    spec.base_url(),
                )
    if problems or spec.endpoint != "chat" or not strict or not against_schema:
        return problems
    probe = {**spec.request_body(spec.models[0]), "messages": [{"role": "user", "content": "probe"}]}
    for loc, message in openapi.validation_errors("ChatRequest", probe):
        top = loc[0] if loc else ""
        prefix = () if top in ("provider", "response_format") else ("params",)
        problems.append(Problem(where(prefix + loc), message))
    return problems


def is_openrouter(base_url: str) -> bool:
    """Whether requests go to OpenRouter itself (its key format, its schema, its model list apply)."""
    return base_url.startswith("https://openrouter.ai/")


def _without_union_noise(errors: list[Any]) -> list[Any]:
    """Pydantic reports a value that fits no branch of `"auto" | {...}` once per branch, under
    tags such as "literal['auto']". Keep the branch the user was writing (a string or a
    mapping) and drop the tags from the field path."""
    kept = []
    for error in errors:
        loc = tuple(error["loc"])
        at_union = bool(loc) and isinstance(loc[-1], str) and "[" in loc[-1]
        if at_union and (error["type"] == "literal_error") != isinstance(error.get("input"), str):
            continue
        if loc and loc[-1] == "str" and error["type"] == "string_type" and isinstance(error.get("input"), list):
            continue  # `content: str | [parts]` given parts: the parts' own errors say what is wrong
        loc = tuple(p for p in loc if not (isinstance(p, str) and "[" in p) and p != "str")
        # A tagged union names its branch after a list index: content[1].image_url.image_url.url -> .image_url.url
        loc = tuple(p for i, p in enumerate(loc) if not (i >= 2 and isinstance(loc[i - 2], int) and loc[i - 1] == p))
        kept.append({**error, "loc": loc})
    return kept


KEY_NAMES = {"api_key", "apikey", "key", "openrouter_api_key", "openrouter_key", "token", "api_token", "secret"}


def _problem(error: Any, where: Any) -> Problem:
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        if str(loc[-1]).lower().replace("-", "_") in KEY_NAMES:  # `api_key: sk-or-v1-...`: no hint leads it in
            return Problem(
                where(loc),
                "unknown key; a key is never read from the spec (it is committed and shared): remove it and export "
                "it as OPENROUTER_API_KEY (or the variable api.api_key_env names)",
            )
        parent = _fields_at(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), parent, n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else f"known keys: {', '.join(parent)}"
        return Problem(where(loc), f"unknown key; {fix}")
    if error["type"] == "missing":
        return Problem(where(loc), "required key is missing")
    message = error["msg"].removeprefix("Value error, ")
    if loc and error["type"] not in ("value_error", "assertion_error"):
        message += f" (got {error.get('input')!r})"
    if not loc:
        return Problem(where(()), message)
    return Problem(where(loc), message)


def _fields_at(loc: tuple[str | int, ...]) -> list[str]:
    model: Any = JobSpec
    keyed = False  # the field before was a mapping (`prices:`): this part is one of its keys, not a field
    for part in loc:
        if isinstance(part, int) or keyed:
            keyed = False
            continue
        if part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        keyed = get_origin(annotation) is dict
        model = next(
            (
                a
                for a in getattr(annotation, "__args__", (annotation,))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            None,
        )
        if model is None:
            return []
    return list(model.model_fields)


def _dotted(loc: tuple[str | int, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _split_dotted(text: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", text)]


def _line_of(node: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """The 1-based line of the spec where `loc` is written, or of its nearest written parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if pair is not None:
                line, child = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line
