"""The built-in OpenRouter-compatible sandbox: for tests, dry runs and cron rehearsals."""

from batchrunner.sandbox.server import FAULT_KINDS, Sandbox, SandboxConfig, SandboxStats, request_key, serve

__all__ = ["FAULT_KINDS", "Sandbox", "SandboxConfig", "SandboxStats", "request_key", "serve"]
