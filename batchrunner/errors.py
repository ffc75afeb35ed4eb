"""The one exception tree of batchrunner.

    BatchrunnerError
    ├── SpecError            the job spec, its input or the arguments are wrong: nothing was sent (exit 2)
    ├── ApiError             an answer from the API that is not a usable completion (raised by client.py only)
    │   ├── TransientError   worth retrying on the same model: 408, 429, 5xx, timeouts, dropped
    │   │   │                connections, an error inside a 200, an empty answer
    │   │   └── RateLimited  a 429 (or an in-flight-budget 402): slow down, honour `retry_after_s`
    │   ├── RequestRejected  this request will fail again on this model (400, 404, 413, 422,
    │   │                    moderation): the row goes to its fallbacks, then fails
    │   └── FatalApiError    the account cannot go on (401, 402, key or budget 403, a free-model
    │                        daily cap): the run stops dispatching and exits 3
    ├── RunHalted            the run stopped early for a reason the user must act on (exit 3)
    ├── FreeModelCapReached  `:free` models are out for the day: their rows wait for tomorrow
    ├── MediaProblem         a row's image, file or audio cannot be sent (missing, wrong type, too
    │                        large, changed): that row fails with nothing sent; the run goes on
    └── OutputError          the output file could not be written (the checkpoint keeps every answer)

aiohttp's exceptions never leave client.py: they are mapped there, once. A failed row is
data (`status: failed` with an `error` text), not an exception; only a FatalApiError or an
interrupt stops a run.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from batchrunner.costs import Usage

# The command line's exit codes, the one rule of outcomes (the Python API's RunResult.exit_code says the same):
# 0 every row answered; 1 finished, some rows failed; 2 the job cannot start (nothing was sent); 3 stopped early
# for a reason to act on or wait out, and rerunning continues.
EXIT_OK, EXIT_SOME_FAILED, EXIT_INVALID, EXIT_STOPPED = 0, 1, 2, 3


class BatchrunnerError(Exception):
    """Base of every error batchrunner raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec or its input: where, what, and how to fix it."""

    where: str  # e.g. "jobs/triage.yaml:7: models[0]" or "input"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class SpecError(BatchrunnerError):
    """The spec, its input or the command's arguments are invalid; nothing was sent."""

    def __init__(self, problems: list[Problem] | Problem | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass
class ApiError(BatchrunnerError):
    """An unusable answer from the API, already classified by the client."""

    message: str
    status: int | None = None  # HTTP status; None for connection errors and timeouts
    code: str | None = None  # a short stable tag, e.g. "rate_limited", "moderation", "empty_answer"
    retry_after_s: float | None = None  # what the server asked us to wait, if it said
    usage: Usage | None = None  # tokens (and cost) of a failed attempt that was answered, and so may be billed
    metadata: dict[str, object] = field(default_factory=dict)
    # The request went out and its reply was not read to its end (a timeout, a cap, a cancelled stream, a
    # connection we closed): the server may have billed it, so the attempt is charged at its estimate.
    abandoned: bool = False

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        prefix = f"HTTP {self.status}: " if self.status and not self.message.startswith(f"HTTP {self.status}") else ""
        return f"{prefix}{self.message}"


class TransientError(ApiError):
    """Worth another attempt on the same model after a backoff."""


class RateLimited(TransientError):
    """Told to slow down (429, or OpenRouter's in-flight budget 402)."""


class RequestRejected(ApiError):
    """This model will refuse this request again; try the row's fallbacks."""


class FatalApiError(ApiError):
    """The account cannot continue (key, credits, budget, daily cap); stop the run."""


def first_line(exc: BaseException) -> str:
    """An exception's message for one line of output: its first line, or its type when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class RunHalted(BatchrunnerError):
    """The run stopped before finishing; rerunning continues it (exit 3)."""


class OutputError(BatchrunnerError):
    """The output file could not be written; `batchrunner export` retries from the checkpoint."""


class MediaProblem(BatchrunnerError):
    """A row's media cannot be sent: the row fails, nothing is sent or paid for it."""


class FreeModelCapReached(BatchrunnerError):
    """The daily cap on `:free` requests is used up; `resets_at` is the next UTC midnight."""

    def __init__(self, model: str, cap: int, resets_at: dt.datetime) -> None:
        self.model, self.cap, self.resets_at = model, cap, resets_at
        wait = resets_at - dt.datetime.now(dt.UTC)
        hours, minutes = divmod(max(0, int(wait.total_seconds())) // 60, 60)
        super().__init__(
            f"free-model daily cap of {cap} requests reached ({model}); it resets at {resets_at:%Y-%m-%d %H:%M} UTC (in {hours} h {minutes} min)"
        )
