"""What the object-storage tests share (tests/test_object_storage.py against moto, tests/test_cloud_stores.py against
Azurite and fake-gcs-server): the rows, their bytes, a spec writer and a run on the sandbox."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from batchrunner.runner import RunSettings, run_job
from batchrunner.sandbox import SandboxConfig
from batchrunner.spec import load_spec


def tickets(rows: int = 12) -> pl.DataFrame:
    return pl.DataFrame(
        {"ticket_id": [f"T-{i}" for i in range(rows)], "text": [f"ticket text number {i}" for i in range(rows)]}
    )


def as_bytes(frame: pl.DataFrame, key: str) -> bytes:
    """`frame` in the format `key`'s extension names (Parquet, CSV, else JSONL)."""
    buffer = io.BytesIO()
    if key.endswith(".parquet"):
        frame.write_parquet(buffer)
    elif key.endswith(".csv"):
        frame.write_csv(buffer)
    else:
        frame.write_ndjson(buffer)
    return buffer.getvalue()


async def run(path: Path) -> Any:
    return await run_job(load_spec(path), RunSettings(sandbox=SandboxConfig()))


def spec_writer(tmp_path: Path, defaults: dict[str, Any]) -> Callable[..., Path]:
    """Write a job spec over `defaults` (the data's URLs, the storage options), with `changes` applied (None
    deletes a key), and return its path."""

    def write(**changes: Any) -> Path:
        spec: dict[str, Any] = {
            "name": "cloud-job",
            "id_column": "ticket_id",
            "models": ["openai/gpt-4o-mini"],
            "prompt": "Ticket {ticket_id}: {text}",
            "params": {"temperature": 0, "max_tokens": 20},
            **defaults,
        }
        spec.update(changes)
        spec = {key: value for key, value in spec.items() if value is not None}
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    return write
