"""`GET /metrics` on a running gateway: real mosquitto, real events, the counters a scraper sees move."""

from __future__ import annotations

import json
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway_process import GatewayProcess
from tests.mqtt_helpers import Collector, publish_all

pytestmark = pytest.mark.integration


def scrape(gw: GatewayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, labels) -> value, parsed the way Prometheus parses the exposition."""
    status = gw.status()
    assert status is not None and status["health_endpoint"]
    with urllib.request.urlopen(f"http://{status['health_endpoint']}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_scrape_shows_the_counters_move_as_events_flow(mosquitto, tmp_path):
    device, fan = f"dev{uuid.uuid4().hex[:8]}", f"fan{uuid.uuid4().hex[:8]}"
    gw = GatewayProcess(tmp_path / "gw", mosquitto.address, "--influx-api", "none",
                        client_id=f"gw-{uuid.uuid4().hex[:6]}")
    gw.run_cli("follow", fan, f"devices/{device}")
    try:
        gw.start()
        before = scrape(gw)
        assert before[("edge_gateway_received_total", ())] == 0
        assert before[("edge_gateway_mqtt_connected", ())] == 1
        assert before[("edge_gateway_rss_bytes", ())] > 1e6
        assert before[("edge_gateway_delivery_latency_seconds_count", ())] == 0

        feed = Collector(mosquitto.address, f"feeds/{fan}/#")
        n = 40
        publish_all(mosquitto.address, [(f"devices/{device}/telemetry", json.dumps({"seq": i, "t": i}).encode())
                                        for i in range(n)]
                    + [(f"devices/{device}/telemetry", b"{not json"), (f"devices/{device}/telemetry", b"[1]")])
        assert feed.wait_count(n)
        gw.wait_status(lambda s: s["metrics"]["committed"] >= n)
        after = scrape(gw)
        feed.close()
    finally:
        gw.kill()

    assert after[("edge_gateway_received_total", ())] == n + 2
    assert after[("edge_gateway_appended_total", ())] == n
    assert after[("edge_gateway_delivered_total", ())] == n
    assert after[("edge_gateway_committed_total", ())] == n
    assert after[("edge_gateway_deadlettered_total", ())] == 2
    assert after[("edge_gateway_deadletters_total", (("reason", "malformed_json"),))] == 1
    assert after[("edge_gateway_deadletters_total", (("reason", "not_an_object"),))] == 1
    assert after[("edge_gateway_log_offset", ())] >= n
    assert after[("edge_gateway_feeds_lag", ())] == 0
    assert after[("edge_gateway_delivery_latency_seconds_count", ())] >= 1
    assert after[("edge_gateway_delivery_latency_seconds_bucket", (("le", "+Inf"),))] == \
        after[("edge_gateway_delivery_latency_seconds_count", ())]
    assert after[("edge_gateway_cpu_seconds_total", ())] > before[("edge_gateway_cpu_seconds_total", ())]
    assert 0 < after[("edge_gateway_log_budget_used", ())] < 1
