"""The public surface: what `import batchrunner` offers is deliberate, and changes only on purpose."""

from __future__ import annotations

import batchrunner
from batchrunner.errors import BatchrunnerError


def test_all_is_pinned() -> None:
    """__all__ lists exactly these names (a change here is a change to the public API), and each exists."""
    assert sorted(batchrunner.__all__) == [
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
    assert all(hasattr(batchrunner, name) for name in batchrunner.__all__)


def test_every_public_error_is_in_the_one_tree() -> None:
    """Every exception batchrunner exports derives from BatchrunnerError, so one except clause catches them all."""
    errors = [
        getattr(batchrunner, name)
        for name in batchrunner.__all__
        if name.endswith(("Error", "Reached", "Halted", "Limited", "Rejected"))
    ]
    assert errors and all(issubclass(error, BatchrunnerError) for error in errors)


def test_no_submodule_shadows_a_public_name() -> None:
    """Once every module of the package is imported, each public name is still what __all__ promises, never a
    submodule of the same name (`batchrunner.report` was the module report.py, not the function)."""
    import importlib
    import pkgutil
    import types

    for module in pkgutil.walk_packages(batchrunner.__path__, "batchrunner."):
        if module.name != "batchrunner.__main__":
            importlib.import_module(module.name)
    assert [name for name in batchrunner.__all__ if isinstance(getattr(batchrunner, name), types.ModuleType)] == []
