"""The telemetry pipeline end to end: a real mosquitto, the real gateway process, the real ONNX model."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
import uuid
from collections import Counter

import pytest

from tests.gateway_process import GatewayProcess
from tests.servers import REPO
from tests.mqtt_helpers import Collector, publish_all

pytestmark = pytest.mark.integration

BASE_TS = 1_764_322_800_000


def reading(seq: int, value: float = 21.0, ts: int | None = None) -> bytes:
    return json.dumps({"seq": seq, "ts": ts or BASE_TS + seq * 1000, "temperature": value,
                       "humidity": 40.0 + seq % 3}).encode()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def gateway(mosquitto, tmp_path):
    gw = GatewayProcess(tmp_path / "gw", mosquitto.address, "--influx-api", "none", client_id=uid("gw"))
    yield gw
    gw.kill()


def test_every_event_reaches_every_follower_with_its_envelope(mosquitto, gateway):
    devices = [uid("dev") for _ in range(3)]
    for follower in ("alice", "bob"):
        for device in devices:
            assert gateway.run_cli("follow", follower, f"devices/{device}").returncode == 0
    gateway.start()
    alice = Collector(mosquitto.address, "feeds/alice/#")
    bob = Collector(mosquitto.address, f"feeds/bob/devices/{devices[0]}/#")
    n = 200
    publish_all(mosquitto.address, [(f"devices/{d}/telemetry", reading(s)) for s in range(n) for d in devices])

    assert alice.wait_count(n * 3), f"alice got {len(alice.messages)} of {n * 3}"
    assert bob.wait_count(n)
    got = Counter((m["source"], m["payload"]["seq"]) for m in alice.json())
    assert got == Counter({(f"devices/{d}", s): 1 for d in devices for s in range(n)})
    topic, payload, _ = alice.messages[0]
    envelope = json.loads(payload)
    assert topic == f"{envelope['source'].replace('devices/', 'feeds/alice/devices/')}/telemetry"
    assert envelope["kind"] == "telemetry"
    assert envelope["ts"] == envelope["payload"]["ts"]
    assert len(envelope["id"]) == 28 and envelope["offset"] > 0
    verdict = envelope["verdicts"][0]
    assert verdict["model"] == "sensor-anomaly" and verdict["version"]
    assert 0.0 <= verdict["score"] <= 1.0
    ids = [m["id"] for m in alice.json()]
    assert len(set(ids)) == len(ids)
    status = gateway.wait_status(lambda s: s["metrics"]["committed"] >= n * 3)
    assert status["metrics"]["appended"] == n * 3
    alice.close()
    bob.close()


def test_the_gateway_announces_itself_with_a_retained_status_and_a_last_will(mosquitto, gateway):
    gateway.start()
    watcher = Collector(mosquitto.address, "gateway/status")
    assert watcher.wait_for(lambda m: m and m[-1][1] == b"online")
    gateway.kill()  # no DISCONNECT: the broker publishes the will
    assert watcher.wait_for(lambda m: m[-1][1] == b"offline", timeout=40)
    late = Collector(mosquitto.address, "gateway/status")
    assert late.wait_for(lambda m: m and m[-1][1] == b"offline" and m[-1][2])  # retained
    watcher.close()
    late.close()


def test_a_message_is_acknowledged_only_after_it_is_in_the_log(mosquitto, gateway):
    """Hold the log's write lock so appends cannot finish, kill -9 the gateway while it holds received messages,
    and start it again: the broker redelivers them because no PUBACK was sent, and nothing is lost."""
    device = uid("dev")
    gateway.run_cli("follow", "carol", f"devices/{device}")
    gateway.start()
    feed = Collector(mosquitto.address, "feeds/carol/#")
    locker = sqlite3.connect(gateway.data_dir / "log.db", isolation_level=None, timeout=5)
    locker.execute("BEGIN IMMEDIATE")
    publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(50)])
    gateway.wait_status(lambda s: s["metrics"]["received"] >= 50)
    assert gateway.metric("appended") == 0
    gateway.kill()
    locker.execute("ROLLBACK")
    locker.close()
    assert feed.messages == []

    gateway.start()
    assert feed.wait_count(50), f"got {len(feed.messages)} of 50 after restart"
    assert sorted(m["payload"]["seq"] for m in feed.json()) == list(range(50))
    feed.close()


def test_after_sigterm_and_after_kill_the_gateway_resumes_where_it_stopped(mosquitto, gateway):
    device = uid("dev")
    gateway.run_cli("follow", "dora", f"devices/{device}")
    feed = Collector(mosquitto.address, "feeds/dora/#")
    gateway.start()
    publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(100)])
    assert gateway.terminate() == 0
    # Published while the gateway is down: the broker queues them for its persistent session.
    publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(100, 200)])
    gateway.start()
    publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(200, 300)])
    gateway.kill()
    publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(300, 400)])
    gateway.start()
    assert feed.wait_for(lambda m: {json.loads(p)["payload"]["seq"] for _, p, _ in m} == set(range(400)))
    seqs = Counter(m["payload"]["seq"] for m in feed.json())
    # At least once: a kill -9 may repeat the batch in flight, never more than that.
    assert sum(seqs.values()) - 400 <= 1000
    log = sqlite3.connect(gateway.data_dir / "log.db")
    assert log.execute("SELECT COUNT(*) FROM events WHERE source = ?", (f"devices/{device}",)).fetchone()[0] == 400
    feed.close()


def test_bad_telemetry_is_dead_lettered_with_a_reason_while_good_events_flow(mosquitto, gateway):
    device = uid("dev")
    gateway.run_cli("follow", "erin", f"devices/{device}")
    gateway.start()
    feed = Collector(mosquitto.address, "feeds/erin/#")
    dead = Collector(mosquitto.address, "gateway/deadletter")
    topic = f"devices/{device}/telemetry"
    bad = [
        (topic, b"{not json"),
        (topic, b'{"temperature": "warm"}'),
        (topic, b'{"temperature": NaN}'),
        (topic, b'{"temperature": 1' + b"0" * 20_000 + b"}"),
        (topic, b"\xff\xfe\x00garbage"),
        (topic, b"[]"),
        ("devices/dev!x/telemetry", reading(1)),
        ("devices/" + "d" * 65 + "/telemetry", reading(1)),
    ]
    good = [(topic, reading(s)) for s in range(20)]
    publish_all(mosquitto.address, good[:10] + bad + good[10:])

    assert feed.wait_count(20)
    assert sorted(m["payload"]["seq"] for m in feed.json()) == list(range(20))
    assert dead.wait_count(len(bad))
    reasons = Counter(m["reason"] for m in dead.json())
    assert reasons == Counter({"malformed_json": 1, "wrong_type": 1, "non_finite": 1, "oversize": 1,
                               "invalid_utf8": 1, "not_an_object": 1, "bad_device_id": 2})
    assert all(m["message"] and m["origin"] for m in dead.json())
    status = gateway.wait_status(lambda s: s["metrics"]["deadlettered"] >= len(bad))
    assert status["deadletter_reasons"]["malformed_json"] == 1
    feed.close()
    dead.close()


def test_followers_can_follow_and_unfollow_live_over_mqtt(mosquitto, gateway):
    device = uid("dev")
    gateway.start()
    feed = Collector(mosquitto.address, "feeds/frank/#")
    publish_all(mosquitto.address, [("users/frank/follows", json.dumps({"follow": f"devices/{device}"}).encode())])
    publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(5)])
    assert feed.wait_count(5)
    publish_all(mosquitto.address, [("users/frank/follows", json.dumps({"unfollow": f"devices/{device}"}).encode())])
    publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(5, 10)])
    gateway.wait_status(lambda s: s["metrics"]["committed"] >= 10)
    assert sorted(m["payload"]["seq"] for m in feed.json()) == list(range(5))
    assert gateway.run_cli("following", "frank").stdout == ""
    feed.close()


def test_a_follow_added_with_the_cli_reaches_a_running_gateway(mosquitto, gateway):
    device = uid("dev")
    gateway.start()
    feed = Collector(mosquitto.address, "feeds/gina/#")
    assert "gina follows" in gateway.run_cli("follow", "gina", f"devices/{device}").stdout
    gateway.wait_status(lambda s: s["metrics"]["graph_edges"] >= 1)
    publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(3)])
    assert feed.wait_count(3)
    feed.close()


def test_an_anomaly_is_flagged_delivered_and_alerted_once_as_an_episode(mosquitto, gateway):
    device = uid("dev")
    gateway.run_cli("follow", "hank", f"devices/{device}")
    gateway.start()
    feed = Collector(mosquitto.address, "feeds/hank/#")
    alerts = Collector(mosquitto.address, f"alerts/{device}")
    # A steady, slightly noisy signal, one reading far outside its own history, then the same signal again for
    # longer than the model's quiet spell that ends an episode.
    rng = random.Random(0)  # the detector is deterministic: this series is calm apart from the one reading
    noisy = [round(20.0 + rng.gauss(0, 0.1), 2) for _ in range(160)]
    values = noisy[:60] + [95.0] + noisy[61:]
    quiet = gateway_model_quiet()
    publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s, v)) for s, v in enumerate(values)])
    assert feed.wait_count(len(values))
    assert alerts.wait_count(2)
    spike = next(m for m in feed.json() if m["payload"]["seq"] == 60)
    assert spike["verdicts"][0]["flagged"] is True
    calm = [m for m in feed.json() if 20 <= m["payload"]["seq"] < 160 and m["payload"]["seq"] != 60]
    assert not any(m["verdicts"][0]["flagged"] for m in calm)
    start, end = alerts.json()
    assert (start["payload"]["seq"], start["verdicts"][0]["detail"]["episode"]) == (60, "start")
    assert (end["payload"]["seq"], end["verdicts"][0]["detail"]["episode"]) == (60 + quiet, "end")
    # Deliveries and alerts are counted in the same pass: once every delivery is counted, so is every alert.
    status = gateway.wait_status(lambda st: st["metrics"]["delivered"] >= len(values))
    assert status["metrics"]["alerts"] == 2, "one alert per episode start and end, not per reading"
    feed.close()
    alerts.close()


def test_after_a_restart_the_detector_knows_each_series_from_the_log(mosquitto, gateway):
    device = uid("dev")
    gateway.run_cli("follow", "ivy", f"devices/{device}")
    feed = Collector(mosquitto.address, "feeds/ivy/#")
    gateway.start()
    rng = random.Random(1)
    values = [round(20.0 + rng.gauss(0, 0.1), 2) for _ in range(61)]
    publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s, v)) for s, v in enumerate(values[:60])])
    assert feed.wait_count(60)
    assert gateway.terminate() == 0
    gateway.start()
    publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(60, values[60]))])
    assert feed.wait_for(lambda m: any(json.loads(p)["payload"]["seq"] == 60 for _, p, _ in m))
    first = next(m for m in feed.json() if m["payload"]["seq"] == 60)
    assert first["verdicts"][0]["label"] == "normal", "learned from the log at start, not warming up again"
    feed.close()


def gateway_model_quiet() -> int:
    """The episode rule recorded in the committed model (the gateway runs it with the default config)."""
    import onnxruntime as ort

    model = REPO / "models" / "anomaly" / "anomaly.onnx"
    meta = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    return int(meta["episode_quiet"])


def test_the_gateway_also_speaks_mqtt_3_1_1(mosquitto, tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text('[mqtt]\nprotocol = "3.1.1"\n')
    gw = GatewayProcess(tmp_path / "gw311", mosquitto.address, "--influx-api", "none", client_id=uid("gw311"),
                        config=config)
    device = uid("dev")
    gw.run_cli("follow", "ivan", f"devices/{device}")
    try:
        gw.start()
        feed = Collector(mosquitto.address, "feeds/ivan/#")
        publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(10)])
        assert feed.wait_count(10)
        feed.close()
        # mosquitto logs each connection's protocol: p2 is MQTT 3.1.1, p5 is MQTT 5.
        connects = [line for line in mosquitto.log_path.read_text().splitlines() if gw.client_id in line
                    and "New client connected" in line]
        assert connects and all("(p2," in line for line in connects), connects
    finally:
        gw.kill()


def test_sigterm_under_load_shuts_down_in_order_and_loses_nothing(mosquitto, gateway):
    device = uid("dev")
    gateway.run_cli("follow", "judy", f"devices/{device}")
    feed = Collector(mosquitto.address, "feeds/judy/#")
    gateway.start()
    publisher = threading.Thread(target=publish_all, args=(
        mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(3000)]))
    publisher.start()
    gateway.wait_status(lambda s: s["metrics"]["received"] >= 300)
    t0 = time.monotonic()
    assert gateway.terminate(timeout=30) == 0
    assert time.monotonic() - t0 < 16  # the shutdown deadline is 20 s; cancelling starts at 16 s
    assert "deadline passed" not in gateway.output()
    publisher.join()
    status = gateway.status()
    assert status is not None and status["metrics"]["committed"] == status["metrics"]["appended"]
    gateway.start()
    assert feed.wait_for(lambda m: {json.loads(p)["payload"]["seq"] for _, p, _ in m} == set(range(3000)),
                         timeout=60)
    feed.close()


def test_the_health_endpoint_answers_on_loopback_and_reports_a_lost_broker(private_mosquitto, tmp_path):
    import urllib.error
    import urllib.request

    gw = GatewayProcess(tmp_path / "gwh", private_mosquitto.address, "--influx-api", "none", client_id=uid("gwh"))
    try:
        status = gw.start().wait_status(lambda s: s.get("health_endpoint"))
        url = f"http://{status['health_endpoint']}"
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":8787")  # --health 127.0.0.1:0 was used
        with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
            assert resp.status == 200 and resp.read() == b"ok\n"
        with urllib.request.urlopen(f"{url}/status", timeout=5) as resp:
            assert json.loads(resp.read())["mqtt_connected"] is True
        private_mosquitto.kill()
        gw.wait_status(lambda s: not s["mqtt_connected"])
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/health", timeout=5)
        assert err.value.code == 503 and b"not connected" in err.value.read()
    finally:
        gw.kill()


def test_a_queued_backlog_is_drained_with_at_most_max_inflight_messages_waiting_in_memory(mosquitto, tmp_path):
    """mosquitto overruns the receive maximum once acknowledgements flow (docs/ARCHITECTURE.md); the gateway stops
    reading its socket while the log has `max_inflight` records waiting, so what waits in memory stays near the
    limit anyway."""
    config = tmp_path / "gateway.toml"
    config.write_text("[mqtt]\nmax_inflight = 100\n")
    gw = GatewayProcess(tmp_path / "gw", mosquitto.address, "--influx-api", "none", client_id=uid("gw"),
                        config=config)
    try:
        gw.start()  # the persistent session and its subscription; the backlog queues while the gateway is away
        assert gw.terminate() == 0
        device = uid("dev")
        backlog = 8000
        publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(backlog)],
                    timeout=120)
        gw.start()
        status = gw.wait_status(lambda s: s["metrics"]["appended"] >= backlog, timeout=120)
        # One read of the socket (64 KiB, about 800 of these messages) may cross the limit; nothing after it.
        assert status["metrics"]["log_pending_peak"] <= 100 + 1000
        assert status["metrics"]["appended"] == backlog
    finally:
        gw.kill()


def test_on_a_broker_with_stock_settings_a_burst_is_delivered_whole_in_order_within_each_window(tmp_path):
    """mosquitto's defaults: 20 QoS 1 messages in flight per client (its Receive Maximum for us), Nagle's algorithm
    on. The gateway keeps to the window of each of its connections (exceeding it gets an MQTT 5 client
    disconnected), spreads the feeds over `mqtt.publish_connections` of them with every feed on one, and never
    waits on the broker's delayed TCP ACKs with something to send: a burst of 10 followers' deliveries goes through
    whole, each feed in order. (How fast is the benchmark's question: benchmarks/RESULTS.md.)"""
    from tests import servers

    broker = servers.stock_mosquitto(tmp_path)
    broker.start()
    client_id = uid("gw")
    gw = GatewayProcess(tmp_path / "gw", broker.address, "--influx-api", "none", client_id=client_id)
    try:
        device, fans = uid("dev"), [uid("fan") for _ in range(10)]
        for fan in fans:
            gw.run_cli("follow", fan, f"devices/{device}")
        gw.start()
        feeds = Collector(broker.address, "feeds/#")
        n = 1000
        publish_all(broker.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(n)])
        assert feeds.wait_count(10 * n, timeout=60), f"{len(feeds.messages)} of {10 * n}"
        got = Counter((t.split("/")[1], json.loads(p)["payload"]["seq"]) for t, p, _ in feeds.messages)
        assert got == Counter({(fan, s): 1 for fan in fans for s in range(n)})
        for fan in fans:
            seqs = [json.loads(p)["payload"]["seq"] for t, p, _ in feeds.messages if t.split("/")[1] == fan]
            assert seqs == list(range(n)), f"feed of {fan} out of order"
        status = gw.wait_status(lambda s: s["metrics"]["committed"] >= n)
        assert status["metrics"]["mqtt_disconnects"] == 0
        output = gw.output()
        for name in (client_id, *(f"{client_id}-out{i}" for i in (1, 2, 3))):  # the default: 4 connections
            assert f"as {name} (MQTT 5, session present: " in output and "broker window 20" in output
        feeds.close()
    finally:
        gw.kill()
        broker.kill()
