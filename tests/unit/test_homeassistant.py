"""Home Assistant discovery: topics, configs and the consumer's publishing, without a broker.

What each config must hold to be accepted by Home Assistant is checked against its documentation in
tests/ha_schema.py (also run on what the real gateway publishes: tests/integration/test_homeassistant.py).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.profiles import BUILTIN_DIR, ProfileIndex, load_dir, parse
from gateway.event import Event, Verdict, compact_json
from gateway.fanout.ha_discovery import Discovery, device_class, ha_unit, object_id
from gateway.fanout.homeassistant import HomeAssistantSink
from gateway.ops.metrics import Metrics
from tests.ha_schema import SchemaError, check_binary_sensor, check_sensor, check_topic

ID = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)
DISCOVERY = Discovery("homeassistant", "edge-gateway", "gateway/status", "0.1.0")
ENV = load_dir(BUILTIN_DIR)[0]


@given(ID, ID, ID, ID)
def test_object_ids_are_valid_topic_levels_and_differ_whenever_device_or_field_differ(d1, f1, d2, f2):
    a, b = object_id(d1, f1), object_id(d2, f2)
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", a)
    assert (a == b) == ((d1, f1) == (d2, f2))


def test_the_usual_ids_stay_readable_and_separators_inside_ids_cannot_collide():
    assert object_id("env-0001", "temperature") == "env-0001__temperature"
    assert object_id("a_b", "c") != object_id("a", "b_c")
    assert object_id("a.b", "c") != object_id("a_b", "c")
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", object_id("gateway #1/ü"))


def test_units_are_spelled_the_way_home_assistant_expects_and_give_the_device_class():
    assert [(f.name, ha_unit(f.unit), device_class(f.name, f.unit)) for f in ENV.fields] == [
        ("temperature", "°C", "temperature"), ("humidity", "%", "humidity"), ("pressure", "hPa", "pressure"),
        ("battery", "V", "voltage"),  # a battery measured in volts is a voltage: the class `battery` is in %
    ]
    assert device_class("battery", "%") == "battery"
    assert device_class("soil_moisture", "%") == "moisture"
    assert device_class("level", "%") is None  # % of what? no class rather than a wrong one
    assert device_class("co2", "ppm") == "carbon_dioxide" and device_class("co", "ppm") == "carbon_monoxide"
    assert device_class("wind", "m/s") == "wind_speed" and device_class("flow", "m/s") == "speed"
    assert device_class("flow", "l/min") is None


def test_every_config_of_the_shipped_profile_meets_home_assistants_schema():
    for spec in ENV.fields:
        topic = DISCOVERY.sensor_topic("env-0001", spec.name).decode()
        check_topic(topic, "sensor")
        check_sensor(json.loads(DISCOVERY.sensor_config("env-0001", spec.name, ENV)))
    check_topic(DISCOVERY.anomaly_config_topic("env-0001").decode(), "binary_sensor")
    check_binary_sensor(json.loads(DISCOVERY.anomaly_config("env-0001", ENV)))
    check_sensor(json.loads(DISCOVERY.sensor_config("dev.x_1", "odd-field.2", None)))  # no profile: no unit


GOOD = {"name": "t", "unique_id": "gw/d/t", "state_topic": "gateway/ha/d/state", "device_class": "temperature",
        "unit_of_measurement": "°C", "device": {"identifiers": ["gw/d"]}}


@pytest.mark.parametrize("change", [
    {"unit_of_measurement": "degC"},  # Home Assistant's spelling is °C
    {"device_class": "battery", "unit_of_measurement": "V"},  # battery is in %
    {"device_class": "thermometer"},
    {"state_topic": None}, {"state_topic": "gateway/ha/+/state"},
    {"device": {"name": "d"}},  # neither identifiers nor connections
    {"unique_id": None},  # a device block needs a unique_id
    {"platform": "sensor"},  # only in device-based discovery
    {"availability": [{"payload_available": "online"}]},  # no topic
    {"unit_of_meas": "°C", "unit_of_measurement": None, "device_class": "humidity"},  # abbreviations count too
    {"state_class": "average"}, {"qos": 3}, {"vaule_template": "{{ value }}"},
])
def test_the_schema_check_refuses_what_the_documentation_does_not_allow(change):
    check_sensor(GOOD)
    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(SchemaError):
        check_sensor(bad)


def test_the_schema_check_takes_abbreviations_and_the_base_topic():
    check_sensor({"~": "gateway/ha/d", "stat_t": "~/state", "uniq_id": "x", "dev_cla": "humidity",
                  "unit_of_meas": "%", "dev": {"ids": "x", "mf": "Acme"}, "o": {"name": "gw", "sw": "1"}})
    with pytest.raises(SchemaError):
        check_binary_sensor({"stat_t": "x/anomaly", "dev_cla": "anomaly"})
    with pytest.raises(SchemaError):
        check_topic("homeassistant/sensor/gw/env.1/config", "sensor")  # '.' is not allowed in an id


def test_the_device_block_takes_manufacturer_and_model_from_the_profile():
    profile = parse('name = "pump"\nmatch = ["p*"]\nmanufacturer = "Acme"\nmodel = "Flow 3"\n[fields.flow]\n'
                    'unit = "l/min"')
    config = json.loads(DISCOVERY.sensor_config("p1", "flow", profile))
    assert config["device"] == {"identifiers": ["edge-gateway/p1"], "name": "p1", "manufacturer": "Acme",
                                "model": "Flow 3"}
    assert config["unit_of_measurement"] == "l/min" and "device_class" not in config
    assert json.loads(DISCOVERY.sensor_config("env-1", "temperature", ENV))["device"]["model"] == "env-sensor"


# --- the consumer ------------------------------------------------------------------------------------------------

class Broker:
    """Takes publishes and acknowledges them when told to."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, bool]] = []
        self.unacked: list[Any] = []

    def publish(self, topic: bytes, payload: bytes, qos: int = 1, retain: bool = False, tracker: Any = None) -> bool:
        self.published.append((topic.decode(), payload, retain))
        self.unacked.append(tracker)
        return True

    async def room(self) -> None:
        pass

    def ack_all(self) -> None:
        unacked, self.unacked = self.unacked, []
        for tracker in unacked:
            tracker.acked()

    def take(self) -> list[tuple[str, bytes]]:
        out, self.published = [(t, p) for t, p, _ in self.published], []
        return out


def reading(offset: int, device: str, episode: str | None = None, **fields: float) -> Event:
    payload = {"seq": offset, **fields}
    verdict = Verdict("sensor-anomaly", "2.2.0", 0.9, "spike", True, {"episode": episode}) if episode else None
    return Event(offset, f"{offset:028x}", f"devices/{device}", "telemetry", 1000 + offset, payload,
                 compact_json(payload), verdict, verdict.to_json() if verdict else b"")


def sink(broker: Broker, in_episode: Any = lambda source: False, profiles: Any = None) -> HomeAssistantSink:
    return HomeAssistantSink(broker, DISCOVERY, profiles or ProfileIndex([ENV]), in_episode, Metrics(),
                             interval=0.05)


def test_a_device_is_announced_once_then_only_its_state_is_published_coalesced():
    async def run() -> None:
        broker = Broker()
        ha = sink(broker)
        done = await ha.deliver([reading(1, "env-1", temperature=20.0, humidity=40.0)])
        await asyncio.sleep(0.01)
        first = broker.take()
        assert [t for t, _ in first] == [
            "homeassistant/sensor/edge-gateway/env-1__battery/config",
            "homeassistant/sensor/edge-gateway/env-1__humidity/config",
            "homeassistant/sensor/edge-gateway/env-1__pressure/config",
            "homeassistant/sensor/edge-gateway/env-1__temperature/config",
            "homeassistant/binary_sensor/edge-gateway/env-1__anomaly/config",
            "gateway/ha/env-1/anomaly",
            "gateway/ha/env-1/state",
        ]
        assert first[-2][1] == b"OFF"
        assert json.loads(first[-1][1]) == {"seq": 1, "temperature": 20.0, "humidity": 40.0}
        assert not done.done(), "done only when the broker acknowledged every publish"
        broker.ack_all()
        await asyncio.sleep(0)
        assert done.done()

        # 200 readings of two devices within one interval: one state each, with every field's latest value.
        futures = [await ha.deliver([reading(s, "env-1", temperature=20.0 + s), reading(s, "env-2", pressure=1000.0)])
                   for s in range(2, 202)]
        await asyncio.sleep(0.1)
        states = [(t, json.loads(p)) for t, p in broker.take() if t.endswith("/state")]
        assert states[-2:] == [("gateway/ha/env-1/state", {"seq": 201, "temperature": 221.0, "humidity": 40.0}),
                               ("gateway/ha/env-2/state", {"seq": 201, "pressure": 1000.0})]
        assert len(states) == 2
        broker.ack_all()
        await asyncio.sleep(0)
        assert all(f.done() for f in futures)

    asyncio.run(run())


async def announced(broker: Broker) -> HomeAssistantSink:
    """A sink that has seen env-1 once (temperature 20.0), with what that published taken off the broker."""
    ha = sink(broker)
    await ha.deliver([reading(1, "env-1", temperature=20.0)])
    await asyncio.sleep(0.01)
    broker.take()
    return ha


def test_a_field_not_in_the_profile_gets_its_config_when_it_first_appears():
    async def run() -> None:
        broker = Broker()
        ha = await announced(broker)
        await ha.deliver([reading(2, "env-1", temperature=20.0, co2=400.0)])
        await asyncio.sleep(0.1)
        assert [t for t, _ in broker.take()] == ["homeassistant/sensor/edge-gateway/env-1__co2/config",
                                                 "gateway/ha/env-1/state"]

    asyncio.run(run())


def test_an_episode_that_starts_and_ends_within_one_interval_still_shows_on_then_off():
    async def run() -> None:
        broker = Broker()
        ha = await announced(broker)
        await ha.deliver([reading(2, "env-1", "start", temperature=95.0), reading(3, "env-1", temperature=20.0)])
        await ha.deliver([reading(4, "env-1", "end", temperature=20.0)])
        await asyncio.sleep(0.1)
        assert broker.take() == [("gateway/ha/env-1/anomaly", b"ON"), ("gateway/ha/env-1/anomaly", b"OFF"),
                                 ("gateway/ha/env-1/state", b'{"seq":4,"temperature":20.0}')]

    asyncio.run(run())


def test_a_device_in_an_episode_when_first_seen_is_announced_on():
    async def run() -> None:
        broker = Broker()
        ha = sink(broker, in_episode=lambda source: source == "devices/env-hot")
        await ha.deliver([reading(1, "env-hot", temperature=90.0), reading(2, "env-cold", temperature=20.0)])
        await asyncio.sleep(0.01)
        anomaly = {t: p for t, p in broker.take() if t.endswith("/anomaly")}
        assert anomaly == {"gateway/ha/env-hot/anomaly": b"ON", "gateway/ha/env-cold/anomaly": b"OFF"}

    asyncio.run(run())


def test_without_the_anomaly_model_there_is_no_anomaly_sensor():
    async def run() -> None:
        broker = Broker()
        ha = sink(broker, in_episode=None)
        await ha.deliver([reading(1, "env-1", "start", temperature=20.0)])
        await asyncio.sleep(0.01)
        assert not any("anomaly" in t for t, _ in broker.take())

    asyncio.run(run())


def test_other_profiles_announce_every_known_device_again():
    async def run() -> None:
        broker = Broker()
        ha = await announced(broker)
        fahrenheit = parse('name = "env-sensor"\nmatch = ["env-*"]\n[fields.temperature]\nunit = "degF"')
        ha.reprofile(ProfileIndex([fahrenheit]))
        await asyncio.sleep(0.1)
        published = dict(broker.take())
        config = json.loads(published["homeassistant/sensor/edge-gateway/env-1__temperature/config"])
        assert config["unit_of_measurement"] == "°F"
        assert "gateway/ha/env-1/state" in published

    asyncio.run(run())


def test_devices_beyond_the_limit_are_forgotten_oldest_first_and_announced_again_when_back():
    async def run() -> None:
        broker = Broker()
        ha = HomeAssistantSink(broker, DISCOVERY, ProfileIndex([]), None, Metrics(), interval=0.01, max_devices=2)
        await ha.deliver([reading(1, "a", x=1.0), reading(2, "b", x=1.0), reading(3, "c", x=1.0)])
        await asyncio.sleep(0.05)
        assert {t for t, _ in broker.take() if t.endswith("/state")} == {"gateway/ha/b/state", "gateway/ha/c/state"}
        await ha.deliver([reading(4, "a", x=2.0)])
        await asyncio.sleep(0.05)
        assert "homeassistant/sensor/edge-gateway/a__x/config" in dict(broker.take())

    asyncio.run(run())


def test_sensors_expire_after_the_configured_silence_when_asked_to():
    expiring = Discovery("homeassistant", "edge-gateway", "gateway/status", "0.1.0", expire_after=900)
    config = check_sensor(json.loads(expiring.sensor_config("env-1", "temperature", ENV)))
    assert config["expire_after"] == 900
    assert "expire_after" not in json.loads(DISCOVERY.sensor_config("env-1", "temperature", ENV))
    # The anomaly sensor is not a measurement: its state changes only at an episode's edges, so it never expires.
    assert "expire_after" not in json.loads(expiring.anomaly_config("env-1", ENV))


# --- removing devices that went away -----------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def removing(broker: Broker, clock: Clock, known_file: Any = None, metrics: Metrics | None = None,
             remove_after: float = 100.0, interval: float = 0.01) -> HomeAssistantSink:
    return HomeAssistantSink(broker, DISCOVERY, ProfileIndex([ENV]), lambda source: False, metrics or Metrics(),
                             interval=interval, remove_after=remove_after, known_file=known_file, clock=clock)


def env1_topics(*extra_fields: str) -> list[tuple[str, bytes]]:
    fields = sorted({"battery", "humidity", "pressure", "temperature", *extra_fields})
    return [*((f"homeassistant/sensor/edge-gateway/env-1__{f}/config", b"") for f in fields),
            ("homeassistant/binary_sensor/edge-gateway/env-1__anomaly/config", b""),
            ("gateway/ha/env-1/state", b""), ("gateway/ha/env-1/anomaly", b"")]


def test_a_device_silent_for_remove_after_has_every_config_and_state_cleared_once_the_broker_acknowledges():
    async def run() -> None:
        broker, clock, metrics = Broker(), Clock(), Metrics()
        ha = removing(broker, clock, metrics=metrics)
        await ha.deliver([reading(1, "env-1", temperature=20.0, co2=400.0), reading(2, "env-2", temperature=20.0)])
        await asyncio.sleep(0.05)
        broker.take()
        broker.ack_all()
        clock.now += 60
        await ha.deliver([reading(3, "env-2", temperature=21.0)])  # env-2 is heard again; env-1 stays silent
        await asyncio.sleep(0.05)
        broker.take()
        broker.ack_all()
        clock.now += 40
        removal = asyncio.ensure_future(ha.remove_silent())
        await asyncio.sleep(0.01)
        published = broker.published[:]
        assert [(t, p) for t, p, _ in published] == env1_topics("co2"), "the field it sent has a config too"
        assert all(retained for _, _, retained in published)
        assert not removal.done(), "removed only when the broker has the empty messages"
        broker.ack_all()
        assert await removal == ["env-1"]
        assert metrics.get("ha_devices_removed") == 1
        broker.take()
        clock.now += 59
        assert await ha.remove_silent() == [] and broker.take() == []
        clock.now += 1
        removed, _ = await asyncio.gather(ha.remove_silent(), _ack_soon(broker))
        assert removed == ["env-2"], "silent since its last reading, not since the first"

    asyncio.run(run())


async def _ack_soon(broker: Broker) -> None:
    await asyncio.sleep(0.01)
    broker.ack_all()


def test_a_removed_device_that_sends_again_is_announced_again():
    async def run() -> None:
        broker, clock = Broker(), Clock()
        ha = removing(broker, clock)
        await ha.deliver([reading(1, "env-1", temperature=20.0)])
        await asyncio.sleep(0.05)
        clock.now += 100
        await asyncio.gather(ha.remove_silent(), _ack_soon(broker))
        broker.take()
        await ha.deliver([reading(2, "env-1", temperature=22.0)])
        await asyncio.sleep(0.05)
        published = dict(broker.take())
        assert "homeassistant/sensor/edge-gateway/env-1__temperature/config" in published
        assert json.loads(published["gateway/ha/env-1/state"]) == {"seq": 2, "temperature": 22.0}, \
            "only what it sent since: the values from before the removal are gone with it"

    asyncio.run(run())


def test_a_device_with_a_reading_waiting_for_its_state_update_is_not_silent():
    async def run() -> None:
        broker, clock = Broker(), Clock()
        ha = removing(broker, clock, interval=0.3)
        await ha.deliver([reading(1, "env-1", temperature=20.0)])
        await asyncio.sleep(0.05)  # announced at once (the first update), then heard at most every 0.3 s
        clock.now += 500
        await ha.deliver([reading(2, "env-1", temperature=20.0)])
        assert await ha.remove_silent() == []

    asyncio.run(run())


def test_silence_is_kept_across_a_restart_but_the_time_the_gateway_was_down_does_not_count(tmp_path):
    async def run() -> None:
        known = tmp_path / "homeassistant.json"
        broker, clock = Broker(), Clock()
        ha = removing(broker, clock, known)
        await ha.deliver([reading(1, "env-1", temperature=20.0, co2=400.0)])
        await asyncio.sleep(0.05)
        broker.ack_all()
        clock.now += 70
        ha.save_now()  # the gateway stops, 70 s after env-1 was last heard

        restarted_clock = Clock()
        restarted_clock.now = 5.0  # a monotonic clock of another boot: the downtime is not in it
        again = removing(Broker(), restarted_clock, known)
        restarted_clock.now += 29
        assert await again.remove_silent() == []
        restarted_clock.now += 1
        broker = again._publisher
        removed, _ = await asyncio.gather(again.remove_silent(), _ack_soon(broker))
        assert removed == ["env-1"]
        assert [(t, p) for t, p, _ in broker.published] == env1_topics("co2"), \
            "the configs announced before the restart, the field it sent included"
        assert json.loads(known.read_text()) == {"devices": {}}

    asyncio.run(run())


def test_an_unreadable_file_of_known_devices_is_reported_and_only_costs_their_removal(tmp_path, caplog):
    async def run() -> None:
        known = tmp_path / "homeassistant.json"
        known.write_text('{"devices": {"env-1": {"fields": ["temperature"]}}}')  # no "silent"
        broker, clock = Broker(), Clock()
        ha = removing(broker, clock, known)
        clock.now += 1000
        assert await ha.remove_silent() == []
        await ha.deliver([reading(1, "env-1", temperature=20.0)])
        await asyncio.sleep(0.05)
        assert "homeassistant/sensor/edge-gateway/env-1__temperature/config" in dict(broker.take())

    asyncio.run(run())
    assert "unreadable" in caplog.text


def test_a_file_that_cannot_be_saved_is_counted_and_removal_goes_on_from_memory(tmp_path):
    async def run() -> None:
        broker, clock, metrics = Broker(), Clock(), Metrics()
        ha = removing(broker, clock, tmp_path / "missing-folder" / "homeassistant.json", metrics)
        await ha.deliver([reading(1, "env-1", temperature=20.0), reading(2, "env-2", temperature=20.0)])
        await asyncio.sleep(0.05)
        clock.now += 60
        await ha.deliver([reading(3, "env-2", temperature=20.0)])
        await asyncio.sleep(0.05)
        clock.now += 40
        removed, _ = await asyncio.gather(ha.remove_silent(), _ack_soon(broker))
        assert removed == ["env-1"]
        assert metrics.get("storage_errors") == 1, "the save after the removal failed, and said so"
        clock.now += 60
        removed, _ = await asyncio.gather(ha.remove_silent(), _ack_soon(broker))
        assert removed == ["env-2"], "what is known in memory is still acted on"

    asyncio.run(run())


def test_beyond_max_devices_the_longest_silent_is_no_longer_tracked_for_removal():
    async def run() -> None:
        broker, clock = Broker(), Clock()
        ha = HomeAssistantSink(broker, DISCOVERY, ProfileIndex([]), None, Metrics(), interval=0.01, max_devices=2,
                               remove_after=100.0, clock=clock)
        for device in ("a", "b", "c"):
            await ha.deliver([reading(1, device, x=1.0)])
            await asyncio.sleep(0.03)
            clock.now += 1
        clock.now += 100
        removed, _ = await asyncio.gather(ha.remove_silent(), _ack_soon(broker))
        assert removed == ["b", "c"]

    asyncio.run(run())


def test_without_remove_after_nothing_is_ever_removed_and_nothing_is_kept_for_it(tmp_path):
    async def run() -> None:
        known = tmp_path / "homeassistant.json"
        broker, clock = Broker(), Clock()
        ha = removing(broker, clock, known, remove_after=0.0)
        await ha.deliver([reading(1, "env-1", temperature=20.0)])
        await asyncio.sleep(0.05)
        broker.take()
        clock.now += 10 ** 9
        assert await ha.remove_silent() == [] and broker.take() == []
        ha.save_now()
        assert not known.exists()

    asyncio.run(run())


def test_a_dialect_device_gets_sensors_for_what_it_sends_with_the_dialect_s_units():
    """A dialect lists every field a kind of device may send, all optional: a zigbee2mqtt thermometer is announced
    with its two fields, in Home Assistant's units, not with a sensor for every field of the dialect."""
    async def run() -> None:
        broker = Broker()
        z2m = next(p for p in load_dir(BUILTIN_DIR.parent / "dialects") if p.name == "zigbee2mqtt")
        ha = sink(broker, profiles=ProfileIndex([z2m]))
        await ha.deliver([reading(1, "z2m-0x00158d0001a2b3c4", temperature=21.5, humidity=45.0)])
        await asyncio.sleep(0.01)
        configs = {t: json.loads(p) for t, p in broker.take() if t.startswith("homeassistant/sensor/")}
        assert sorted(configs) == ["homeassistant/sensor/edge-gateway/z2m-0x00158d0001a2b3c4__humidity/config",
                                   "homeassistant/sensor/edge-gateway/z2m-0x00158d0001a2b3c4__temperature/config"]
        temperature = configs["homeassistant/sensor/edge-gateway/z2m-0x00158d0001a2b3c4__temperature/config"]
        assert (temperature["unit_of_measurement"], temperature["device_class"]) == ("°C", "temperature")

    asyncio.run(run())
