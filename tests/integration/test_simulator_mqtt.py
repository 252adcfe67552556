"""`firmware-sim mqtt` against a real mosquitto: every reading arrives, the summary tells the truth."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import paho.mqtt.client as mqtt
import pytest

from devices.telemetry import decode
from firmware_sim.signals import ANOMALY_TYPES, NORMAL
from tests import servers

pytestmark = pytest.mark.integration


def firmware_sim(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware_sim.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=servers.REPO)


@contextmanager
def telemetry_of(broker: servers.Server, prefix: str) -> Iterator[dict[str, list[dict]]]:
    """Subscribe to devices/+/telemetry before the simulator starts; collect payloads of `prefix` devices by id."""
    got: dict[str, list[dict]] = defaultdict(list)
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{prefix}observer", protocol=mqtt.MQTTv5)

    def on_message(c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        device = msg.topic.split("/")[1]
        if device.startswith(prefix):
            t = decode(msg.payload)  # the gateway's own codec must accept every payload
            got[device].append({"seq": t.seq, "ts": t.ts_ms, **t.fields})

    client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.subscribe("devices/+/telemetry", qos=1)
    assert subscribed.wait(10), "no SUBACK"
    try:
        yield got
    finally:
        client.disconnect()
        client.loop_stop()


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_every_seq_arrives_and_the_summary_and_labels_match_what_was_sent(mosquitto, tmp_path: Path):
    prefix = "simtest-all-"
    labels = tmp_path / "labels.jsonl"
    with telemetry_of(mosquitto, prefix) as got:
        run = firmware_sim("mqtt", "--broker", mosquitto.address, "--devices", "6", "--events", "600",
                           "--rate", "1000", "--seed", "7", "--anomaly-rate", "0.05", "--labels", str(labels),
                           "--device-prefix", prefix, "--no-progress")
        assert run.returncode == 0, run.stderr
        assert wait_for(lambda: sum(map(len, got.values())) >= 600)
    summary = json.loads(run.stdout)

    devices = [f"{prefix}{i:04d}" for i in range(1, 7)]
    assert sorted(got) == devices
    for d in devices:
        assert sorted({m["seq"] for m in got[d]}) == list(range(1, 101)), d
    assert summary["sent"] == summary["acknowledged"] == 600
    assert summary["unacknowledged"] == summary["rejected"] == 0

    lines = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(lines) == 600
    truth = {(x["device"], x["seq"]): x for x in lines}
    for d in devices:
        for m in got[d]:
            t = truth[(d, m["seq"])]
            assert m["ts"] == t["ts"]
            assert set(t["labels"]) == set(m) - {"seq", "ts"}
    anomalous = [x for x in lines if any(v != NORMAL for v in x["labels"].values())]
    assert summary["anomalous_readings"] == len(anomalous) > 0
    assert set(summary["anomalies_injected"]) == set(ANOMALY_TYPES)
    assert sum(summary["anomalies_injected"].values()) > 0


def test_the_rate_paces_the_run_and_the_duration_ends_it(mosquitto):
    run = firmware_sim("mqtt", "--broker", mosquitto.address, "--devices", "3", "--events", "1000",
                       "--duration", "0.6", "--rate", "250", "--device-prefix", "simtest-pace-", "--no-progress")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    # Event k is due (k + 1) / rate seconds in: 0.6 s hold 150 events, never more.
    assert 120 <= summary["sent"] <= 150
    assert summary["acknowledged"] == summary["sent"]
    assert summary["elapsed_s"] >= 0.6


def test_client_ids_are_the_device_ids_or_name_the_shared_connection(mosquitto):
    for devices, prefix in (("3", "simtest-ids-"), ("12", "simtest-mux-")):
        run = firmware_sim("mqtt", "--broker", mosquitto.address, "--devices", devices, "--events", "24",
                           "--rate", "500", "--device-prefix", prefix, "--no-progress")
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["connections"] == min(int(devices), 8)
    log = mosquitto.log_path.read_text()
    assert all(f" as simtest-ids-{i:04d} " in log for i in (1, 2, 3))
    assert all(f" as simtest-mux-sim-{c}of8 " in log for c in range(1, 9))
    assert " as simtest-mux-0001 " not in log


def test_an_unreachable_broker_exits_non_zero_with_a_clear_message():
    port = servers.free_port()  # nothing listens here
    run = firmware_sim("mqtt", "--broker", f"127.0.0.1:{port}", "--events", "10", "--no-progress", timeout=30)
    assert run.returncode == 3
    assert f"cannot reach the MQTT broker at 127.0.0.1:{port}" in run.stderr
    assert run.stdout == ""


def test_a_run_without_a_stop_condition_is_a_usage_error():
    run = firmware_sim("mqtt", "--broker", "127.0.0.1:1883")
    assert run.returncode == 2
    assert "--events, --duration" in run.stderr
