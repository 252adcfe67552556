"""Home Assistant discovery end to end: a real mosquitto, the real gateway, simulated devices.

Every config the gateway publishes is checked against Home Assistant's documented schema for MQTT sensor and binary
sensor discovery (tests/ha_schema.py, written from https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery,
https://www.home-assistant.io/integrations/sensor.mqtt/, https://www.home-assistant.io/integrations/binary_sensor.mqtt/
and the device classes of https://www.home-assistant.io/integrations/sensor/#device-class), and each sensor's
value_template is rendered the way Home Assistant renders it (Jinja2's immutable sandbox, `value_json` being the
state message) against the state the gateway published, which must give the value the device sent last.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import uuid
from typing import Any

import pytest

from tests import ha_schema
from tests.gateway_process import GatewayProcess
from tests.integration.test_gateway_pipeline import gateway_model_quiet, reading
from tests.mqtt_helpers import Collector, publish_all
from tests.servers import REPO

pytestmark = pytest.mark.integration

ENV_UNITS = {"temperature": ("°C", "temperature"), "humidity": ("%", "humidity"), "pressure": ("hPa", "pressure"),
             "battery": ("V", "voltage")}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def ha_gateway(broker: str, tmp_path: Any, enabled: bool = True) -> GatewayProcess:
    config = tmp_path / "gateway.toml"
    config.write_text(f"[homeassistant]\nenabled = {'true' if enabled else 'false'}\n")
    return GatewayProcess(tmp_path / "gw", broker, "--influx-api", "none", client_id=uid("gw-ha"), config=config)


@pytest.fixture
def gateway(mosquitto, tmp_path):
    gw = ha_gateway(mosquitto.address, tmp_path)
    yield gw
    gw.kill()


def render(template: str, state: bytes) -> str:
    """A value template rendered as Home Assistant renders one for an MQTT message: `value` and `value_json`."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # the base of Home Assistant's template environment

    return ImmutableSandboxedEnvironment().from_string(template).render(value=state.decode(),
                                                                          value_json=json.loads(state))


def last(messages: list[tuple[str, bytes, bool]], topic: str) -> bytes | None:
    found = [p for t, p, _ in messages if t == topic]
    return found[-1] if found else None


def test_a_simulated_device_appears_with_a_sensor_per_field_that_meets_home_assistants_schema(mosquitto, gateway):
    gateway.start()
    node, prefix = gateway.client_id, uid("env") + "-"  # env-*: the shipped env-sensor profile applies
    discovery = Collector(mosquitto.address, f"homeassistant/+/{node}/+/config")
    states = Collector(mosquitto.address, "gateway/ha/#")
    sent = Collector(mosquitto.address, "devices/+/telemetry")
    alerts = Collector(mosquitto.address, "alerts/#")
    run = subprocess.run([sys.executable, "-m", "firmware_sim.cli", "mqtt", "--broker", mosquitto.address,
                          "--devices", "2", "--kinds", "env", "--device-prefix", prefix, "--events", "60",
                          "--rate", "300", "--anomaly-rate", "0", "--no-progress"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr
    devices = [f"{prefix}0001", f"{prefix}0002"]
    assert sent.wait_for(lambda m: sum(t.split("/")[1] in devices for t, _, _ in m) == 60)
    assert discovery.wait_count(2 * (4 + 1)), f"got {len(discovery.messages)} configs"
    gateway.wait_status(lambda s: s["consumers"]["homeassistant"]["lag"] == 0)

    configs = {}
    for topic, payload, retained in discovery.messages:
        assert not retained, "live, not a leftover: this gateway's node id is new"
        component = topic.split("/")[1]
        parts = ha_schema.check_topic(topic, component)
        assert parts["node_id"] == node
        config = json.loads(payload)
        check = ha_schema.check_sensor if component == "sensor" else ha_schema.check_binary_sensor
        configs[topic] = check(config)
    assert len(configs) == len(discovery.messages) == 10, "one config per device and field, not per reading"
    assert len({c["unique_id"] for c in configs.values()}) == 10
    for device in devices:
        for field, (unit, klass) in ENV_UNITS.items():
            c = configs[f"homeassistant/sensor/{node}/{device}__{field}/config"]
            assert (c["unit_of_measurement"], c["device_class"], c["state_class"]) == (unit, klass, "measurement")
            assert c["unique_id"] == f"{node}/{device}/{field}"
            assert c["device"] == {"identifiers": [f"{node}/{device}"], "name": device, "model": "env-sensor"}
            assert c["availability"] == [{"topic": "gateway/status", "payload_available": "online",
                                          "payload_not_available": "offline"}]
        anomaly = configs[f"homeassistant/binary_sensor/{node}/{device}__anomaly/config"]
        assert (anomaly["device_class"], anomaly["state_topic"]) == ("problem", f"gateway/ha/{device}/anomaly")

    # The states: every sensor's template gives the value the device sent last.
    last_sent = {d: json.loads(last(sent.messages, f"devices/{d}/telemetry") or b"{}") for d in devices}
    assert states.wait_for(lambda m: all(json.loads(last(m, f"gateway/ha/{d}/state") or b"{}").get("seq")
                                         == last_sent[d]["seq"] for d in devices))
    for device in devices:
        state = last(states.messages, f"gateway/ha/{device}/state")
        assert state is not None
        for field in ENV_UNITS:
            c = configs[f"homeassistant/sensor/{node}/{device}__{field}/config"]
            assert c["state_topic"] == f"gateway/ha/{device}/state"
            assert float(render(c["value_template"], state)) == last_sent[device][field]
        # The model may see an episode even in a calm simulation: the sensor says what the alerts said last.
        episodes = [json.loads(p)["verdicts"][0]["detail"]["episode"] for t, p, _ in alerts.messages
                    if t == f"alerts/{device}"]
        expected = b"ON" if episodes and episodes[-1] == "start" else b"OFF"
        assert last(states.messages, f"gateway/ha/{device}/anomaly") == expected
    # Coalesced: far fewer state messages than readings (at most one per device per second).
    assert sum(t.endswith("/state") for t, _, _ in states.messages) < 60

    # Home Assistant restarting finds everything retained: configs, states, availability.
    late = Collector(mosquitto.address, f"homeassistant/+/{node}/+/config", f"gateway/ha/{devices[0]}/#",
                     "gateway/status")
    assert late.wait_count(10 + 2 + 1)
    assert all(retained for _, _, retained in late.messages)
    assert last(late.messages, "gateway/status") == b"online"
    metrics = gateway.status()["metrics"]  # type: ignore[index]
    assert metrics["ha_configs_published"] == 10
    for c in (discovery, states, sent, alerts, late):
        c.close()


def test_the_anomaly_sensor_turns_on_at_an_episode_start_and_off_at_its_end(mosquitto, gateway):
    """The same series as the pipeline's alert test: calm, one reading far out, calm for longer than the model's
    quiet spell. A device without a profile: its sensors are the fields it sends."""
    gateway.start()
    device = uid("ha-dev")
    anomaly = Collector(mosquitto.address, f"gateway/ha/{device}/anomaly")
    alerts = Collector(mosquitto.address, f"alerts/{device}")
    rng = random.Random(0)
    values = [round(20.0 + rng.gauss(0, 0.1), 2) for _ in range(160)]
    values[60] = 95.0
    quiet = gateway_model_quiet()
    assert 60 + quiet < len(values)
    topic = f"devices/{device}/telemetry"

    publish_all(mosquitto.address, [(topic, reading(s, v)) for s, v in enumerate(values[:60])])
    assert anomaly.wait_for(lambda m: m and m[-1][1] == b"OFF"), "announced calm"
    publish_all(mosquitto.address, [(topic, reading(60, values[60]))])
    assert alerts.wait_count(1)
    assert anomaly.wait_for(lambda m: m and m[-1][1] == b"ON"), anomaly.messages
    on = Collector(mosquitto.address, f"gateway/ha/{device}/anomaly")  # retained: what Home Assistant gets
    assert on.wait_for(lambda m: m and m[-1][1:] == (b"ON", True))

    publish_all(mosquitto.address, [(topic, reading(s, v)) for s, v in enumerate(values[61:], start=61)])
    assert alerts.wait_count(2)
    assert [json.loads(p)["verdicts"][0]["detail"]["episode"] for _, p, _ in alerts.messages] == ["start", "end"]
    assert anomaly.wait_for(lambda m: m[-1][1] == b"OFF")
    changes = [p for i, (_, p, _) in enumerate(anomaly.messages) if i == 0 or anomaly.messages[i - 1][1] != p]
    assert changes == [b"OFF", b"ON", b"OFF"], "announced calm, on at the start, off at the end"
    off = Collector(mosquitto.address, f"gateway/ha/{device}/anomaly")
    assert off.wait_for(lambda m: m and m[-1][1:] == (b"OFF", True))
    # Its sensors are the fields it sent, with no unit: no profile says what they measure.
    configs = Collector(mosquitto.address, f"homeassistant/sensor/{gateway.client_id}/+/config")
    assert configs.wait_count(2)
    sensors = sorted((ha_schema.check_sensor(json.loads(p)) for _, p, _ in configs.messages),
                     key=lambda c: c["name"])
    assert [(c["name"], "unit_of_measurement" in c) for c in sensors] == [("humidity", False),
                                                                           ("temperature", False)]
    for c in (anomaly, alerts, on, off, configs):
        c.close()


def test_nothing_is_published_for_home_assistant_when_it_is_off(mosquitto, tmp_path):
    gw = ha_gateway(mosquitto.address, tmp_path, enabled=False)
    device = uid("env-off")
    gw.run_cli("follow", "olga", f"devices/{device}")
    gw.start()
    try:
        watch = Collector(mosquitto.address, "homeassistant/#", "gateway/ha/#")
        feed = Collector(mosquitto.address, "feeds/olga/#")
        publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(20)])
        assert feed.wait_count(20)
        status = gw.wait_status(lambda s: s["metrics"]["committed"] >= 20)
        assert "homeassistant" not in status["consumers"]
        assert status["metrics"]["ha_configs_published"] == status["metrics"]["ha_states_published"] == 0
        mine = [t for t, _, _ in watch.messages if gw.client_id in t or device in t]
        assert mine == []
        watch.close()
        feed.close()
    finally:
        gw.kill()


def test_sighup_with_other_profiles_announces_every_known_device_again(mosquitto, tmp_path):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    probe = profiles / "probe.toml"
    probe.write_text('name = "probe"\nmatch = ["hap-*"]\n[fields.temperature]\nunit = "degC"\n')
    config = tmp_path / "gateway.toml"
    config.write_text(f'profiles_dir = "{profiles}"\n[homeassistant]\nenabled = true\n')
    gw = GatewayProcess(tmp_path / "gw", mosquitto.address, "--influx-api", "none", client_id=uid("gw-ha"),
                        config=config)
    device = uid("hap")
    gw.start()
    try:
        configs = Collector(mosquitto.address, f"homeassistant/sensor/{gw.client_id}/{device}__temperature/config")
        publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(3)])
        assert configs.wait_for(lambda m: m and json.loads(m[-1][1]).get("unit_of_measurement") == "°C")
        probe.write_text('name = "probe"\nmatch = ["hap-*"]\nmanufacturer = "Acme"\n[fields.temperature]\n'
                         'unit = "degF"\n')
        gw.proc.send_signal(signal.SIGHUP)  # no new reading needed: the devices it knows are announced again
        assert configs.wait_for(lambda m: json.loads(m[-1][1]).get("unit_of_measurement") == "°F")
        c = ha_schema.check_sensor(json.loads(configs.messages[-1][1]))
        assert (c["device_class"], c["device"]["manufacturer"], c["device"]["model"]) == ("temperature", "Acme",
                                                                                          "probe")
        configs.close()
    finally:
        gw.kill()


def test_a_device_that_goes_silent_is_removed_from_home_assistant_and_announced_again_when_back(mosquitto, tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text("[homeassistant]\nenabled = true\nexpire_after = 600\nremove_after = 1.5\n")
    gw = GatewayProcess(tmp_path / "gw", mosquitto.address, "--influx-api", "none", client_id=uid("gw-ha"),
                        config=config)
    device = uid("har")  # no profile: its sensors are the fields it sends
    gw.start()
    try:
        node = gw.client_id
        topics = [f"homeassistant/sensor/{node}/{device}__humidity/config",
                  f"homeassistant/sensor/{node}/{device}__temperature/config",
                  f"homeassistant/binary_sensor/{node}/{device}__anomaly/config",
                  f"gateway/ha/{device}/state", f"gateway/ha/{device}/anomaly"]
        watch = Collector(mosquitto.address, *topics)
        publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(3)])
        assert watch.wait_for(lambda m: {t for t, p, _ in m if p} == set(topics))
        config_doc = ha_schema.check_sensor(json.loads(last(watch.messages, topics[1]) or b"{}"))
        assert config_doc["expire_after"] == 600

        # Silent for 1.5 s: every config and state is cleared (an empty retained message each), once.
        assert watch.wait_for(lambda m: all(last(m, t) == b"" for t in topics), timeout=20)
        assert sum(p == b"" for _, p, _ in watch.messages) == len(topics)
        status = gw.wait_status(lambda s: s["metrics"]["ha_devices_removed"] >= 1)
        assert status["metrics"]["ha_devices_removed"] == 1
        known = json.loads((tmp_path / "gw" / "homeassistant.json").read_text())
        assert device not in known["devices"]
        # Home Assistant, restarting now, would find nothing of the device: no retained message is left.
        late = Collector(mosquitto.address, *topics, "gateway/status")
        assert late.wait_for(lambda m: any(t == "gateway/status" for t, _, _ in m))
        assert [t for t, _, _ in late.messages] == ["gateway/status"]
        late.close()

        # Back: announced again, as a new device would be.
        publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(10))])
        assert watch.wait_for(lambda m: all(last(m, t) for t in topics))
        watch.close()
    finally:
        gw.kill()
