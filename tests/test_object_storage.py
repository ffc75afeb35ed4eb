"""Inputs and outputs in object storage (s3:// URLs), against a real S3 server on loopback (moto in server mode):
read and written by polars' own cloud I/O, the checkpoint local, reruns keyed by the object's ETag, the
credentials never written anywhere, and every problem a SpecError naming the fix before anything is sent."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from helpers.stores import as_bytes, run, spec_writer, tickets  # noqa: E402

from batchrunner import objectstore  # noqa: E402
from batchrunner.errors import OutputError, SpecError  # noqa: E402
from batchrunner.output import _sink  # noqa: E402
from batchrunner.spec import load_spec  # noqa: E402
from batchrunner.urls import ObjectURL  # noqa: E402

KEY_ID = "AKIAEXAMPLEKEYID0001"
SECRET = "s3cr3t-Never-Written-Anywhere-9f8e7d"  # grepped for in everything a run leaves
BUCKET = "data"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, for this module's tests."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(endpoint: str) -> Iterator[Any]:
    """A boto3 client and an empty bucket (emptied again after the test)."""
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name="us-east-1"
    )
    client.create_bucket(Bucket=BUCKET)
    yield client
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


def options(endpoint: str) -> dict[str, str]:
    return {
        "aws_access_key_id": KEY_ID,
        "aws_secret_access_key": SECRET,
        "aws_region": "us-east-1",
        "aws_endpoint_url": endpoint,
    }


def put(client: Any, key: str, frame: pl.DataFrame) -> None:
    """Upload `frame` as `key`, in the format its extension names."""
    client.put_object(Bucket=BUCKET, Key=key, Body=as_bytes(frame, key))


def read(client: Any, key: str) -> pl.DataFrame:
    body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    if key.endswith(".parquet"):
        return pl.read_parquet(io.BytesIO(body))
    if key.endswith(".csv"):
        return pl.read_csv(io.BytesIO(body))
    return pl.read_ndjson(io.BytesIO(body))


@pytest.fixture
def job(tmp_path: Path, endpoint: str) -> Callable[..., Path]:
    """Write a spec reading and writing s3:// URLs (the storage options in it unless told otherwise)."""

    return spec_writer(
        tmp_path,
        {
            "name": "s3-job",
            "input": f"s3://{BUCKET}/in/tickets.parquet",
            "output": f"s3://{BUCKET}/out/result.parquet",
            "storage_options": options(endpoint),
        },
    )


async def test_parquet_in_and_out_of_s3_with_the_checkpoint_beside_the_spec(
    s3: Any, job: Callable[..., Path], tmp_path: Path
) -> None:
    """An s3:// Parquet input is answered into an s3:// Parquet output, its summary beside it; the checkpoint is local."""
    put(s3, "in/tickets.parquet", tickets())
    outcome = await run(job())
    assert outcome.report.summary.ok == 12 and outcome.output_rows == 12
    output = read(s3, "out/result.parquet")
    assert output["ticket_id"].to_list() == [f"T-{i}" for i in range(12)]
    assert output["status"].to_list() == ["ok"] * 12
    summary = s3.get_object(Bucket=BUCKET, Key="out/result.summary.json")["Body"].read()
    assert b'"s3-job"' in summary
    assert (tmp_path / "result.checkpoint.sqlite").exists()
    names = {item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert names == {"in/tickets.parquet", "out/result.parquet", "out/result.summary.json"}  # no probe left


async def test_a_rerun_skips_what_is_answered_and_appended_rows_rewrite_the_output(
    s3: Any, job: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A rerun of an unchanged object sends nothing and keeps the output; rows appended are the only ones sent."""
    caplog.set_level(logging.INFO, logger="batchrunner")
    put(s3, "in/tickets.parquet", tickets())
    path = job()
    await run(path)
    etag = s3.head_object(Bucket=BUCKET, Key="out/result.parquet")["ETag"]
    again = await run(path)
    assert again.report.summary.done == 0 and again.output_rows == 12
    assert "unchanged since the last complete run" in caplog.text
    assert s3.head_object(Bucket=BUCKET, Key="out/result.parquet")["ETag"] == etag
    put(s3, "in/tickets.parquet", tickets(15))  # three rows appended: a new object, a new ETag
    grown = await run(path)
    assert grown.report.summary.done == 3 and grown.output_rows == 15
    assert read(s3, "out/result.parquet")["ticket_id"].to_list() == [f"T-{i}" for i in range(15)]


async def test_the_secret_is_never_in_the_checkpoint_the_logs_or_the_output(
    s3: Any, job: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a run and a rerun, no file under the job's folder, no log line and no object holds the secret key."""
    caplog.set_level(logging.DEBUG)
    put(s3, "in/tickets.parquet", tickets())
    path = job()
    await run(path)
    await run(path)
    assert SECRET not in caplog.text
    secret = SECRET.encode()
    for file in tmp_path.rglob("*"):
        if file.is_file() and file != path:
            assert secret not in file.read_bytes(), file
    for item in s3.list_objects_v2(Bucket=BUCKET)["Contents"]:
        assert secret not in s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read(), item["Key"]
    spec = load_spec(path)
    assert SECRET not in repr(spec) and SECRET not in str(spec.input) and SECRET not in spec.model_dump_json()


async def test_a_csv_glob_read_and_jsonl_written_with_credentials_from_the_environment(
    s3: Any, job: Callable[..., Path], endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no storage_options, AWS_* variables reach the store; a glob reads every matching CSV object."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    put(s3, "in/part-1.csv", tickets(5))
    put(s3, "in/part-2.csv", tickets(12).slice(5))
    outcome = await run(
        job(input=f"s3://{BUCKET}/in/part-*.csv", output=f"s3://{BUCKET}/out/r.jsonl", storage_options=None)
    )
    assert outcome.report.summary.ok == 12
    assert sorted(read(s3, "out/r.jsonl")["ticket_id"].to_list()) == sorted(f"T-{i}" for i in range(12))


@pytest.mark.parametrize(
    ("where", "fix"),
    [
        ("s3://nobucket/in/tickets.parquet", "the bucket 'nobucket' does not exist"),
        (f"s3://{BUCKET}/in/missing.parquet", "no such object"),
        (f"s3://{BUCKET}/nothing/*.parquet", "no object matches"),
    ],
)
async def test_a_missing_bucket_object_or_match_is_refused_naming_the_fix(
    s3: Any, job: Callable[..., Path], where: str, fix: str
) -> None:
    """A missing bucket, object or glob match is a SpecError at the spec's input line, before anything is sent."""
    with pytest.raises(SpecError) as caught:
        await run(job(input=where))
    assert fix in str(caught.value) and "input" in str(caught.value)


async def test_a_wrong_endpoint_or_a_missing_output_bucket_is_refused(s3: Any, job: Callable[..., Path]) -> None:
    """A port nothing listens on names aws_endpoint_url; an output bucket that does not exist is refused too."""
    put(s3, "in/tickets.parquet", tickets())
    wrong = {**options("http://127.0.0.1:1"), "aws_access_key_id": KEY_ID}
    with pytest.raises(SpecError, match="aws_endpoint_url"):
        await run(job(storage_options=wrong))
    with pytest.raises(SpecError, match="the bucket 'elsewhere' does not exist"):
        await run(job(output="s3://elsewhere/out/result.parquet"))
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="out/")


async def test_a_remote_jsonl_input_with_a_lone_surrogate_is_refused_naming_the_object_and_line(
    s3: Any, job: Callable[..., Path]
) -> None:
    """A lone UTF-16 half in an object of a JSONL glob is refused as in a local file, naming the object and line."""
    put(s3, "in/part-1.jsonl", tickets(3))
    good = b'{"ticket_id": "T-3", "text": "a pair \\ud83d\\ude00 is fine"}\n'
    bad = b'{"ticket_id": "T-4", "text": "half \\ud800 of a pair"}\n'
    s3.put_object(Bucket=BUCKET, Key="in/part-2.jsonl", Body=good + bad)
    with pytest.raises(SpecError) as caught:
        await run(job(input=f"s3://{BUCKET}/in/part-*.jsonl"))
    message = str(caught.value)
    assert f"s3://{BUCKET}/in/part-2.jsonl:2" in message and "'text'" in message and "\\ud800" in message
    assert "part-1" not in message and ":1:" not in message


def test_a_denied_key_names_the_permission_to_grant() -> None:
    """A 403 from the store (obstore's PermissionDeniedError) says the credentials may not read the object and what
    to grant, never a traceback."""
    from obstore.exceptions import PermissionDeniedError

    denied = PermissionDeniedError("Error performing HEAD http://s3/b/k.parquet - Server returned 403: AccessDenied")
    problem = objectstore._problem(ObjectURL.parse("s3://b/k.parquet"), denied, "input")
    assert "access denied" in str(problem) and "s3:GetObject" in str(problem)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"checkpoint": "s3://data/job.sqlite"}, "the checkpoint is a local SQLite file"),
        ({"input": "s3://KEY:SECRET@data/in.parquet"}, "holds no credentials"),
        ({"input": "ftp://data/in.parquet"}, "ftp:// is not supported"),
        ({"storage_options": {"aws_secret_key": "x"}}, "unknown storage option(s) 'aws_secret_key'"),
    ],
)
def test_what_a_spec_may_not_say_about_object_storage(
    job: Callable[..., Path], changes: dict[str, Any], message: str
) -> None:
    """A remote checkpoint, credentials in a URL, another scheme or a misspelt option are refused as the spec is read."""
    with pytest.raises(SpecError) as caught:
        load_spec(job(**changes))
    assert message in str(caught.value) and "SECRET" not in str(caught.value)


def test_a_failed_upload_leaves_no_object_and_no_unfinished_upload(s3: Any, endpoint: str) -> None:
    """A sink that fails half-way leaves the key as it was (absent here) and its multipart upload aborted."""
    url = ObjectURL.parse(f"s3://{BUCKET}/out/broken.parquet").bound(options(endpoint), Path("."))
    seen = [0]

    def boom(frame: pl.DataFrame) -> pl.DataFrame:
        seen[0] += frame.height
        if seen[0] > 1_500_000:
            raise RuntimeError("disk on fire")
        return frame

    rows = pl.select(i=pl.int_range(2_000_000)).with_columns(s=pl.col("i").hash(7).cast(pl.String)).lazy()
    since = datetime.now(UTC)
    with pytest.raises(Exception, match="disk on fire"):
        _sink(rows.map_batches(boom, streamable=True), url)
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="out/")
    assert [u for u in s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) if u["Initiated"] >= since] == []


def test_a_staging_object_a_killed_run_left_is_removed_by_the_next_write(s3: Any, endpoint: str) -> None:
    """A kill after polars completed the staging upload and before the copy leaves `.staged-<id>-<name>` beside the
    output: the next write of that output deletes it (and only what batchrunner names so), then publishes."""
    url = ObjectURL.parse(f"s3://{BUCKET}/out/kept.csv").bound(options(endpoint), Path("."))
    left = f"out/.staged-{'a' * 32}-kept.csv"
    s3.put_object(Bucket=BUCKET, Key=left, Body=b"half")
    s3.put_object(Bucket=BUCKET, Key="out/.staged-notours-kept.csv", Body=b"someone else's")
    _sink(pl.LazyFrame({"x": [1, 2]}), url)
    keys = sorted(item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="out/")["Contents"])
    assert "out/kept.csv" in keys and left not in keys and "out/.staged-notours-kept.csv" in keys
    assert read(s3, "out/kept.csv")["x"].to_list() == [1, 2]


def test_a_copy_the_storage_refuses_is_an_output_error_and_the_old_output_stands(
    s3: Any, endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server-side copy that puts a staged output in place fails (a policy, a network error): an OutputError
    (one sentence; the run says `batchrunner export`), never botocore's traceback; the old output is untouched
    and the staging object deleted."""
    from botocore.exceptions import ClientError

    url = ObjectURL.parse(f"s3://{BUCKET}/out/guarded.csv").bound(options(endpoint), Path("."))
    s3.put_object(Bucket=BUCKET, Key="out/guarded.csv", Body=b"x\n1\n")

    def refused(staged: ObjectURL, final: ObjectURL) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "CopyObject")

    monkeypatch.setattr(objectstore, "publish", refused)
    with pytest.raises(OutputError, match=r"could not put the output in place at s3://data/out/guarded\.csv"):
        _sink(pl.LazyFrame({"x": [2, 3]}), url)
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="out/")["Contents"]]
    assert keys == ["out/guarded.csv"] and read(s3, "out/guarded.csv")["x"].to_list() == [1]


def test_the_command_line_takes_an_s3_output(
    s3: Any, job: Callable[..., Path], tmp_path: Path, write_spec: Callable[..., Path]
) -> None:
    """`run --output s3://...` (click hands a Path, `s3:/...`) writes the object; the checkpoint stays local."""
    from click.testing import CliRunner

    from batchrunner.cli import main

    put(s3, "in/tickets.parquet", tickets())
    path = job(output=str(tmp_path / "local.parquet"))
    result = CliRunner().invoke(main, ["run", str(path), "--sandbox", "--output", f"s3://{BUCKET}/out/cli.csv"])
    assert result.exit_code == 0, result.output
    assert read(s3, "out/cli.csv").height == 12
    assert (tmp_path / "local.checkpoint.sqlite").exists() and not (tmp_path / "local.parquet").exists()


@pytest.mark.slow
def test_memory_stays_flat_reading_and_writing_large_objects(s3: Any, endpoint: str, tmp_path: Path) -> None:
    """100,000 rows of 1 KB checked, read in batches and copied back through S3 peak under 2.2 times 10,000 rows."""
    import json
    import subprocess
    import sys

    script = """
import sys, json, polars as pl
from pathlib import Path
from batchrunner.dataset import open_dataset
from batchrunner.output import _sink
from batchrunner.urls import ObjectURL
options = json.loads(sys.argv[2])
url = ObjectURL.parse(sys.argv[1]).bound(options, Path("."))
dataset = open_dataset(url, id_column="ticket_id")
rows = sum(len(batch) for batch in dataset.batches(batch_size=2048))
_sink(dataset.frame, url.with_name("copy-" + url.name))
status = Path("/proc/self/status").read_text()  # VmHWM: ru_maxrss keeps the forking parent's peak over exec
peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
print(json.dumps({"rows": rows, "peak_mb": peak}))
"""
    peaks = {}
    for rows in (10_000, 100_000):
        frame = tickets(rows).with_columns(pl.col("text").str.pad_end(1000, "x"))
        buffer = io.BytesIO()
        frame.write_parquet(buffer, row_group_size=5_000)  # polars decodes a row group whole, local or remote
        s3.put_object(Bucket=BUCKET, Key=f"in/big-{rows}.parquet", Body=buffer.getvalue())
        found = subprocess.run(
            [sys.executable, "-c", script, f"s3://{BUCKET}/in/big-{rows}.parquet", json.dumps(options(endpoint))],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(found.stdout.strip().splitlines()[-1])
        assert result["rows"] == rows
        peaks[rows] = result["peak_mb"]
    print(peaks)
    # measured 2026-12-06 (VmHWM, in a process of its own: moto keeps its objects in this one; see
    # bench/object_storage_memory.py): 157 MB and 311 MB, 1.98x. The checking pass is flat now (139 -> 177 MB with
    # the distinct ids); the rest is polars' streaming read-ahead in collect_batches and the sink, which fills up
    # to ~100,000 rows of 1 KB and then levels off (370 MB at 300,000 rows).
    assert peaks[100_000] < 2.2 * peaks[10_000], peaks


class KillingProxy:
    """A TCP relay to the S3 server that SIGKILLs `victim` the moment a request for a multipart upload's part
    (`?partNumber=`) comes through, and drops that request: the kill lands while the upload is in progress."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.victim: int | None = None
        self.killed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, watch: bool) -> None:
        tail = b""
        try:
            while data := source.recv(65536):
                if watch and b"partNumber=" in tail + data and self.victim is not None:
                    os.kill(self.victim, signal.SIGKILL)
                    self.killed.set()
                    break
                tail = data[-32:]
                target.sendall(data)
        except OSError:
            pass
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.slow
async def test_a_kill_during_the_outputs_upload_leaves_the_previous_output_whole(
    s3: Any, job: Callable[..., Path], endpoint: str
) -> None:
    """SIGKILL while a rerun's multipart upload of the output is in progress: the old object is untouched, the
    upload is left unfinished (never completed), and the next run succeeds and replaces the output."""
    rows = tickets(300).with_columns(pl.col("text").str.pad_end(1000, "."))  # a 300 KB CSV output
    put(s3, "in/tickets.parquet", rows)
    output = {"output": f"s3://{BUCKET}/out/result.csv"}
    first = await run(job(**output))
    assert first.report.summary.ok == 300
    before = s3.get_object(Bucket=BUCKET, Key="out/result.csv")
    old_etag, old_body = before["ETag"], before["Body"].read()

    proxy = KillingProxy(endpoint)
    try:
        path = job(**output, prompt="Again, ticket {ticket_id}: {text}", storage_options=options(proxy.url))
        # parts of 64 KB (polars' default is far larger): the 300 KB output is a multipart upload of several
        env = {**os.environ, "POLARS_UPLOAD_CHUNK_SIZE": str(64 * 1024)}
        child = subprocess.Popen(
            [sys.executable, "-m", "batchrunner", "run", str(path), "--sandbox"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        proxy.victim = child.pid
        _, errors = child.communicate(timeout=60)
        assert proxy.killed.is_set() and child.returncode == -signal.SIGKILL, errors.decode()[-2000:]
    finally:
        proxy.close()

    after = s3.get_object(Bucket=BUCKET, Key="out/result.csv")
    assert after["ETag"] == old_etag and after["Body"].read() == old_body  # whole, and the old one
    assert pl.read_csv(io.BytesIO(old_body))["ticket_id"].to_list() == [f"T-{i}" for i in range(300)]
    unfinished = s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    staged = [upload["Key"] for upload in unfinished]  # begun beside the output, never completed
    assert len(staged) == 1 and staged[0].startswith("out/.staged-") and staged[0].endswith("-result.csv")

    again = await run(job(**output, prompt="Again, ticket {ticket_id}: {text}"))
    assert again.report.summary.failed == 0 and again.output_rows == 300
    rewritten = s3.get_object(Bucket=BUCKET, Key="out/result.csv")
    assert rewritten["ETag"] != old_etag
    assert pl.read_csv(io.BytesIO(rewritten["Body"].read()))["status"].to_list() == ["ok"] * 300
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="out/.staged-"), "no staging object is left"
    for upload in unfinished:
        s3.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])


@pytest.mark.slow  # two runs in their own interpreters: the long set (CI's second step)
def test_credentials_from_an_aws_profile_read_and_write(
    s3: Any, job: Callable[..., Path], tmp_path: Path, endpoint: str
) -> None:
    """With no keys in the spec or the environment, AWS_PROFILE names the profile (in the shared credentials
    file) whose keys read the input and write the output, as the AWS CLI's would; a profile that is not there is
    exit 2 naming it, before anything is sent. (moto takes any key: this proves the profile is found and used.)"""
    put(s3, "in/tickets.parquet", tickets())
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(f"[labeling]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env |= {
        "AWS_PROFILE": "labeling",
        "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
    }
    path = job(storage_options=None)
    done = subprocess.run(
        [sys.executable, "-m", "batchrunner", "run", str(path), "--sandbox"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert read(s3, "out/result.parquet")["ticket_id"].to_list() == [f"T-{i}" for i in range(12)]
    wrong = subprocess.run(
        [sys.executable, "-m", "batchrunner", "run", str(path), "--sandbox"],
        env={**env, "AWS_PROFILE": "nobody"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode == 2, wrong.stderr
    assert "Traceback" not in wrong.stderr and SECRET not in wrong.stderr
    assert "profile (nobody) could not be found" in wrong.stderr and "input" in wrong.stderr


def test_an_upload_the_store_refuses_is_an_output_error(
    s3: Any, endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload of a CSV output fails with one of obstore's errors that is not an OSError (a network error after
    its retries): an OutputError naming the output (the run logs it and says `batchrunner export`), never a
    traceback past the write phase; the old output stands."""
    import obstore

    url = ObjectURL.parse(f"s3://{BUCKET}/out/kept.csv").bound(options(endpoint), Path("."))
    s3.put_object(Bucket=BUCKET, Key="out/kept.csv", Body=b"x\n1\n")

    def refused(*args: Any, **kwargs: Any) -> None:
        raise obstore.exceptions.GenericError("Generic S3 error: error sending request")

    monkeypatch.setattr(obstore, "put", refused)
    with pytest.raises(OutputError, match=r"could not upload the output to s3://data/out/kept\.csv: Generic S3"):
        _sink(pl.LazyFrame({"x": [2, 3]}), url)
    assert read(s3, "out/kept.csv")["x"].to_list() == [1]
