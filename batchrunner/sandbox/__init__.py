"""The built-in OpenRouter-compatible sandbox: for tests, dry runs and cron rehearsals.

Its names are imported when first used (PEP 562), so importing `batchrunner.sandbox.faults` (the
CLI lists the fault kinds) does not start up aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchrunner.sandbox.faults import FAULT_KINDS

if TYPE_CHECKING:
    from batchrunner.sandbox.config import SandboxConfig
    from batchrunner.sandbox.server import Sandbox, SandboxStats, request_key, serve

__all__ = ["FAULT_KINDS", "Sandbox", "SandboxConfig", "SandboxStats", "request_key", "serve"]


def __getattr__(name: str) -> Any:
    if name == "SandboxConfig":  # the settings alone: a run without a sandbox names the type, no server imported
        from batchrunner.sandbox import config

        return config.SandboxConfig
    if name in __all__:
        from batchrunner.sandbox import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
