"""batchrunner: run a dataset of prompts through LLMs on OpenRouter as a batch job.

The command line (`batchrunner run job.yaml`) is the main interface; this is the public
surface for using it from Python. Everything not listed here is internal.

    import asyncio
    from batchrunner import SandboxConfig, load_spec, run_job
    outcome = asyncio.run(run_job(load_spec("jobs/quickstart.yaml"), sandbox=SandboxConfig()))
"""

from importlib.metadata import PackageNotFoundError, version

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
from batchrunner.runner import Outcome, run_job
from batchrunner.sandbox import Sandbox, SandboxConfig
from batchrunner.spec import JobSpec, load_spec

try:
    __version__ = version("batchrunner")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

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
    "Sandbox",
    "SandboxConfig",
    "SpecError",
    "TransientError",
    "__version__",
    "load_spec",
    "run_job",
]
