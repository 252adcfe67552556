"""The gateway's self-metrics: counters and gauges with stable names.

Names are part of the interface (dashboards, alerts and the Prometheus names `edge_gateway_<name>` are built on
them), so they are listed here once and an unknown name is a programming error, not a new series. Counters only go
up; gauges are read when a snapshot is taken (the status file every second, the InfluxDB point every
`influx.metrics_interval`, a Prometheus scrape), never on the hot path. Incrementing is a dict update on the event
loop thread: cheap enough for the hot path, and batch-sized increments (`inc(name, n)`) keep it to one call per
batch where a batch exists.
"""

from __future__ import annotations

import bisect
import os
import resource
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
    "impressions",         # deliveries of posts to followers' feeds (a repost's too)
    "alerts",              # publishes to alerts/{device}
    "quarantined",         # posts blocked by the content policy
    "marked",              # posts delivered marked sensitive by the content policy
    "interactions_ignored",  # likes/reposts of unknown or blocked events
    "stats_published",     # events/{id}/stats updates (coalesced)
    "ha_configs_published",  # Home Assistant discovery configs published (once per device and field per run)
    "ha_states_published",   # Home Assistant state messages: latest values (coalesced) and anomaly ON/OFF
    "ha_devices_removed",    # devices removed from Home Assistant after homeassistant.remove_after of silence
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
    "upstream_forwarded",  # messages (telemetry, alerts) the central broker acknowledged (upstream.enabled)
    "upstream_stats_published",  # stats updates sent upstream (coalesced, as stats_published)
)

GAUGES = (
    "mqtt_connected",      # 1 while the main broker connection is up
    "mqtt_connects",       # CONNACKs received since the start (cumulative)
    "mqtt_disconnects",    # connections lost (cumulative)
    "mqtt_connect_failures",  # connection attempts that failed (cumulative)
    "mqtt_in_flight",      # publishes awaiting the broker's acknowledgement, over every connection
    "mqtt_resent",         # publishes sent again after a reconnect (cumulative)
    "serial_connected",    # serial ports open now
    "log_pending",         # records handed to the log, not yet committed
    "log_pending_peak",    # the most ever pending at once
    "log_bytes",           # the log's pages in use
    "log_budget_used",     # log_bytes / storage.max_log_bytes: at 1 the gateway stops acknowledging
    "log_offset",          # the last offset appended
    "committed",           # events the feeds finished since the start (cumulative)
    "graph_edges",         # follow edges in the graph
    "feeds_lag",           # events appended that each consumer has not finished
    "influx_lag",
    "stats_lag",
    "homeassistant_lag",   # (with homeassistant.enabled)
    "upstream_lag",        # events appended that the upstream link has not had acknowledged (upstream.enabled)
    "upstream_stats_lag",  # the same for its stats, which trail the feeds as stats_lag does
    "upstream_lag_seconds",  # age of the oldest event the upstream link has not finished; 0 when it has all
    "upstream_connected",  # 1 while the link to the central broker is up
    "upstream_connects",   # its CONNACKs since the start (cumulative)
    "upstream_disconnects",  # its connections lost (cumulative)
    "upstream_resent",     # publishes sent again upstream after a reconnect: possible duplicates (cumulative)
    "upstream_refused",    # publishes the central broker refused (PUBACK with a failure reason; cumulative)
    "upstream_in_flight",  # publishes awaiting the central broker's PUBACK
    "upstream_paced_seconds",  # time the link waited for its rate cap (cumulative)
    "log_lag",             # the largest consumer lag: what keeps the log from being trimmed
    "written",             # points InfluxDB accepted (cumulative)
    "retried",             # InfluxDB requests retried (cumulative)
    "write_dropped",       # points InfluxDB rejected, or snapshots dropped for lack of room (cumulative)
    "influx_buffered",     # points waiting in memory for InfluxDB
    "cpu_seconds",         # CPU time of the process, user + system, every thread (cumulative)
    "rss_bytes",           # resident memory of the process
)

# Gauges read from another component's own counters: they only go up while the process runs, so a scraper should
# treat them as counters (rates, resets at a restart).
CUMULATIVE_GAUGES = frozenset({"mqtt_connects", "mqtt_disconnects", "mqtt_connect_failures", "mqtt_resent",
                               "committed", "written", "retried", "write_dropped", "cpu_seconds",
                               "upstream_connects", "upstream_disconnects", "upstream_resent", "upstream_refused",
                               "upstream_paced_seconds"})

# Upper bounds (ms) of the delivery latency histogram's buckets; the last, +Inf, is implied.
LATENCY_BUCKETS_MS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)


def process_cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) since it started; CLOCK_PROCESS_CPUTIME_ID, so
    finer than the 10 ms ticks of os.times()."""
    return time.process_time()


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_rss_bytes() -> float:
    """Resident memory now: /proc/self/statm on Linux (one small read); elsewhere the peak, which is what
    getrusage offers."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return float(int(f.read().split()[1]) * _PAGE)
    except (OSError, IndexError, ValueError):
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class Metrics:
    def __init__(self) -> None:
        self._counts: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self._gauges: dict[str, Callable[[], float]] = {}
        self.deadletter_reasons: Counter[str] = Counter()
        self.latency_ms: list[float] = []  # recent batch latencies, trimmed on snapshot
        # The same latencies, cumulative since the start, for a scraper to compute its own quantiles.
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.latency_sum_ms = 0.0
        self.started = time.monotonic()
        self.gauge("cpu_seconds", process_cpu_seconds)
        self.gauge("rss_bytes", process_rss_bytes)

    def inc(self, name: str, n: int = 1) -> None:
        if name not in self._counts:
            raise KeyError(f"unknown metric {name!r}; add it to gateway.ops.metrics.COUNTERS")
        self._counts[name] += n

    def get(self, name: str) -> int:
        return self._counts[name]

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        if name not in GAUGES:
            raise KeyError(f"unknown gauge {name!r}; add it to gateway.ops.metrics.GAUGES")
        self._gauges[name] = read

    def observe_latency(self, ms: float) -> None:
        """One delivery latency (a batch's, not an event's: called once per batch)."""
        if len(self.latency_ms) < 10_000:
            self.latency_ms.append(ms)
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        self.latency_sum_ms += ms

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
        out["uptime_s"] = self.uptime()
        return out

    def uptime(self) -> float:
        return time.monotonic() - self.started
