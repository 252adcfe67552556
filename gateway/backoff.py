"""The one retry delay of the gateway: capped exponential backoff with jitter, used by every loop that retries
(the broker connection, serial ports, the log's storage, the InfluxDB writer).

A delay is drawn between half the ceiling and the ceiling, where the ceiling doubles per consecutive failure from
`base` up to `cap`: never a retry at once, and gateways that lost the same server at the same moment spread apart
(AWS Architecture Blog, "Exponential Backoff And Jitter", 2015, calls this "equal jitter"). A server's own wish
(Retry-After) is a floor, never shortened.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    base: float
    cap: float
    failures: int = 0

    def next_delay(self, at_least: float | None = None) -> float:
        """Count a failure and return how long to wait before the next attempt."""
        self.failures += 1
        ceiling = min(self.cap, self.base * 2 ** min(self.failures - 1, 30))
        delay = random.uniform(ceiling / 2, ceiling)
        return max(delay, at_least or 0.0)

    def reset(self) -> None:
        """A success: the next failure starts from `base` again."""
        self.failures = 0

    @property
    def failing(self) -> bool:
        return self.failures > 0
