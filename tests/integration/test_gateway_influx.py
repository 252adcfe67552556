"""Telemetry reaches InfluxDB from the real gateway: v1 into InfluxDB 1.x, v2 (influxdb-client) into
victoria-metrics, and across a database outage (the readings wait in the log)."""

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


def test_readings_wait_in_the_log_while_the_database_is_down_and_are_written_once_it_is_back(
        mosquitto, private_influxdb, run_gateway):
    db, device = uid("db"), uid("dev")
    private_influxdb.stop()
    gw = run_gateway("--influx-api", "v1", "--influx-url", private_influxdb.url, "--influx-db", db)
    n = 300
    publish_all(mosquitto.address, readings(device, n))
    # Followers get everything meanwhile; the InfluxDB consumer is behind by every reading.
    status = gw.wait_status(lambda s: s["metrics"]["committed"] >= n and s["metrics"]["influx_lag"] >= n)
    assert status["metrics"]["written"] == 0
    assert status["metrics"]["retried"] >= 1

    private_influxdb.start()
    gw.wait_status(lambda s: s["metrics"]["written"] >= n, timeout=90)
    rows = wait_until(lambda: (r := servers.influx_rows(private_influxdb, db, "telemetry", f"device = '{device}'"))
                      and len(r) >= n and r, what="drained points")
    assert sorted(r["seq"] for r in rows) == list(range(n))


def test_readings_not_yet_written_survive_a_gateway_crash_during_an_outage(mosquitto, private_influxdb, run_gateway):
    db, device = uid("db"), uid("dev")
    private_influxdb.stop()
    gw = run_gateway("--influx-api", "v1", "--influx-url", private_influxdb.url, "--influx-db", db)
    n = 100
    publish_all(mosquitto.address, readings(device, n))
    gw.wait_status(lambda s: s["metrics"]["influx_lag"] >= n and s["metrics"]["committed"] >= n)
    gw.kill()
    private_influxdb.start()
    gw.start()
    rows = wait_until(lambda: (r := servers.influx_rows(private_influxdb, db, "telemetry", f"device = '{device}'"))
                      and len(r) >= n and r, timeout=60, what="points after restart")
    assert sorted(r["seq"] for r in rows) == list(range(n))  # once each: re-written points are identical


def test_a_data_folder_of_the_earlier_version_is_upgraded_without_losing_a_point_or_a_count(
        mosquitto, influxdb, tmp_path):
    """The previous layout: events and verdicts in log.db, points still waiting in outbox.db, a post whose like the
    old pipeline had not applied yet. After the first start every reading is in InfluxDB once, the outbox's points
    are written and the file set aside, the like is counted, and the gateway goes on from the old offsets."""
    import sqlite3

    from tests.unit.test_log_store import write_v1_log

    db, data = uid("up"), tmp_path / "gw"
    data.mkdir()
    write_v1_log(data / "log.db")  # events 3..12 of devices/d-1 in the log, 8 processed
    post_id, liker = "0" * 27 + "f", "fan"
    log = sqlite3.connect(data / "log.db", isolation_level=None)
    log.execute("INSERT INTO events (id, source, kind, ts_ms, dedup, payload, logged_ms) VALUES (?,?,?,?,?,?,?)",
                (post_id, "users/author", "post", BASE_TS, "n:1", '{"text":"hello"}', 0))
    log.execute("INSERT INTO events (id, source, kind, ts_ms, dedup, payload, logged_ms) VALUES (?,?,?,?,?,?,?)",
                ("0" * 27 + "e", f"users/{liker}", "interaction", BASE_TS, None,
                 json.dumps({"type": "like", "event_id": post_id}), 0))
    log.execute("CREATE TABLE posts (event_id TEXT PRIMARY KEY, author TEXT NOT NULL, sponsor TEXT, reply_to TEXT,"
                " blocked INTEGER NOT NULL, envelope BLOB NOT NULL)")
    log.execute("INSERT INTO posts VALUES (?, 'author', NULL, NULL, 0, x'7b7d')", (post_id,))  # applied: 13
    log.execute("UPDATE engagement_progress SET offset = 13")
    log.close()
    outbox = sqlite3.connect(data / "outbox.db", isolation_level=None)
    outbox.execute("CREATE TABLE batches (id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL,"
                   " points INTEGER NOT NULL, bytes INTEGER NOT NULL, created_ns INTEGER NOT NULL)")
    body = f"telemetry,anomaly=false,device=trimmed-dev temperature=1.5,seq=1i {BASE_TS * 1_000_000}\n".encode()
    outbox.execute("INSERT INTO batches (body, points, bytes, created_ns) VALUES (?, 1, ?, 0)", (body, len(body)))
    outbox.close()

    gw = GatewayProcess(data, mosquitto.address, "--influx-api", "v1", "--influx-url", influxdb.url,
                        "--influx-db", db, client_id=uid("up-gw"))
    try:
        gw.start()
        old = wait_until(lambda: (r := servers.influx_rows(influxdb, db, "telemetry", "device = 'd-1'"))
                         and len(r) >= 10 and r, what="the retained readings in InfluxDB")
        assert sorted(r["seq"] for r in old) == list(range(3, 13))
        assert wait_until(lambda: servers.influx_rows(influxdb, db, "telemetry", "device = 'trimmed-dev'"),
                          what="the old outbox's point")
        wait_until(lambda: (data / "outbox.db.written").exists(), what="the old outbox set aside")
        assert not (data / "outbox.db").exists()
        publish_all(mosquitto.address, [("devices/d-1/telemetry", json.dumps(
            {"seq": 99, "ts": BASE_TS + 99, "temperature": 1.0}).encode())])
        status = gw.wait_status(lambda s: s["log_offset"] == 15 and s["consumers"]["influx"]["done"] == 15)
        assert status["consumers"]["feeds"]["committed"] >= 8
    finally:
        gw.terminate()
    counts = sqlite3.connect(data / "log.db").execute("SELECT likes FROM counts WHERE event_id = ?",
                                                      (post_id,)).fetchall()
    assert counts == [(1,)], "the like logged before the upgrade and not yet applied is counted, once"
