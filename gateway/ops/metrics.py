"""The gateway's self-metrics: counters and gauges with stable names.

Names are part of the interface (dashboards and alerts are built on them), so they are listed here once and an
unknown name is a programming error, not a new series. Counters only go up; gauges are sampled when a snapshot is
taken. Incrementing is a dict update on the event loop thread: cheap enough for the hot path, and batch-sized
increments (`inc(name, n)`) keep it to one call per batch where a batch exists.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable

COUNTERS = (
    "received",            # messages taken from sources (MQTT, serial), good or bad
    "appended",            # events durably logged
    "log_commits",         # transactions of the log (appends and progress): appended / log_commits = batch size
    "duplicates",          # retransmissions recognised and not logged twice
    "deadlettered",        # bad input rejected with a reason (stored in the log)
    "deadletters_published",
    "deadletters_suppressed",  # over the publish rate limit (still logged and counted)
    "rate_limited",        # events over limits.per_source_rate (dead-lettered with reason rate_limited)
    "filtered",            # events scored by a model
    "filter_errors",       # batches a model failed on (logged without verdicts)
    "anomalies",           # readings the anomaly model flagged
    "delivered",           # publishes to followers' feeds (acknowledged when their batch is committed)
    "alerts",              # publishes to alerts/{device}
    "quarantined",         # posts blocked by the content policy
    "interactions_ignored",  # likes/reposts of unknown or blocked events
    "stats_published",     # events/{id}/stats updates (coalesced)
    "follows",
    "unfollows",
    "storage_errors",
    "backpressure_waits",
    "consumer_fell_behind",  # a consumer's output fell behind and it read back from the log
    "serial_connects",     # serial ports opened (first open and every reopen after an unplug)
    "serial_disconnects",  # serial ports that went away (EOF, EIO, HUP)
    "serial_frames",       # frames with a valid CRC read from serial ports
    "serial_crc_errors",   # frames that failed their CRC
    "serial_resyncs",      # bytes discarded up to the next delimiter (every frame that did not decode)
    "serial_oversize",     # runs of bytes longer than a frame without a delimiter
    "serial_nacks",        # NACKs sent (damaged frame still naming its seq, or HELLO required)
)


class Metrics:
    def __init__(self) -> None:
        self._counts: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self._gauges: dict[str, Callable[[], float]] = {}
        self.deadletter_reasons: Counter[str] = Counter()
        self.latency_ms: list[float] = []  # recent batch latencies, trimmed on snapshot
        self.started = time.monotonic()

    def inc(self, name: str, n: int = 1) -> None:
        if name not in self._counts:
            raise KeyError(f"unknown metric {name!r}; add it to gateway.ops.metrics.COUNTERS")
        self._counts[name] += n

    def get(self, name: str) -> int:
        return self._counts[name]

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self._gauges[name] = read

    def observe_latency(self, ms: float) -> None:
        if len(self.latency_ms) < 10_000:
            self.latency_ms.append(ms)

    def snapshot_counts(self) -> dict[str, float]:
        """Counters and gauges, without consuming the latency window (for status pages)."""
        out: dict[str, float] = {name: float(v) for name, v in self._counts.items()}
        for name, read in self._gauges.items():
            try:
                out[name] = float(read())
            except Exception:  # a broken gauge must not take the metrics down with it
                out[name] = -1.0
        return out

    def snapshot(self) -> dict[str, float]:
        out = self.snapshot_counts()
        lat = sorted(self.latency_ms)
        self.latency_ms = []
        if lat:
            out["latency_p50_ms"] = lat[len(lat) // 2]
            out["latency_p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        out["uptime_s"] = time.monotonic() - self.started
        return out
