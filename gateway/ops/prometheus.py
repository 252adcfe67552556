"""The self-metrics in the Prometheus text format, for `GET /metrics` on the health endpoint.

A collector reads the gateway's `Metrics` when it is scraped, so nothing is counted twice and nothing on the hot
path knows about Prometheus. Every name of `gateway.ops.metrics` becomes `edge_gateway_<name>`, the same series the
InfluxDB `gateway` measurement has as fields:

    COUNTERS, and the gauges in CUMULATIVE_GAUGES   counter  edge_gateway_<name>_total
    the other GAUGES                                 gauge    edge_gateway_<name>
    deadletter_reasons                               counter  edge_gateway_deadletters_total{reason="..."}
    delivery latencies (one per feeds batch)         histogram edge_gateway_delivery_latency_seconds
    uptime                                           gauge    edge_gateway_uptime_seconds

Counters start at zero with the process, as Prometheus expects (`rate()` handles the reset at a restart).

prometheus_client is imported at the first scrape, not with the gateway: it costs 4.3 MB of resident memory, which
a gateway nobody scrapes (most of them, on a Pi) should not pay (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from gateway.ops.metrics import COUNTERS, CUMULATIVE_GAUGES, GAUGES, LATENCY_BUCKETS_MS, Metrics

if TYPE_CHECKING:
    from prometheus_client.core import Metric

PREFIX = "edge_gateway_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the format generate_latest writes


class GatewayCollector:
    """A collector as prometheus_client's registry takes one: anything with `collect()`."""

    def __init__(self, metrics: Metrics, gateway_id: str = "") -> None:
        self._metrics = metrics
        self._gateway_id = gateway_id

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        m = self._metrics
        values = m.snapshot_counts()  # reads the gauges; leaves the latency window to the InfluxDB point
        for name in COUNTERS:
            yield CounterMetricFamily(PREFIX + name, f"{name} (gateway.ops.metrics)", value=values[name])
        for name in GAUGES:
            if name not in values:
                continue  # not registered by this gateway (no InfluxDB, no serial ports)
            value = values[name]
            if name in CUMULATIVE_GAUGES:
                yield CounterMetricFamily(PREFIX + name, f"{name} (gateway.ops.metrics)", value=value)
            else:
                yield GaugeMetricFamily(PREFIX + name, f"{name} (gateway.ops.metrics)", value=value)
        reasons = CounterMetricFamily(PREFIX + "deadletters", "Dead letters by reason", labels=("reason",))
        for reason, n in sorted(m.deadletter_reasons.items()):
            reasons.add_metric((reason,), n)
        yield reasons
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*LATENCY_BUCKETS_MS, float("inf")), m.latency_buckets):
            total += n
            buckets.append((repr(bound / 1000) if bound != float("inf") else "+Inf", total))
        yield HistogramMetricFamily(
            PREFIX + "delivery_latency_seconds",
            "From the append of a feeds batch's oldest event to the broker's acknowledgement of its last publish",
            buckets=buckets, sum_value=m.latency_sum_ms / 1000)
        yield GaugeMetricFamily(PREFIX + "uptime_seconds", "Seconds since the gateway started", value=m.uptime())
        info = GaugeMetricFamily(PREFIX + "info", "The gateway's MQTT client id", labels=("gateway",))
        info.add_metric((self._gateway_id,), 1)
        yield info


class Exposition:
    """`render()` is the body of a scrape: one registry holding only the gateway's collector (no default process
    or platform collectors: CPU and memory are the gateway's own `cpu_seconds` and `rss_bytes`, the same numbers
    InfluxDB gets), made at the first scrape."""

    content_type = CONTENT_TYPE

    def __init__(self, metrics: Metrics, gateway_id: str = "") -> None:
        self._collector = GatewayCollector(metrics, gateway_id)
        self._registry: Any = None

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(self._collector)
        return generate_latest(self._registry)
