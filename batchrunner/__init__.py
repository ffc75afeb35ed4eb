"""batchrunner: run a dataset of prompts through LLMs on OpenRouter as a batch job.

The command line (`batchrunner run job.yaml`) and this Python API do the same things; the command
line prints what these functions return (api.py says how outcomes are told). Everything not
listed in __all__ is internal.

    import batchrunner
    result = batchrunner.run("jobs/quickstart.yaml", sandbox=True)
    result.frame, result.summary.cost_usd, result.stop, result.exit_code

    result = await batchrunner.arun({"name": "x", "input": "in.csv", ...})  # in a notebook or async code
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
    from batchrunner.api import RunResult, aestimate, arun, estimate, job_spec, report, run, status
    from batchrunner.halt import Stop, StopReason
    from batchrunner.records import Summary
    from batchrunner.runner import Outcome, RunSettings, run_job
    from batchrunner.sandbox import Sandbox, SandboxConfig
    from batchrunner.spec import JobSpec, load_spec

_LAZY = {  # imported on first use: `import batchrunner` (and the CLI's start-up) stays light
    "RunResult": "batchrunner.api",
    "aestimate": "batchrunner.api",
    "arun": "batchrunner.api",
    "estimate": "batchrunner.api",
    "job_spec": "batchrunner.api",
    "report": "batchrunner.api",
    "run": "batchrunner.api",
    "status": "batchrunner.api",
    "Stop": "batchrunner.halt",
    "StopReason": "batchrunner.halt",
    "Summary": "batchrunner.records",
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
    "RunResult",
    "RunSettings",
    "Sandbox",
    "SandboxConfig",
    "SpecError",
    "Stop",
    "StopReason",
    "Summary",
    "TransientError",
    "__version__",
    "aestimate",
    "arun",
    "estimate",
    "job_spec",
    "load_spec",
    "report",
    "run",
    "run_job",
    "status",
]
