"""Telemetry reaches InfluxDB from the real gateway: v1 into InfluxDB 1.x, v2 (influxdb-client) into
victoria-metrics, and through the durable outbox across a database outage."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests import servers
from tests.gateway_process import GatewayProcess
from tests.mqtt_helpers import publish_all

pytestmark = pytest.mark.integration

BASE_TS = 1_764_322_800_000


def uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def readings(device: str, n: int, same_ts_pairs: bool = False) -> list[tuple[str, bytes]]:
    out = []
    for seq in range(n):
        ts = BASE_TS + (seq // 2 if same_ts_pairs else seq) * 1000
        out.append((f"devices/{device}/telemetry",
                    json.dumps({"seq": seq, "ts": ts, "temperature": 20.0 + seq / 100}).encode()))
    return out


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def run_gateway(mosquitto, tmp_path):
    started = []

    def start(*args: str) -> GatewayProcess:
        gw = GatewayProcess(tmp_path / f"gw{len(started)}", mosquitto.address, *args, client_id=uid("gw"))
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.kill()


def test_v1_every_reading_is_one_point_even_when_two_share_a_timestamp(mosquitto, influxdb, run_gateway):
    db, device = uid("db"), uid("dev")
    gw = run_gateway("--influx-api", "v1", "--influx-url", influxdb.url, "--influx-db", db)
    n = 100
    publish_all(mosquitto.address, readings(device, n, same_ts_pairs=True))
    gw.wait_status(lambda s: s["metrics"]["written"] >= n)

    rows = wait_until(lambda: (r := servers.influx_rows(influxdb, db, "telemetry", f"device = '{device}'"))
                      and len(r) >= n and r, what="points in InfluxDB")
    assert len(rows) == n
    assert sorted(r["seq"] for r in rows) == list(range(n))
    by_seq = {r["seq"]: r for r in rows}
    assert by_seq[7]["temperature"] == pytest.approx(20.07)
    assert by_seq[7]["anomaly"] in ("true", "false")
    assert 0.0 <= by_seq[7]["anomaly_score"] <= 1.0
    # Readings 6 and 7 carry the same ts: both survive, a nanosecond apart at most a million.
    assert by_seq[6]["time"] // 1_000_000 == by_seq[7]["time"] // 1_000_000 == BASE_TS + 3000
    assert by_seq[6]["time"] != by_seq[7]["time"]
    # The gateway's own metrics are points too.
    gw.terminate()
    metrics = servers.influx_rows(influxdb, db, "gateway")
    assert metrics and metrics[-1]["appended"] >= n and metrics[-1]["delivered"] >= 0


def test_v2_through_influxdb_client_into_victoria_metrics(mosquitto, victoria_metrics, run_gateway):
    device = uid("dev")
    gw = run_gateway("--influx-api", "v2", "--influx-url", victoria_metrics.url, "--influx-db", "bucket")
    n = 50
    publish_all(mosquitto.address, readings(device, n))
    gw.wait_status(lambda s: s["metrics"]["written"] >= n)
    samples = servers.vm_samples(victoria_metrics, f'telemetry_temperature{{device="{device}"}}', expect=n)
    assert len(samples) == n
    assert sorted(v for _, _, v in samples) == pytest.approx([20.0 + s / 100 for s in range(n)])
    assert {ts for _, ts, _ in samples} == {BASE_TS + s * 1000 for s in range(n)}


def test_points_wait_in_the_outbox_while_the_database_is_down_and_drain_once_it_is_back(
        mosquitto, private_influxdb, run_gateway):
    db, device = uid("db"), uid("dev")
    private_influxdb.stop()
    gw = run_gateway("--influx-api", "v1", "--influx-url", private_influxdb.url, "--influx-db", db)
    n = 300
    publish_all(mosquitto.address, readings(device, n))
    status = gw.wait_status(lambda s: s["metrics"]["committed"] >= n and s["metrics"]["outbox_points"] >= n)
    assert status["metrics"]["written"] == 0
    assert status["metrics"]["retried"] >= 1

    private_influxdb.start()
    gw.wait_status(lambda s: s["metrics"]["written"] >= n, timeout=90)
    rows = wait_until(lambda: (r := servers.influx_rows(private_influxdb, db, "telemetry", f"device = '{device}'"))
                      and len(r) >= n and r, what="drained points")
    assert sorted(r["seq"] for r in rows) == list(range(n))


def test_the_outbox_survives_a_gateway_crash_during_an_outage(mosquitto, private_influxdb, run_gateway):
    db, device = uid("db"), uid("dev")
    private_influxdb.stop()
    gw = run_gateway("--influx-api", "v1", "--influx-url", private_influxdb.url, "--influx-db", db)
    n = 100
    publish_all(mosquitto.address, readings(device, n))
    gw.wait_status(lambda s: s["metrics"]["outbox_points"] >= n)
    gw.kill()
    private_influxdb.start()
    gw.start()
    rows = wait_until(lambda: (r := servers.influx_rows(private_influxdb, db, "telemetry", f"device = '{device}'"))
                      and len(r) >= n and r, timeout=60, what="points after restart")
    assert sorted(r["seq"] for r in rows) == list(range(n))  # once each: re-written points are identical
