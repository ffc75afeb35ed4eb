"""How log events reach stderr: plain lines for people and cron, or JSON for log collectors.

batchrunner logs through the standard `logging` module under the "batchrunner" logger and
never installs handlers as a library; the CLI calls `configure` once.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from tqdm import tqdm


class JsonFormatter(logging.Formatter):
    """One JSON object per event: time, level, logger, message, and any `extra` fields."""

    _standard = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        event.update({k: v for k, v in record.__dict__.items() if k not in self._standard})
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


class _AboveTheBar(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]  # generic over its stream in some typeshed versions
    """On a terminal, write log lines above tqdm's progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never take the run down
            self.handleError(record)


def configure(*, verbose: bool = False, json_lines: bool = False) -> None:
    interactive = sys.stderr.isatty() and not json_lines
    handler: logging.Handler = _AboveTheBar(sys.stderr) if interactive else logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    elif interactive:
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s batchrunner %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
