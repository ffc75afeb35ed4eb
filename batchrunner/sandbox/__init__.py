"""The built-in OpenRouter-compatible sandbox: for tests, dry runs and cron rehearsals.

Its names are imported when first used (PEP 562), so importing `batchrunner.sandbox.faults` (the
CLI lists the fault kinds) does not start up aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchrunner.sandbox.faults import FAULT_KINDS

if TYPE_CHECKING:
    from batchrunner.sandbox.server import Sandbox, SandboxConfig, SandboxStats, request_key, serve

__all__ = ["FAULT_KINDS", "Sandbox", "SandboxConfig", "SandboxStats", "request_key", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from batchrunner.sandbox import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
