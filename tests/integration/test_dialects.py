"""Devices that speak another dialect, end to end: a real mosquitto, the real gateway with the shipped Tasmota,
zigbee2mqtt and ESPHome profiles in its profiles folder, and a follower reading its feed.

Each device publishes the way its firmware does (tests/unit/test_dialects.py cites the formats); the follower must
get `feeds/{follower}/devices/{id}/telemetry` readings with the mapped fields, and what does not map must become a
dead letter with its reason: published on gateway/deadletter, counted, and stored in the log.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from devices.profiles import DIALECTS_DIR
from tests.gateway_process import GatewayProcess
from tests.mqtt_helpers import Collector, publish_all

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(mosquitto: Any, tmp_path: Path) -> Any:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for name in ("tasmota", "zigbee2mqtt", "esphome"):
        shutil.copy(DIALECTS_DIR / f"{name}.toml", profiles)
    config = tmp_path / "gateway.toml"
    config.write_text(f'profiles_dir = "{profiles}"\n')
    gw = GatewayProcess(tmp_path / "gw", mosquitto.address, "--influx-api", "none",
                        client_id=f"gw-{uuid.uuid4().hex[:8]}", config=config)
    yield gw
    gw.kill()


def test_three_dialects_reach_a_follower_and_bad_messages_become_dead_letters(mosquitto: Any, gateway: Any) -> None:
    tag = uuid.uuid4().hex[:6]
    tasmota, zigbee, node = f"tasmota_{tag}", f"0x00158d00{tag}", f"hall-{tag}"
    devices = {"tasmota": f"tasmota-{tasmota}", "zigbee": f"z2m-{zigbee}", "esphome": f"esphome-{node}"}
    follower = f"fan-{tag}"
    for device_id in devices.values():
        assert gateway.run_cli("follow", follower, f"devices/{device_id}").returncode == 0
    gateway.start()
    feed = Collector(mosquitto.address, f"feeds/{follower}/#")
    letters = Collector(mosquitto.address, "gateway/deadletter", qos=0)

    good = [
        (f"tele/{tasmota}/SENSOR", b'{"Time":"2024-05-01T12:00:00","BME280":{"Temperature":21.4,"Humidity":40.2,'
                                   b'"Pressure":1013.2},"PressureUnit":"hPa","TempUnit":"C"}'),
        (f"zigbee2mqtt/{zigbee}", b'{"temperature": 21.5, "humidity": 45, "battery": 97, "linkquality": 120, '
                                  b'"occupancy": true, "contact": false}'),
        (f"{node}/sensor/temperature/state", b"21.50"),
        (f"{node}/binary_sensor/motion/state", b"ON"),
    ]
    bad = [  # (topic, payload, reason)
        (f"tele/{tasmota}/SENSOR", b'{"Time":"2024-05-01T12:00:00","BME280":{"Temperature":21.4},"TempUnit":"K"}',
         "unknown_unit"),
        (f"zigbee2mqtt/kitchen {tag}", b'{"temperature": 21.5}', "bad_device_id"),
        (f"zigbee2mqtt/{zigbee}", b'{"state": "TOGGLE"}', "not_numeric"),
        (f"{node}/sensor/temperature/state", b"nan", "non_finite"),
        (f"{node}/binary_sensor/motion/state", b"MAYBE", "not_numeric"),
    ]
    ignored = [("zigbee2mqtt/bridge/state", b'{"state":"online"}'), (f"zigbee2mqtt/{zigbee}/set", b'{"state":"ON"}'),
               (f"{node}/status", b"online")]
    publish_all(mosquitto.address, [(t, p) for t, p in good] + [(t, p) for t, p, _ in bad] + ignored)

    assert feed.wait_count(4), f"the follower got {len(feed.messages)} of 4: {feed.messages}"
    by_device: dict[str, list[dict[str, Any]]] = {}
    for topic, payload, _ in feed.messages:
        envelope = json.loads(payload)
        assert topic == f"feeds/{follower}/{envelope['source']}/telemetry" and envelope["kind"] == "telemetry"
        assert envelope["verdicts"][0]["model"] == "sensor-anomaly"  # scored like any reading
        by_device.setdefault(envelope["source"], []).append(envelope["payload"])
    assert by_device == {
        f"devices/{devices['tasmota']}": [{"temperature": 21.4, "humidity": 40.2, "pressure": 1013.2}],
        f"devices/{devices['zigbee']}": [{"temperature": 21.5, "humidity": 45.0, "battery": 97.0,
                                          "linkquality": 120.0, "occupancy": 1.0, "contact": 0.0}],
        f"devices/{devices['esphome']}": [{"temperature": 21.5}, {"motion": 1.0}],
    }

    assert letters.wait_count(len(bad)), f"dead letters seen: {letters.messages}"
    seen = sorted((m["origin"], m["reason"]) for m in letters.json())
    assert seen == sorted((t, r) for t, _, r in bad)
    assert all(m["message"] for m in letters.json())
    # {node}/status is not subscribed to; the other ignored topics arrive and leave nothing.
    received = len(good) + len(bad) + len(ignored) - 1
    status = gateway.wait_status(lambda s: sum(s["deadletter_reasons"].values()) >= len(bad)
                                 and s["metrics"]["received"] >= received)
    assert status["deadletter_reasons"] == {"unknown_unit": 1, "bad_device_id": 1, "not_numeric": 2,
                                            "non_finite": 1}
    gateway.terminate()
    with sqlite3.connect(gateway.data_dir / "log.db") as db:
        stored = sorted(db.execute("SELECT origin, reason FROM deadletters").fetchall())
    assert stored == sorted((t, r) for t, _, r in bad)
    assert status["metrics"]["received"] == received
    assert status["metrics"]["appended"] == len(good)
    feed.close()
    letters.close()


def test_a_door_contact_is_never_judged_from_zigbee2mqtt_esphome_or_as_0_and_1_where_other_levels_are(
        mosquitto: Any, gateway: Any) -> None:
    """The same door four times: a zigbee2mqtt sensor (whose `contact` the dialect marks a state), an ESPHome binary
    sensor (ON/OFF), a plain device sending 0 and 1, and a plain device sending the same series as 2 and 3. A contact
    held for long stretches looks stuck to the anomaly model; only the last is a measurement and judged on it. Every
    temperature is judged. The verdicts are read from the log, where each was stored with its reading."""
    import random

    tag = uuid.uuid4().hex[:6]
    door, node, plain, levels = f"0x00158d01{tag}", f"porch-{tag}", f"door-{tag}", f"levels-{tag}"
    gateway.start()
    rng = random.Random(4)
    contact, messages = False, []
    for i in range(800):
        contact = (not contact) if rng.random() < 0.02 else contact
        temperature = round(21.0 + rng.gauss(0, 0.1), 2)
        messages += [
            (f"zigbee2mqtt/{door}", json.dumps({"temperature": temperature, "contact": contact}).encode()),
            (f"{node}/sensor/temperature/state", f"{temperature:.2f}".encode()),
            (f"{node}/binary_sensor/contact/state", b"ON" if contact else b"OFF"),
            (f"devices/{plain}/telemetry",
             json.dumps({"seq": i, "temperature": temperature, "contact": int(contact)}).encode()),
            (f"devices/{levels}/telemetry",
             json.dumps({"seq": i, "temperature": temperature, "contact": 2 + int(contact)}).encode()),
        ]
    publish_all(mosquitto.address, messages)
    gateway.wait_status(lambda s: s["metrics"]["committed"] >= len(messages))
    gateway.terminate()

    judged: dict[str, set[str]] = {}
    readings: dict[str, int] = {}
    with sqlite3.connect(gateway.data_dir / "log.db") as db:
        for source, verdict in db.execute("SELECT source, verdict FROM events WHERE kind = 'telemetry'"):
            device = source.removeprefix("devices/")
            readings[device] = readings.get(device, 0) + 1
            v = json.loads(verdict)
            if v["flagged"]:
                judged.setdefault(device, set()).update(v["detail"]["fields"])
    assert readings == {f"z2m-{door}": 800, f"esphome-{node}": 1600, plain: 800, levels: 800}
    assert "contact" in judged.get(levels, set()), "as 2 and 3 the held contact is a measurement, and looks stuck"
    for device in (f"z2m-{door}", f"esphome-{node}", plain):
        assert "contact" not in judged.get(device, set()), device
