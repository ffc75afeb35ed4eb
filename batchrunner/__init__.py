"""batchrunner: run a dataset of prompts through LLMs on OpenRouter as a batch job.

The command line (`batchrunner run job.yaml`) is the main interface; this is the public
surface for using it from Python. Everything not listed here is internal.

    import asyncio
    from batchrunner import RunSettings, SandboxConfig, load_spec, run_job
    outcome = asyncio.run(run_job(load_spec("jobs/quickstart.yaml"), RunSettings(sandbox=SandboxConfig())))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchrunner.errors import (
    ApiError,
    BatchrunnerError,
    FatalApiError,
    FreeModelCapReached,
    MediaProblem,
    OutputError,
    RateLimited,
    RequestRejected,
    RunHalted,
    SpecError,
    TransientError,
)

if TYPE_CHECKING:
    from batchrunner.runner import Outcome, RunSettings, run_job
    from batchrunner.sandbox import Sandbox, SandboxConfig
    from batchrunner.spec import JobSpec, load_spec

_LAZY = {  # imported on first use: `import batchrunner` (and the CLI's start-up) stays light
    "Outcome": "batchrunner.runner",
    "RunSettings": "batchrunner.runner",
    "run_job": "batchrunner.runner",
    "Sandbox": "batchrunner.sandbox",
    "SandboxConfig": "batchrunner.sandbox",
    "JobSpec": "batchrunner.spec",
    "load_spec": "batchrunner.spec",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("batchrunner")
        except PackageNotFoundError:  # running from a source tree that was never installed
            return "0+unknown"
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ApiError",
    "BatchrunnerError",
    "FatalApiError",
    "FreeModelCapReached",
    "JobSpec",
    "MediaProblem",
    "Outcome",
    "OutputError",
    "RateLimited",
    "RequestRejected",
    "RunHalted",
    "RunSettings",
    "Sandbox",
    "SandboxConfig",
    "SpecError",
    "TransientError",
    "__version__",
    "load_spec",
    "run_job",
]
