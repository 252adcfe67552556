"""Rate limits: the gateway's one token bucket, per source (`TokenBuckets`) or alone (`TokenBucket`), refusing
(`take`) or pacing (`delay`).

Per-source limits are cheap enough for the per-message hot path.

A bucket holds up to `burst` tokens and refills at `rate` tokens per second; an event takes one token or is refused.
Per event that is one clock read, one dict lookup and a few float operations on a two-item list kept per key (no
object made per event beyond the floats). Keys idle long enough to have refilled are swept when the table grows,
so memory follows the number of recently active sources, not every source ever seen.
"""

from __future__ import annotations

import time
from typing import Callable


class TokenBuckets:
    __slots__ = ("rate", "burst", "_buckets", "_clock", "_sweep_at", "_min_keys")

    def __init__(self, rate: float, burst: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        if not rate > 0:
            raise ValueError("rate must be greater than 0")
        self.rate = float(rate)
        self.burst = float(burst) if burst > 0 else max(1.0, 2.0 * self.rate)
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, last refill time]
        self._clock = clock
        self._min_keys = max_keys
        self._sweep_at = max_keys

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str) -> bool:
        """Take one token from `key`'s bucket; False when it is empty."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep(now)
            self._buckets[key] = [self.burst - 1.0, now]
            return True
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

    def _sweep(self, now: float) -> None:
        # A bucket untouched for burst/rate seconds is full again: forgetting it changes nothing.
        full_after = self.burst / self.rate
        idle = [k for k, (_, last) in self._buckets.items() if now - last >= full_after]
        for key in idle:
            del self._buckets[key]
        # Many sources active at once: let the table grow, and sweep again only when it has doubled (amortised).
        self._sweep_at = max(self._min_keys, 2 * len(self._buckets))


class TokenBucket:
    """One bucket: `take()` is True while the rate (and its burst) allows. For limits that are not per source
    (dead letters published per second, noise dead letters per serial port)."""

    __slots__ = ("rate", "burst", "_tokens", "_at", "_clock")

    def __init__(self, rate: float, burst: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError("rate must be greater than 0")
        self.rate = float(rate)
        self.burst = float(burst) if burst > 0 else max(1.0, self.rate)
        self._tokens = self.burst
        self._clock = clock
        self._at = clock()

    def delay(self, n: float = 1.0) -> float:
        """Pacing rather than refusing: take `n` tokens now, into debt if need be, and return how many seconds the
        caller must wait before acting so that the average stays at `rate` (0: at once). For a sender that must
        not drop anything, only slow down (the upstream link's events and bytes per second)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate) - n
        self._at = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
