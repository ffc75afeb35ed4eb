"""When to try again: exponential backoff with full jitter, capped, and the server's own hint.

Pure apart from the random draw, which tests can seed. `RetryPolicy.immediate()` makes
every wait zero, so tests exercise retries without sleeping.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5  # per model, the first attempt included
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    max_server_wait_s: float = 300.0  # a Retry-After longer than this is capped to it
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    @classmethod
    def immediate(cls, max_attempts: int = 5) -> RetryPolicy:
        """No waiting at all: for tests and the sandbox."""
        return cls(max_attempts=max_attempts, base_delay_s=0.0, max_delay_s=0.0, max_server_wait_s=0.0)

    def delay_s(self, attempt: int, server_hint_s: float | None = None) -> float:
        """The wait before attempt `attempt + 1`, after `attempt` failures (1-based).

        The server's Retry-After wins when it gave one: it knows when capacity returns.
        Otherwise full jitter (uniform over [0, base·2^(n-1)]), which spreads a crowd of
        retrying workers instead of sending them back in lockstep.
        """
        if server_hint_s is not None:
            return min(max(server_hint_s, 0.0), self.max_server_wait_s)
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return self.rng.uniform(0.0, ceiling) if ceiling > 0 else 0.0
