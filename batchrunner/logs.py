"""How log events reach stderr: plain lines for people and cron, or JSON for log collectors.

batchrunner logs through the standard `logging` module under the "batchrunner" logger and
never installs handlers as a library; the CLI calls `configure` once.
"""

from __future__ import annotations

import logging
import re
import sys
import time

from batchrunner.jsontext import dumps

MAX_MESSAGE_CHARS = 2000  # a log line or printed message longer than this is cut: a 10 MB error is not logged per row
# Characters that move the cursor, rewrite the title or the clipboard, clear the screen, or forge log lines:
# C0 controls (newline and escape among them), DEL, C1 controls, and Unicode line and bidi overrides.
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Text that came from outside (a server's error, an answer, a cell), safe to print on a terminal:
    control characters shown as escapes, and at most `limit` characters."""
    text = str(text)
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit:,} more characters)"
    return _UNPRINTABLE.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", text
    )


class _Printable(logging.Filter):
    """Every log message made printable (see `printable`) before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = printable(record.getMessage()), None
        return True


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
        return dumps(event, default=str)  # strict: a collector's parser takes no Infinity


class _AboveTheBar(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]  # generic over its stream in some typeshed versions
    """On a terminal, write log lines above tqdm's progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm  # only once there is a bar to write above

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
    handler.addFilter(_Printable())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    for chatty in ("botocore", "boto3", "urllib3", "s3transfer"):  # s3:// jobs: every signed request, at DEBUG
        logging.getLogger(chatty).setLevel(logging.WARNING)
