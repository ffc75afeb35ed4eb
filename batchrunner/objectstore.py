"""The requests to object storage that polars does not make for us: HEAD and LIST (is the input there, can the
job read it, what is its identity), a probe of the output's bucket, the summary's PUT, and cleaning up after a
failed upload.

polars reads and writes the rows themselves (its scans and sinks, with the spec's `storage_options`); it
exposes neither an object's ETag nor a way to tell a missing bucket from a denied key before a scan fails
half-way. Those few requests go through boto3 (the `s3` extra), built from the same options: polars' names
mapped to boto3's, and what the spec leaves unset from the standard AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, AWS_PROFILE), which polars reads too.

Every failure is a SpecError naming the fix (exit 2), raised before any completion is sent. No message names a
credential: they are neither in the URL (urls.py refuses them) nor in boto3's error texts.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import time
import uuid
from datetime import datetime
from typing import Any

from batchrunner.errors import Problem, SpecError
from batchrunner.urls import ObjectURL

log = logging.getLogger("batchrunner")

# boto3's names for polars' options (the rest, such as aws_allow_http, only polars needs)
BOTO3_NAMES = {
    "aws_access_key_id": "aws_access_key_id",
    "aws_secret_access_key": "aws_secret_access_key",
    "aws_session_token": "aws_session_token",
    "aws_region": "region_name",
    "aws_endpoint_url": "endpoint_url",
}
CONNECT_TIMEOUT_S = 5  # a wrong endpoint is told in seconds, not after polars' 8 retries over 30 s
READ_TIMEOUT_S = 30


def polars_options(url: ObjectURL) -> dict[str, str] | None:
    """What polars' scans and sinks take as `storage_options`: the spec's, or None for polars' own defaults
    (the environment, AWS_PROFILE)."""
    return dict(url.options) or None


def _client(url: ObjectURL) -> Any:
    return _cached_client(tuple(sorted(url.options.items())))


@functools.lru_cache(maxsize=8)
def _cached_client(options: tuple[tuple[str, str], ...]) -> Any:
    """A boto3 S3 client for these options (one per set of options: a session reads the environment once)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise SpecError(Problem("input", "s3:// input and output need boto3: pip install 'batchrunner[s3]'")) from None
    given = dict(options)
    kwargs = {BOTO3_NAMES[key]: value for key, value in given.items() if key in BOTO3_NAMES}
    virtual = given.get("aws_virtual_hosted_style_request", "").lower() == "true"
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": 2, "mode": "standard"},
        # object_store (polars) asks by path unless told otherwise; so do we, to reach the same endpoints
        s3={"addressing_style": "virtual" if virtual else "path"},
        signature_version=_unsigned() if given.get("aws_skip_signature", "").lower() == "true" else None,
    )
    return boto3.session.Session().client("s3", config=config, **kwargs)


def _unsigned() -> Any:
    from botocore import UNSIGNED

    return UNSIGNED


def objects(url: ObjectURL, *, field: str = "input") -> list[dict[str, Any]]:
    """The objects `url` names (HEAD for one, LIST for a glob), each as {"key", "etag", "version", "size"};
    SpecError naming the fix when there is none or it cannot be reached."""
    client = _client(url)
    try:
        if not url.has_glob:
            found = client.head_object(Bucket=url.bucket, Key=url.key)
            return [_described(url.key, found.get("ETag"), found.get("VersionId"), found.get("ContentLength"))]
        prefix = url.key[: min(url.key.find(c) for c in "*?[" if c in url.key)]
        listed = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=url.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                # fnmatch's * crosses "/", so this may list more than polars reads: an identity that changes
                # more often than it must (a rerun reads the rows), never one that misses a change
                if fnmatch.fnmatchcase(item["Key"], url.key):
                    listed.append(_described(item["Key"], item.get("ETag"), None, item.get("Size")))
    except SpecError:
        raise
    except Exception as exc:
        raise _problem(url, exc, field) from None
    if not listed:
        raise SpecError(
            Problem(field, f"{url}: no object matches; check the pattern, or list s3://{url.bucket}/{prefix}")
        )
    return sorted(listed, key=lambda item: str(item["key"]))


def _described(key: str, etag: Any, version: Any, size: Any) -> dict[str, Any]:
    return {"key": key, "etag": str(etag or ""), "version": str(version or ""), "size": int(size or 0)}


def identity(url: ObjectURL) -> list[Any] | None:
    """The object(s) as the store knows them (each one's key, ETag, version and size), to tell later whether
    they are still the ones a run read or wrote, as files.identity does for a local file; None when there is
    none or it cannot be asked (a rerun then reads every row: the safe way)."""
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
    client = _client(url)
    probe = url.with_name(f".{url.stem}.probe{url.suffix}")
    try:
        client.head_bucket(Bucket=url.bucket)
        client.put_object(Bucket=url.bucket, Key=probe.key, Body=b"")
    except Exception as exc:
        raise _problem(url, exc, field, writing=True) from None
    try:
        client.delete_object(Bucket=url.bucket, Key=probe.key)
    except Exception as exc:  # a policy may allow putting but not deleting: the run can still write its output
        log.warning("could not delete the probe %s (%s); delete it by hand", probe, _first(exc))


def body(url: ObjectURL) -> Any:
    """The object's body as a stream (botocore's StreamingBody: read(n), close()), for the checks polars cannot
    make, read a block at a time; SpecError naming the fix when it cannot be had."""
    try:
        return _client(url).get_object(Bucket=url.bucket, Key=url.key)["Body"]
    except Exception as exc:
        raise _problem(url, exc, "input") from None


def put_text(url: ObjectURL, text: str) -> None:
    """One object, in a single PUT: it appears whole or not at all."""
    _client(url).put_object(Bucket=url.bucket, Key=url.key, Body=text.encode("utf-8"))


STAGED = ".staged-"  # the prefix of an output's staging object, beside it: `.staged-<uuid>-<name>`


def staging(url: ObjectURL) -> ObjectURL:
    """A fresh key beside `url` to write the output to first (see `publish`)."""
    folder, _, name = url.key.rpartition("/")
    return url.with_key(f"{folder + '/' if folder else ''}{STAGED}{uuid.uuid4().hex}-{name}")


def publish(staged: ObjectURL, final: ObjectURL) -> None:
    """Make the staged object the final one: a server-side copy (S3 makes a copied object visible whole, at once;
    boto3 copies a large one in parts, completed last), then the staging object deleted. polars' own multipart
    upload is not trusted to be all or nothing: a sink that failed half-way was seen to complete it, leaving a
    truncated object at the key (tests/test_object_storage.py)."""
    client = _client(final)
    client.copy({"Bucket": staged.bucket, "Key": staged.key}, final.bucket, final.key)
    discard(staged)


def discard(url: ObjectURL) -> None:
    """Delete an object batchrunner made (a staging object), quietly: the output's own outcome is what counts."""
    try:
        _client(url).delete_object(Bucket=url.bucket, Key=url.key)
    except Exception as exc:
        log.warning("could not delete %s (%s); delete it by hand", url, _first(exc))


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
    folder, _, name = final.key.rpartition("/")
    prefix = f"{folder + '/' if folder else ''}{STAGED}"
    removed = []
    try:
        pages = _client(final).get_paginator("list_objects_v2").paginate(Bucket=final.bucket, Prefix=prefix)
        listed = [item for page in pages for item in page.get("Contents", [])]  # every page: 1,000 a page
    except Exception as exc:
        log.warning("could not list what a killed run left beside %s (%s)", final, _first(exc))
        return []
    for item in listed:
        key = str(item["Key"])
        if key.endswith(f"-{name}") and len(key) == len(prefix) + 32 + 1 + len(name):
            discard(final.with_key(key))
            removed.append(key)
    return removed


def abort_uploads(url: ObjectURL, since: datetime) -> None:
    """Abort the multipart uploads to `url` begun since `since`: what polars leaves when a sink fails half-way
    (it never completes them, so no object appears at the key, but their parts would be kept, and billed, until
    a lifecycle rule removes them). The job's lock means no other run of the job is writing there."""
    try:
        client = _client(url)
        pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=url.bucket, Prefix=url.key)
        found = [upload for page in pages for upload in page.get("Uploads", [])]
        for upload in found:
            if upload["Key"] == url.key and upload["Initiated"] >= since:
                client.abort_multipart_upload(Bucket=url.bucket, Key=url.key, UploadId=upload["UploadId"])
    except Exception as exc:  # the output's own error is the one to report
        log.warning("could not abort the unfinished upload to %s (%s)", url, _first(exc))


def _first(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _problem(url: ObjectURL, exc: Exception, field: str, *, writing: bool = False) -> SpecError:
    """A failed request as what the user must fix: the bucket, the object, the credentials, the endpoint."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )
    from botocore.exceptions import ConnectTimeoutError as BotoConnectTimeout

    credentials = (
        "storage_options (aws_access_key_id, aws_secret_access_key) or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    )
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        message = f"{url}: no AWS credentials were found; set {credentials} (or AWS_PROFILE)"
    elif isinstance(exc, (EndpointConnectionError, BotoConnectTimeout, ConnectionError)):
        message = (
            f"{url}: cannot reach the storage endpoint ({_first(exc)}); check aws_endpoint_url in storage_options "
            "or AWS_ENDPOINT_URL, and that the server is up"
        )
    elif isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code == "NoSuchBucket" or (status == 404 and not _bucket_exists(url)):
            message = f"{url}: the bucket {url.bucket!r} does not exist (at this endpoint and region); check the URL, aws_region or aws_endpoint_url"
        elif status == 404 or code in ("NoSuchKey", "NotFound"):
            message = f"{url}: no such object; check the URL (aws s3 ls s3://{url.bucket}/{url.key.rpartition('/')[0]})"
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            message = f"{url}: the storage refused the credentials ({code}); check {credentials}"
        elif status == 403 or code == "AccessDenied":
            action = "write" if writing else "read"
            message = (
                f"{url}: access denied; the credentials in use may not {action} it: grant "
                f"{'s3:PutObject' if writing else 's3:GetObject and s3:ListBucket'} on it, or use other credentials ({credentials})"
            )
        elif code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
            message = (
                f"{url}: the bucket is in another region ({code}); set aws_region in storage_options or AWS_REGION"
            )
        else:
            message = f"{url}: the storage answered {status} {code}; check the URL and the storage options"
    else:
        message = f"{url}: {type(exc).__name__}: {_first(exc)}; check the URL, the endpoint and the credentials"
    return SpecError(Problem(field, message))


def _bucket_exists(url: ObjectURL) -> bool:
    """HEAD cannot say whether a 404 is the bucket's or the object's: ask the bucket."""
    try:
        _client(url).head_bucket(Bucket=url.bucket)
    except Exception:
        return False
    return True
