"""The self-metrics in the Prometheus text format, and `/metrics` on the health listener."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.ops.health import MAX_REQUEST_BYTES, HealthServer
from gateway.ops.metrics import COUNTERS, CUMULATIVE_GAUGES, Metrics
from gateway.ops.prometheus import Exposition


def families(body: bytes) -> dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]]:
    """name -> (type, [(sample name, labels, value)]), as a scraper parses the text."""
    return {f.name: (f.type, [(s.name, s.labels, s.value) for s in f.samples])
            for f in text_string_to_metric_families(body.decode())}


def value(fams: dict, name: str, **labels: str) -> float:
    for sample, sample_labels, v in fams[name][1]:
        if sample_labels == labels and not sample.endswith(("_bucket", "_count", "_sum", "_created")):
            return v
    raise KeyError((name, labels))


def loaded_metrics() -> Metrics:
    m = Metrics()
    m.inc("received", 12)
    m.inc("appended", 10)
    m.inc("delivered", 30)
    m.gauge("log_lag", lambda: 4)
    m.gauge("written", lambda: 9)  # cumulative: a counter for Prometheus
    m.gauge("log_budget_used", lambda: 0.25)
    m.deadletter_reasons["malformed_json"] += 2
    m.deadletter_reasons["rate_limited"] += 1
    for ms in (0.5, 3.0, 40.0, 20_000.0):
        m.observe_latency(ms)
    return m


def test_counters_are_counters_gauges_are_gauges_with_the_gateway_prefix():
    fams = families(Exposition(loaded_metrics(), "gw-1").render())
    for name in COUNTERS:
        assert fams[f"edge_gateway_{name}"][0] == "counter", name
    assert value(fams, "edge_gateway_received") == 12
    assert value(fams, "edge_gateway_appended") == 10
    assert value(fams, "edge_gateway_delivered") == 30
    assert fams["edge_gateway_written"][0] == "counter" and "written" in CUMULATIVE_GAUGES
    assert value(fams, "edge_gateway_written") == 9
    assert fams["edge_gateway_log_lag"][0] == "gauge" and value(fams, "edge_gateway_log_lag") == 4
    assert value(fams, "edge_gateway_log_budget_used") == 0.25
    assert fams["edge_gateway_cpu_seconds"][0] == "counter" and value(fams, "edge_gateway_cpu_seconds") > 0
    assert fams["edge_gateway_rss_bytes"][0] == "gauge" and value(fams, "edge_gateway_rss_bytes") > 1e6
    assert value(fams, "edge_gateway_info", gateway="gw-1") == 1
    # Gauges this gateway did not register (no serial ports) are left out rather than shown as 0.
    assert "edge_gateway_serial_connected" not in fams


def test_the_text_names_counters_with_total():
    text = Exposition(loaded_metrics()).render().decode()
    assert "# TYPE edge_gateway_received_total counter" in text
    assert "\nedge_gateway_received_total 12.0\n" in text
    assert "\nedge_gateway_log_lag 4.0\n" in text


def test_dead_letters_by_reason_are_one_labelled_counter():
    fams = families(Exposition(loaded_metrics()).render())
    assert fams["edge_gateway_deadletters"][0] == "counter"
    assert value(fams, "edge_gateway_deadletters", reason="malformed_json") == 2
    assert value(fams, "edge_gateway_deadletters", reason="rate_limited") == 1


def test_latency_histogram_is_cumulative_and_survives_the_influx_snapshot():
    m = loaded_metrics()
    m.snapshot()  # the InfluxDB point consumes its window; the histogram is not a window
    fams = families(Exposition(m).render())
    kind, samples = fams["edge_gateway_delivery_latency_seconds"]
    assert kind == "histogram"
    buckets = {s[1]["le"]: s[2] for s in samples if s[0].endswith("_bucket")}
    assert buckets["0.001"] == 1 and buckets["0.005"] == 2 and buckets["0.05"] == 3 and buckets["10.0"] == 3
    assert buckets["+Inf"] == 4
    count = next(s[2] for s in samples if s[0].endswith("_count"))
    total = next(s[2] for s in samples if s[0].endswith("_sum"))
    assert count == 4 and total == pytest.approx((0.5 + 3 + 40 + 20_000) / 1000)


def test_a_broken_gauge_does_not_break_the_scrape():
    m = Metrics()
    m.gauge("log_lag", lambda: 1 / 0)
    assert value(families(Exposition(m).render()), "edge_gateway_log_lag") == -1


def test_an_unknown_gauge_name_is_a_programming_error():
    with pytest.raises(KeyError, match="GAUGES"):
        Metrics().gauge("no_such_gauge", lambda: 0)


async def _request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_metrics_route_on_the_health_listener_with_bounded_reading():
    async def main() -> None:
        exposition = Exposition(loaded_metrics())
        server = HealthServer("127.0.0.1:0", lambda: {"ok": True}, lambda: None,
                              metrics=(exposition.render, exposition.content_type))
        await server.start()
        try:
            # As Prometheus asks: HTTP/1.1, headers, an Accept for OpenMetrics (answered in the classic text).
            code, headers, body = await _request(server.port, (
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nUser-Agent: Prometheus/2.45\r\n"
                b"Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n"))
            assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert int(headers["Content-Length"]) == len(body)
            assert value(families(body), "edge_gateway_received") == 12
            code, _, body = await _request(server.port, b"GET /health HTTP/1.0\r\n\r\n")
            assert (code, body) == (200, b"ok\n")
            code, _, _ = await _request(server.port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
            assert code == 200
            # Headers beyond the bound are refused, one long line or many short ones.
            code, _, _ = await _request(server.port, b"GET /metrics HTTP/1.0\r\nX: " + b"a" * MAX_REQUEST_BYTES
                                        + b"\r\n\r\n")
            assert code == 431
            code, _, _ = await _request(server.port, b"GET /metrics HTTP/1.0\r\n" + b"X: y\r\n" * (MAX_REQUEST_BYTES // 6 + 1)
                                        + b"\r\n")
            assert code == 431
            code, _, _ = await _request(server.port, b"POST /metrics HTTP/1.0\r\n\r\n")
            assert code == 404
        finally:
            await server.close()

        # Without a renderer there is no /metrics.
        server = HealthServer("127.0.0.1:0", lambda: {}, lambda: None)
        await server.start()
        try:
            code, _, _ = await _request(server.port, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert code == 404
        finally:
            await server.close()

    asyncio.run(main())
