"""Where a job's data may live besides local files: objects in S3-compatible storage (`s3://`), Google Cloud
Storage (`gs://`), Azure Blob Storage (`az://`), and, for inputs only, Hugging Face (`hf://`).

Pure: no I/O (objectstore.py does that). An `ObjectURL` is what the spec's `input` or `output` holds
when it names an object (or, for the input, a glob of objects). Its text (`str()`, the spec's JSON, the
checkpoint's records, every message) is the URL alone; the credentials it is read with travel beside it
(`options`, never compared, printed or serialised), so nothing that names the data can leak them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

SCHEMES = ("s3", "gs", "az", "hf")  # the stores polars' own cloud I/O reads (object_store, and its hf:// reader)
OUTPUT_SCHEMES = ("s3", "gs", "az")  # hf:// is read-only here: no HEAD, no copy, no staging object to publish from
URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # any scheme: one not in SCHEMES is refused, not a path
ONE_SLASH = re.compile(r"^(s3|gs|az|hf):/(?!/)")  # what a command line's `--output s3://b/k` becomes as a Path
GLOB_CHARS = "*?["
# The spec's `storage_options:` are polars' (object_store's) names, passed to polars as they are, and to obstore
# (the same Rust crate) for the HEAD, LIST, copy and delete requests polars does not expose: one set of names for
# users, per scheme. A key of another scheme than every URL of the job is refused (spec.py), naming the fix.
STORAGE_OPTIONS_BY_SCHEME: dict[str, frozenset[str]] = {
    "s3": frozenset(
        {
            "aws_access_key_id",
            "aws_secret_access_key",
            "aws_session_token",
            "aws_region",
            "aws_endpoint_url",
            "aws_allow_http",
            "aws_virtual_hosted_style_request",
            "aws_skip_signature",
            "aws_request_payer",
        }
    ),
    "gs": frozenset({"google_service_account", "google_service_account_key", "google_application_credentials"}),
    "az": frozenset(
        {
            "azure_storage_account_name",
            "azure_storage_account_key",
            "azure_storage_sas_key",
            "azure_storage_token",
            "azure_storage_client_id",
            "azure_storage_client_secret",
            "azure_storage_tenant_id",
            "azure_storage_use_emulator",
            "azure_use_azure_cli",
            "azure_endpoint",
            "azure_allow_http",
        }
    ),
    "hf": frozenset(),  # HF_TOKEN from the environment, as polars reads it
}
STORAGE_OPTION_KEYS = frozenset().union(*STORAGE_OPTIONS_BY_SCHEME.values())
STORE_NAMES = {"s3": "S3", "gs": "Google Cloud Storage", "az": "Azure Blob Storage", "hf": "Hugging Face"}


def scheme_of_option(key: str) -> str | None:
    """Which scheme's URLs a storage option is for (None for an unknown key)."""
    return next((scheme for scheme, keys in STORAGE_OPTIONS_BY_SCHEME.items() if key in keys), None)


def is_url(value: object) -> bool:
    """Whether a spec value names a URL (any scheme) rather than a local path; `s3:/b/k` (or gs:, az:, hf:) too, what a command
    line's `--output s3://b/k` becomes once made a Path (which keeps one slash)."""
    text = str(value) if isinstance(value, str | Path) else ""
    return URL_PATTERN.match(text) is not None or ONE_SLASH.match(text) is not None


@dataclass(frozen=True)
class ObjectURL:
    """An object (or a glob of objects) in S3-compatible storage, GCS, Azure Blob Storage or Hugging Face.

    `options` are the storage options it is read and written with, and `scratch` the local folder its
    temporaries go to (the checkpoint's): both set by the spec, neither part of its identity or its text."""

    url: str
    options: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    scratch: Path = field(default=Path("."), compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> ObjectURL:
        """`s3://bucket/key` (gs://, az://, hf:// too); ValueError naming the fix for anything else (credentials in
        the URL included: a URL is printed and stored, so it must never hold them)."""
        scheme, _, rest = text.partition("://")
        if scheme not in SCHEMES:
            raise ValueError(f"{scheme}:// is not supported; use a local path or an s3://, gs://, az:// or hf:// URL")
        bucket, _, key = rest.partition("/")
        if "@" in bucket or ":" in bucket:
            raise ValueError(
                f"a {scheme}:// URL holds no credentials (it is printed and stored); give them in storage_options "
                "or the store's environment variables"
            )
        if not bucket or not key or key.endswith("/"):
            raise ValueError(f"{text!r} names no object; write {scheme}://BUCKET/PATH/FILE.parquet")
        return cls(text)

    def __str__(self) -> str:
        return self.url

    @property
    def scheme(self) -> str:
        """`s3`, `gs`, `az` or `hf`."""
        return self.url.partition("://")[0]

    @property
    def bucket(self) -> str:
        """The bucket (an Azure container; for hf://, `datasets`, `models` or `spaces`)."""
        return self.url.partition("://")[2].partition("/")[0]

    @property
    def key(self) -> str:
        return self.url.partition("://")[2].partition("/")[2]

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def has_glob(self) -> bool:
        return any(char in self.key for char in GLOB_CHARS)

    def with_name(self, name: str) -> ObjectURL:
        """The object named `name` beside this one (its summary, its probe)."""
        folder = self.key.rpartition("/")[0]
        return dataclasses.replace(self, url=f"{self.scheme}://{self.bucket}/{folder + '/' if folder else ''}{name}")

    def with_key(self, key: str) -> ObjectURL:
        """The object at `key` in this bucket (one that a glob matched), with the same options."""
        return dataclasses.replace(self, url=f"{self.scheme}://{self.bucket}/{key}")

    def bound(self, options: Mapping[str, str], scratch: Path) -> ObjectURL:
        """The same URL, read and written with `options` (those of its scheme), its temporaries in `scratch`."""
        mine = STORAGE_OPTIONS_BY_SCHEME[self.scheme]
        return dataclasses.replace(self, options={k: v for k, v in options.items() if k in mine}, scratch=scratch)

    def local(self) -> Path:
        """The local stand-in for this object: its temporaries (parts, key log, probe) are named after it here."""
        return self.scratch / self.name

    @classmethod
    def __get_pydantic_core_schema__(cls, source: type[Any], handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        """Validated from a URL string (or kept as given); serialised as its URL alone, never its options."""
        return core_schema.no_info_plain_validator_function(
            cls._validate, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "type": "string",
            "pattern": "^(s3|gs|az|hf)://",
            "description": "An s3://, gs://, az:// (or, for the input, hf://) BUCKET/KEY URL.",
        }

    @classmethod
    def _validate(cls, value: Any) -> ObjectURL:
        if isinstance(value, ObjectURL):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        raise ValueError("expected an s3:// URL")


Location = Path | ObjectURL  # where a job's input or output is


def as_location(value: Any) -> Any:
    """A spec value as a Location where it names a URL: an `s3://` (gs://, az://, hf://) string, or a Path made from
    one on the command line (`Path("s3://b/k")` reads `s3:/b/k`); anything else unchanged, for pydantic to judge."""
    if not is_url(value):
        return value
    text = ONE_SLASH.sub(lambda found: f"{found.group(1)}://", str(value))
    return ObjectURL.parse(text)
