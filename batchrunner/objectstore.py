"""The requests to object storage that polars does not make for us: HEAD and LIST (is the input there, can the
job read it, what is its identity), a probe of the output's bucket, the summary's PUT, the server-side copy that
puts a staged output in place, and cleaning up after a failed upload.

polars reads and writes the rows themselves (its scans and sinks, with the spec's `storage_options`); it
exposes neither an object's ETag nor a way to tell a missing bucket from a denied key before a scan fails
half-way. Those few requests go through obstore: Python bindings of the Rust `object_store` crate that polars'
own cloud I/O is built on, so one library speaks S3, GCS and Azure with exactly polars' option names
(`aws_*`, `google_*`, `azure_*`), reads the same environment variables (AWS_*, GOOGLE_*, AZURE_*) and reaches the
same endpoints. Where polars goes beyond object_store, this module follows it: for S3 with no keys in the spec,
polars asks boto3's credential chain (AWS_PROFILE, ~/.aws, SSO) when boto3 is installed, and so do we (obstore's
Boto3CredentialProvider), so the HEAD and the scan use the same identity. boto3 also lists and aborts the
multipart uploads a failed S3 sink leaves (object_store cannot list them). hf:// inputs are read by polars alone:
there is nothing here to ask (no HEAD, no identity: a rerun reads every row).

Every failure is a SpecError naming the fix (exit 2), raised before any completion is sent. No message names a
credential: they are neither in the URL (urls.py refuses them) nor in a message (the store's error text is cut
to its first line, URL query strings, where a SAS token would be, removed).
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from batchrunner.errors import Problem, SpecError
from batchrunner.urls import STORE_NAMES, ObjectURL

log = logging.getLogger("batchrunner")

CONNECT_TIMEOUT_S = 5  # a wrong endpoint is told in seconds, not after object_store's 10 retries over minutes
READ_TIMEOUT_S = 30
RETRIES = 2
FIVE_GIB = 5 << 30  # S3's largest single CopyObject: a larger output is copied in parts by boto3
EXTRA = {"s3": "s3", "gs": "gcs", "az": "azure"}  # the pip extra each store needs
ENDPOINT_OPTION = {"s3": "aws_endpoint_url", "az": "azure_endpoint"}
CREDENTIALS = {
    "s3": "storage_options (aws_access_key_id, aws_secret_access_key) or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
    "gs": "storage_options (google_service_account, google_service_account_key) or GOOGLE_APPLICATION_CREDENTIALS",
    "az": "storage_options (azure_storage_account_name with azure_storage_account_key or azure_storage_sas_key) or AZURE_STORAGE_ACCOUNT_NAME/AZURE_STORAGE_ACCOUNT_KEY",
}
READ_GRANT = {
    "s3": "s3:GetObject and s3:ListBucket",
    "gs": "storage.objects.get and storage.objects.list (Storage Object Viewer)",
    "az": "read and list on the container (Storage Blob Data Reader)",
}
WRITE_GRANT = {
    "s3": "s3:PutObject",
    "gs": "storage.objects.create and delete (Storage Object User)",
    "az": "write and delete on the container (Storage Blob Data Contributor)",
}


def polars_options(url: ObjectURL) -> dict[str, str] | None:
    """What polars' scans and sinks take as `storage_options`: the spec's, or None for polars' own defaults
    (the environment, AWS_PROFILE)."""
    return dict(url.options) or None


def asked(url: ObjectURL) -> bool:
    """Whether batchrunner can ask the store about `url` itself: not for hf://, which only polars reads."""
    return url.scheme in EXTRA


def _environment(scheme: str) -> tuple[tuple[str, str], ...]:
    """The environment variables a store's client reads, part of its cache key (a test, or a long-lived process,
    may change them); held in memory only, never shown."""
    import os

    prefixes = {"s3": ("AWS_",), "gs": ("GOOGLE_",), "az": ("AZURE_",)}[scheme]
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(prefixes)))


def _store(url: ObjectURL, field: str = "input") -> Any:
    """The obstore store of `url`'s bucket, built from its options and the environment (SpecError naming the fix
    when it cannot be: obstore missing, an option it refuses, no account for Azure)."""
    try:
        return _cached_store(url.scheme, url.bucket, tuple(sorted(url.options.items())), _environment(url.scheme))
    except SpecError as exc:
        raise SpecError(Problem(field, exc.problems[0].message)) from None
    except Exception as exc:
        raise _problem(url, exc, field) from None


@functools.lru_cache(maxsize=16)
def _cached_store(
    scheme: str, bucket: str, options: tuple[tuple[str, str], ...], environment: tuple[tuple[str, str], ...]
) -> Any:
    """One store per bucket, options and environment (a client keeps its connections)."""
    try:
        from obstore.store import AzureStore, GCSStore, S3Store
    except ImportError:
        raise SpecError(
            Problem("input", f"{scheme}:// input and output need obstore: pip install 'batchrunner[{EXTRA[scheme]}]'")
        ) from None
    config: Any = dict(
        options
    )  # polars' prefixed names: obstore takes them at run time, its TypedDicts do not list them
    env = dict(environment)
    client: Any = {"connect_timeout": f"{CONNECT_TIMEOUT_S}s", "timeout": f"{READ_TIMEOUT_S}s"}
    retry: Any = {
        "max_retries": RETRIES,
        "retry_timeout": timedelta(seconds=READ_TIMEOUT_S),
        "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2},
    }
    if scheme == "s3":
        endpoint = config.get("aws_endpoint_url") or env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT") or ""
        if endpoint.startswith("http://"):  # as polars does: an http endpoint named is one to be reached
            client["allow_http"] = True
        provider = _boto3_provider(config)
        return S3Store(bucket, config=config, client_options=client, retry_config=retry, credential_provider=provider)
    if scheme == "gs":
        if _gcs_base_url(config, env).startswith("http://"):  # an emulator named in the service account key
            client["allow_http"] = True
        return GCSStore(bucket, config=config, client_options=client, retry_config=retry)
    return AzureStore(bucket, config=config, client_options=client, retry_config=retry)


def _gcs_base_url(config: dict[str, Any], env: dict[str, str]) -> str:
    """The `gcs_base_url` a service account key names (object_store's way to an emulator), or ""."""
    import json
    from pathlib import Path

    key = config.get("google_service_account_key") or env.get("GOOGLE_SERVICE_ACCOUNT_KEY")
    path = config.get("google_service_account") or env.get("GOOGLE_SERVICE_ACCOUNT")
    try:
        text = key or (Path(path).read_text(encoding="utf-8") if path else "{}")
        return str(json.loads(text).get("gcs_base_url") or "")
    except (OSError, ValueError, AttributeError):
        return ""  # object_store says what is wrong with it


def _boto3_provider(config: dict[str, Any]) -> Any:
    """boto3's credential chain (AWS_PROFILE, ~/.aws/credentials, SSO, the environment), as polars' scans use it
    when the spec names no keys and boto3 is installed (polars' credential_provider='auto'); None otherwise, and
    object_store reads the environment itself. So the HEAD and the scan read as the same identity."""
    if "aws_access_key_id" in config or str(config.get("aws_skip_signature", "")).lower() == "true":
        return None
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        return None
    session = boto3.Session()
    if session.get_credentials() is None:
        return None
    return Boto3CredentialProvider(session)


def objects(url: ObjectURL, *, field: str = "input") -> list[dict[str, Any]]:
    """The objects `url` names (HEAD for one, LIST for a glob), each as {"key", "etag", "version", "size"};
    SpecError naming the fix when there is none or it cannot be reached. Nothing for hf:// (polars alone reads
    it: a missing file is found by the scan, still before anything is sent)."""
    if not asked(url):
        return []
    import obstore

    store = _store(url, field)
    prefix = url.key[: min((url.key.find(c) for c in "*?[" if c in url.key), default=len(url.key))]
    try:
        if not url.has_glob:
            found = obstore.head(store, url.key)
            return [_described(url.key, found.get("e_tag"), found.get("version"), found.get("size"))]
        listed = []
        # object_store lists by folder, not by any prefix: the folder the pattern starts in, every object under it
        folder = prefix.rpartition("/")[0]
        for chunk in obstore.list(store, prefix=folder or None):
            for item in chunk:
                # fnmatch's * crosses "/", so this may list more than polars reads: an identity that changes
                # more often than it must (a rerun reads the rows), never one that misses a change
                if fnmatch.fnmatchcase(str(item["path"]), url.key):
                    listed.append(_described(str(item["path"]), item.get("e_tag"), None, item.get("size")))
    except SpecError:
        raise
    except Exception as exc:
        raise _problem(url, exc, field) from None
    if not listed:
        raise SpecError(
            Problem(
                field,
                f"{url}: no object matches; check the pattern, or list {url.scheme}://{url.bucket}/{prefix}",
            )
        )
    return sorted(listed, key=lambda item: str(item["key"]))


def _described(key: str, etag: Any, version: Any, size: Any) -> dict[str, Any]:
    # S3 quotes an ETag in a HEAD and a LIST alike; GCS quotes it in a HEAD only: one form for both
    return {"key": key, "etag": str(etag or "").strip('"'), "version": str(version or ""), "size": int(size or 0)}


def identity(url: ObjectURL) -> list[Any] | None:
    """The object(s) as the store knows them (each one's key, ETag, version and size), to tell later whether
    they are still the ones a run read or wrote, as files.identity does for a local file; None when there is
    none or it cannot be asked (hf:// included: a rerun then reads every row, the safe way)."""
    if not asked(url):
        return None
    try:
        found = objects(url)
    except SpecError as exc:
        log.debug("no identity for %s: %s", url, exc)
        return None
    return [url.url, *([item["key"], item["etag"], item["version"], item["size"]] for item in found)]


def exists(url: ObjectURL) -> bool:
    """Whether the object is there (False when it cannot be asked, too)."""
    return identity(url) is not None


def check_writable(url: ObjectURL, field: str = "output") -> None:
    """The output's bucket exists, can be reached and takes an object beside the output: a probe object is put
    and deleted (SpecError naming the fix otherwise), so a bucket or a policy that would refuse the output is
    found before any request is paid for."""
    import obstore

    store = _store(url, field)
    probe = url.with_name(f".{url.stem}.probe{url.suffix}")
    try:
        obstore.put(store, probe.key, b"")
    except Exception as exc:
        raise _problem(url, exc, field, writing=True) from None
    try:
        obstore.delete(store, probe.key)
    except Exception as exc:  # a policy may allow putting but not deleting: the run can still write its output
        log.warning("could not delete the probe %s (%s); delete it by hand", probe, said(exc))


class _Body:
    """An object's body as a file-like stream (read(n), close()), fetched in chunks of about a MB."""

    def __init__(self, result: Any) -> None:
        self._chunks: Iterator[Any] = iter(result.stream(min_chunk_size=1 << 20))
        self._buffer = bytearray()

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += bytes(chunk)
        size = len(self._buffer) if size < 0 else size
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    def close(self) -> None:
        self._chunks = iter(())
        self._buffer.clear()


def body(url: ObjectURL) -> Any:
    """The object's body as a stream (read(n), close()), for the checks polars cannot make, read a block at a
    time; SpecError naming the fix when it cannot be had."""
    import obstore

    try:
        return _Body(obstore.get(_store(url), url.key))
    except SpecError:
        raise
    except Exception as exc:
        raise _problem(url, exc, "input") from None


def put_text(url: ObjectURL, text: str) -> None:
    """One object, in a single PUT: it appears whole or not at all."""
    import obstore

    obstore.put(_store(url, "output"), url.key, text.encode("utf-8"))


STAGED = ".staged-"  # the prefix of an output's staging object, beside it: `.staged-<uuid>-<name>`


UPLOAD_PART_BYTES = 5 << 20  # obstore's part size (S3's smallest); POLARS_UPLOAD_CHUNK_SIZE sets it, as for polars


def upload(url: ObjectURL, local: Path) -> None:
    """A local file put at `url`: larger than a part, it is a multipart upload, completed only once every part is
    in (a failed one is aborted by settle_failed). The part size is polars' own setting when given, so that one
    knob sizes every upload of an output."""
    import obstore

    part = int(os.environ.get("POLARS_UPLOAD_CHUNK_SIZE") or UPLOAD_PART_BYTES)
    obstore.put(_store(url, "output"), url.key, local, chunk_size=part)


def staging(url: ObjectURL) -> ObjectURL:
    """A fresh key beside `url` to write the output to first (see `publish`)."""
    folder, _, name = url.key.rpartition("/")
    return url.with_key(f"{folder + '/' if folder else ''}{STAGED}{uuid.uuid4().hex}-{name}")


def publish(staged: ObjectURL, final: ObjectURL) -> None:
    """Make the staged object the final one: a server-side copy (S3's CopyObject, GCS's copy, Azure's Copy Blob
    within the account: each makes the copied object visible whole, at once), then the staging object deleted.
    An S3 object over 5 GiB, more than one CopyObject takes, is copied in parts by boto3 (completed last).
    polars' own multipart upload is not trusted to be all or nothing: a sink that failed half-way was seen to
    complete it, leaving a truncated object at the key (tests/test_object_storage.py)."""
    import obstore

    store = _store(final, "output")
    if final.scheme == "s3" and int(obstore.head(store, staged.key).get("size") or 0) > FIVE_GIB:
        _client(final).copy({"Bucket": staged.bucket, "Key": staged.key}, final.bucket, final.key)
    else:
        obstore.copy(store, staged.key, final.key)
    discard(staged)


def discard(url: ObjectURL) -> None:
    """Delete an object batchrunner made (a staging object), quietly: the output's own outcome is what counts."""
    import obstore

    try:
        obstore.delete(_store(url, "output"), url.key)
    except Exception as exc:
        log.warning("could not delete %s (%s); delete it by hand", url, said(exc))


SETTLE_S = 3.0  # how long a failed sink's late upload is waited for, to be deleted (see settle_failed)


def settle_failed(staged: ObjectURL, since: datetime) -> None:
    """After a sink to `staged` failed: abort its unfinished upload and delete the staging object, watching for
    SETTLE_S. polars' sink raises as soon as a part of it fails, while its upload may still be completing in the
    background (seen under load: the staging object appeared after the failure); what appears later still never
    reaches the output's key, and the next write of the output deletes it (discard_staged)."""
    deadline = time.monotonic() + SETTLE_S
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        abort_uploads(staged, since)
        if exists(staged):
            discard(staged)
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= SETTLE_S / 3:  # nothing appeared for a while: settled
            return
        time.sleep(0.1)


def discard_staged(final: ObjectURL) -> list[str]:
    """Delete the staging objects a killed run left beside `final` (call it holding the job's lock)."""
    import obstore

    folder, _, name = final.key.rpartition("/")
    prefix = f"{folder + '/' if folder else ''}{STAGED}"
    removed = []
    try:  # the output's folder alone, not what is below it (object_store lists by folder, every page)
        listed = obstore.list_with_delimiter(_store(final, "output"), prefix=folder or None)["objects"]
    except Exception as exc:
        log.warning("could not list what a killed run left beside %s (%s)", final, said(exc))
        return []
    for item in listed:
        key = str(item["path"])
        if key.startswith(prefix) and key.endswith(f"-{name}") and len(key) == len(prefix) + 32 + 1 + len(name):
            discard(final.with_key(key))
            removed.append(key)
    return removed


def abort_uploads(url: ObjectURL, since: datetime) -> None:
    """Abort the S3 multipart uploads to `url` begun since `since`: what polars leaves when a sink fails half-way
    (it never completes them, so no object appears at the key, but their parts would be kept, and billed, until
    a lifecycle rule removes them). The job's lock means no other run of the job is writing there. object_store
    cannot list uploads, so this is boto3's (the s3 extra); GCS's and Azure's unfinished uploads are left to the
    store (Azure drops uncommitted blocks after 7 days; GCS wants a lifecycle rule)."""
    if url.scheme != "s3":
        return
    try:
        client = _client(url)
        pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=url.bucket, Prefix=url.key)
        found = [upload for page in pages for upload in page.get("Uploads", [])]
        for upload in found:
            if upload["Key"] == url.key and upload["Initiated"] >= since:
                client.abort_multipart_upload(Bucket=url.bucket, Key=url.key, UploadId=upload["UploadId"])
    except Exception as exc:  # the output's own error is the one to report
        log.warning("could not abort the unfinished upload to %s (%s)", url, said(exc))


# boto3's names for polars' options, for the two S3 requests object_store cannot make (listing and aborting
# unfinished uploads; a managed copy of an object over 5 GiB)
BOTO3_NAMES = {
    "aws_access_key_id": "aws_access_key_id",
    "aws_secret_access_key": "aws_secret_access_key",
    "aws_session_token": "aws_session_token",
    "aws_region": "region_name",
    "aws_endpoint_url": "endpoint_url",
}


def _client(url: ObjectURL) -> Any:
    return _cached_client(tuple(sorted(url.options.items())), _environment("s3"))


@functools.lru_cache(maxsize=8)
def _cached_client(options: tuple[tuple[str, str], ...], environment: tuple[tuple[str, str], ...]) -> Any:
    """A boto3 S3 client for these options (one per set of options and environment)."""
    import boto3
    from botocore.config import Config

    given = dict(options)
    kwargs = {BOTO3_NAMES[key]: value for key, value in given.items() if key in BOTO3_NAMES}
    virtual = given.get("aws_virtual_hosted_style_request", "").lower() == "true"
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": 2, "mode": "standard"},
        s3={"addressing_style": "virtual" if virtual else "path"},  # as object_store asks, unless told otherwise
    )
    return boto3.session.Session().client("s3", config=config, **kwargs)


QUERY = re.compile(r"\?[^\s)]*")  # a URL's query string: where a SAS token or a signature would be


def said(exc: BaseException) -> str:
    """The first line of an error, without any URL's query string: safe to print."""
    text = str(exc).strip()
    return QUERY.sub("", text.splitlines()[0]) if text else type(exc).__name__


NOT_FOUND_BUCKET = (
    "NoSuchBucket",  # S3, GCS
    "ContainerNotFound",  # Azure
    "The specified bucket does not exist",
    "no bucket named",  # fake-gcs-server (a 500 where GCS answers 404)
)
REFUSED_CREDENTIALS = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AuthenticationFailed",
    "AuthorizationFailure",
    "credential error",
    "Invalid Access Key",
    "Account must be specified",
)
UNREACHABLE = ("error sending request", "Connection refused", "connection error", "timed out", "dns error")


def _kind(exc: BaseException) -> str:
    """What a failed request means: not_found, denied, credentials, unreachable, region or other."""
    name = type(exc).__name__
    text = str(exc)
    if any(code in text for code in NOT_FOUND_BUCKET):
        return "no_bucket"
    if any(code in text for code in REFUSED_CREDENTIALS) or name == "UnauthenticatedError" or " 401 " in text:
        return "credentials"
    if name == "NotFoundError" or isinstance(exc, FileNotFoundError) or " 404 " in text:
        return "not_found"
    if name == "PermissionDeniedError" or " 403 " in text or "AccessDenied" in text:
        return "denied"
    if any(code in text for code in ("PermanentRedirect", "AuthorizationHeaderMalformed", " 301 ")):
        return "region"
    if any(code.lower() in text.lower() for code in UNREACHABLE):
        return "unreachable"
    return "other"


def _problem(url: ObjectURL, exc: BaseException, field: str, *, writing: bool = False) -> SpecError:
    """A failed request as what the user must fix: the bucket, the object, the credentials, the endpoint."""
    scheme = url.scheme
    credentials = CREDENTIALS.get(scheme, "the storage options")
    endpoint = ENDPOINT_OPTION.get(scheme)
    where = (
        f"{endpoint} in storage_options or {endpoint.upper()}"
        if endpoint
        else "gcs_base_url in the service account file"
    )
    kind = _kind(exc)
    container = "container" if scheme == "az" else "bucket"
    if kind in ("not_found", "denied"):  # a HEAD's 404 or 403 has no body to say why: a LIST's has
        listing = _listing_kind(url)
        if listing in ("no_bucket", "not_found"):
            kind = "no_bucket"
        elif listing == "credentials":
            kind = "credentials"
    if kind == "no_bucket":
        message = f"{url}: the {container} {url.bucket!r} does not exist at this endpoint; check the URL" + (
            ", aws_region or aws_endpoint_url" if scheme == "s3" else f" and {where}"
        )
    elif kind == "not_found":
        message = f"{url}: no such object; check the URL (list {scheme}://{url.bucket}/{url.key.rpartition('/')[0]})"
    elif kind == "credentials":
        message = f"{url}: the storage refused the credentials, or none were found; check {credentials}"
    elif kind == "denied":
        grant = (WRITE_GRANT if writing else READ_GRANT).get(scheme, "access")
        message = f"{url}: access denied; the credentials in use may not {'write' if writing else 'read'} it: grant {grant} on it, or use other credentials ({credentials})"
    elif kind == "region":
        message = f"{url}: the bucket is in another region; set aws_region in storage_options or AWS_REGION"
    elif kind == "unreachable":
        message = f"{url}: cannot reach {STORE_NAMES[scheme]} ({said(exc)}); check {where}, and that the server is up"
    else:
        message = f"{url}: {said(exc)}; check the URL, the endpoint and the credentials ({credentials})"
    return SpecError(Problem(field, message))


def _listing_kind(url: ObjectURL) -> str | None:
    """What a LIST of the bucket's first objects says is wrong (None when it works): a HEAD's 404 cannot tell a
    missing bucket from a missing object, nor its 403 a wrong key from a missing grant (a HEAD has no body)."""
    import obstore

    try:
        next(iter(obstore.list(_store(url), chunk_size=1)), None)
    except Exception as exc:
        return _kind(exc)
    return None
