"""Memory of reading and writing through S3: peak RSS by phase, for N rows of 1 KB, remote (moto) and local.

Each size is measured in a fresh process (moto keeps its objects in this one), which opens the input
(open_dataset: the checking pass), reads every row in batches of 2,048 as the run does, then sinks the
input to an output beside it (the multipart upload for s3://). The peak after each phase is the process's VmHWM
(not ru_maxrss: Linux keeps the forking parent's peak across exec), which is monotonic: a later phase's figure includes the earlier ones.

    python bench/object_storage_memory.py [--rows 10000,100000] [--local] [--formats parquet,csv,jsonl]

Prints one line per size and place (rows, where, peak MB after open / batches / sink), then the ratio of the
largest size's final peak to the smallest's.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import polars as pl

MEASURE = textwrap.dedent(
    """
    import json, sys, tempfile, threading, time
    from pathlib import Path
    import polars as pl
    from batchrunner.dataset import open_dataset
    from batchrunner.output import _sink, _write_parts
    from batchrunner.urls import ObjectURL
    def status(field):
        text = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith(field + ":"))) / 1024
    anon = {"peak": 0.0}
    def sample():  # RssAnon has no high-water mark of its own: sampled every 2 ms
        while True:
            anon["peak"] = max(anon["peak"], status("RssAnon"))
            time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()
    def peak():
        # VmHWM: this program's own high-water mark (ru_maxrss would carry the parent's RSS at fork over exec),
        # and the sampled peak of anonymous memory (VmHWM also counts file pages mapped, which are the page cache's)
        anon["peak"] = max(anon["peak"], status("RssAnon"))
        return [status("VmHWM"), anon["peak"]]
    where, options = sys.argv[1], json.loads(sys.argv[2])
    path = ObjectURL.parse(where).bound(options, Path(sys.argv[3])) if where.startswith("s3://") else Path(where)
    found = {"start": peak()}
    dataset = open_dataset(path, id_column="ticket_id")
    found["open"] = peak()
    found["rows"] = sum(len(batch) for batch in dataset.batches(batch_size=2048))
    found["batches"] = peak()
    with tempfile.TemporaryDirectory(dir=sys.argv[3]) as parts:  # as output.export writes: parts, then one sink
        _write_parts((chunk for chunk, _ in dataset.chunks(batch_size=20_000)), Path(parts))
        _sink(pl.scan_parquet(Path(parts) / "*.parquet"), path.with_name("copy-" + path.name))
    found["sink"] = peak()
    print(json.dumps(found))
    """
)
KEY_ID, SECRET, BUCKET = "AKIABENCH", "bench-secret", "bench"
PHASES = ("open", "batches", "sink")


def frame(rows: int) -> pl.DataFrame:
    """`rows` rows of ~1 KB: an id and a text padded to 1,000 characters."""
    ids = pl.int_range(rows, eager=True).cast(pl.String)
    return pl.DataFrame({"ticket_id": "T-" + ids, "text": ("ticket text number " + ids).str.pad_end(1000, "x")})


def measure(where: str, options: dict[str, str], scratch: Path) -> dict[str, list[float]]:
    found = subprocess.run(
        [sys.executable, "-c", MEASURE, where, json.dumps(options), str(scratch)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, list[float]] = json.loads(found.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000")
    parser.add_argument("--local", action="store_true", help="measure a local file of each size too")
    parser.add_argument("--formats", default="parquet", help="input formats, of parquet, csv and jsonl")
    args = parser.parse_args()
    sizes = [int(size) for size in args.rows.split(",")]

    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {
        "aws_access_key_id": KEY_ID,
        "aws_secret_access_key": SECRET,
        "aws_region": "us-east-1",
        "aws_endpoint_url": endpoint,
    }
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name="us-east-1"
    )
    client.create_bucket(Bucket=BUCKET)
    peaks: dict[tuple[str, int], float] = {}
    try:
        with tempfile.TemporaryDirectory() as folder:
            scratch = Path(folder)
            print("rows  where  open_mb  batches_mb  sink_mb  (each: peak RSS / peak anonymous)")
            for rows, suffix in ((rows, suffix) for suffix in args.formats.split(",") for rows in sizes):
                buffer = io.BytesIO()
                if suffix == "parquet":
                    frame(rows).write_parquet(buffer, row_group_size=5_000)
                else:
                    frame(rows).write_csv(buffer) if suffix == "csv" else frame(rows).write_ndjson(buffer)
                client.put_object(Bucket=BUCKET, Key=f"in/big-{rows}.{suffix}", Body=buffer.getvalue())
                places = [(f"s3-{suffix}", f"s3://{BUCKET}/in/big-{rows}.{suffix}")]
                if args.local:
                    local = scratch / f"big-{rows}.{suffix}"
                    local.write_bytes(buffer.getvalue())
                    places.append((f"local-{suffix}", str(local)))
                for name, where in places:
                    found = measure(where, options, scratch)
                    assert found["rows"] == rows, found
                    peaks[name, rows] = found["sink"][1]
                    shown = "  ".join(f"{found[phase][0]:.0f}/{found[phase][1]:.0f}" for phase in PHASES)
                    print(f"{rows} {name}  {shown}")
    finally:
        server.stop()
    for name in sorted({name for name, _ in peaks}):
        if (name, sizes[0]) in peaks:
            ratio = peaks[name, sizes[-1]] / peaks[name, sizes[0]]
            print(
                f"{name}: peak anonymous memory {peaks[name, sizes[0]]:.0f} MB at {sizes[0]} rows, "
                f"{peaks[name, sizes[-1]]:.0f} MB at {sizes[-1]} rows, ratio {ratio:.2f}"
            )


if __name__ == "__main__":
    main()
