"""Devices that speak another dialect: profiles with a [source] (devices/mapping.py), through the real MQTT source.

The shipped profiles (devices/dialects/) are tested with messages written from each project's documentation; the
docstrings say where each format comes from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from devices import mapping
from devices.profiles import DIALECTS_DIR, ProfileError, ProfileIndex, load_dir, parse
from devices.telemetry import TelemetryError
from gateway import config
from gateway.event import ID
from gateway.runtime import mqtt_settings
from tests.recording_sink import SourceUnderTest

DIALECTS = {p.name: p for p in load_dir(DIALECTS_DIR)}

SENSOR = """
name = "sensor"
[source]
topic = "home/{id}/sensor"
id = "home-{id}"
[fields.temperature]
path = "climate.temp"
unit = "degC"
min = -40.0
max = 85.0
[fields.door]
path = "door"
optional = true
values = { open = 1, closed = 0 }
"""


def source_with(tmp_path: Path, *texts: str, limits: config.LimitsConfig | None = None) -> SourceUnderTest:
    return SourceUnderTest(tmp_path, [parse(t) for t in texts], limits)


def one(src: SourceUnderTest, topic: str, payload: bytes | str) -> Any:
    """The record one message becomes: an Ingested, a DeadLetter, or None (nothing: an ignored topic)."""
    before = (len(src.appended), len(src.dead))
    src.handle(topic, payload.encode() if isinstance(payload, str) else payload)
    if len(src.appended) > before[0]:
        return src.appended[-1]
    if len(src.dead) > before[1]:
        return src.dead[-1]
    return None


@pytest.fixture
def src(tmp_path: Path) -> Any:
    s = source_with(tmp_path, SENSOR, *(p.read_text() for p in sorted(DIALECTS_DIR.glob("*.toml"))))
    yield s
    s.close()


# --- the mapping ---------------------------------------------------------------------------------------------------


def test_a_mapped_message_is_a_device_reading_like_any_other(src):
    record = one(src, "home/attic/sensor", '{"climate": {"temp": 21.5, "unit": "C"}, "door": "open"}')
    assert record.source == "devices/home-attic" and record.kind == "telemetry"
    assert record.payload == {"temperature": 21.5, "door": 1.0}
    assert json.loads(record.body) == record.payload
    assert record.dedup is None  # no seq: nothing identifies a retransmission
    assert src.link.acked == [1]


@pytest.mark.parametrize("topic, payload, reason", [
    ("home/attic/sensor", '{"door": "open"}', "missing_path"),
    ("home/attic/sensor", '{"climate": {}}', "missing_path"),
    ("home/attic/sensor", '{"climate": {"temp": "warm"}}', "not_numeric"),
    ("home/attic/sensor", '{"climate": {"temp": 21.0}, "door": "ajar"}', "not_numeric"),
    ("home/attic/sensor", '{"climate": {"temp": [21.0]}}', "wrong_type"),
    ("home/attic/sensor", '{"climate": {"temp": {"value": 21.0}}}', "wrong_type"),
    ("home/attic/sensor", '{"climate": {"temp": 99.0}}', "out_of_range"),
    ("home/attic/sensor", '{"climate": {"temp": 1e400}}', "out_of_range"),
    ("home/attic/sensor", '{"climate": {"temp": NaN}}', "non_finite"),
    ("home/attic/sensor", '{"climate": ', "malformed_json"),
    ("home/attic/sensor", b'{"climate": "\xff"}', "invalid_utf8"),
    ("home/attic/sensor", '[21.0]', "not_an_object"),
    ("home/attic/sensor", '{"climate": {"temp": 21.0}, "pad": "' + "x" * 16_400 + '"}', "oversize"),
    ("home/at tic/sensor", '{"climate": {"temp": 21.0}}', "bad_device_id"),
    ("home/" + "a" * 60 + "/sensor", '{"climate": {"temp": 21.0}}', "bad_device_id"),  # the prefix makes it 65
    ("home/attic/other", '{"climate": {"temp": 21.0}}', "unknown_topic"),
])
def test_every_way_a_message_can_fail_is_a_dead_letter_with_its_reason(src, topic, payload, reason):
    letter = one(src, topic, payload)
    assert letter is not None and letter.reason == reason, letter
    assert letter.message and letter.origin == topic
    stored = src.store.deadletters(1)[0]
    assert (stored.reason, stored.origin) == (reason, topic)
    assert src.link.acked == [1]  # handled, so acknowledged


def test_a_message_without_any_number_is_no_fields_and_too_many_is_too_many(tmp_path):
    text = 'name = "flat"\n[source]\ntopic = "flat/{id}"\nothers = "keep"\n'
    src = source_with(tmp_path, text, limits=config.LimitsConfig(max_fields=3))
    assert one(src, "flat/a", '{"action": "single", "update": {"state": "idle"}}').reason == "no_fields"
    assert one(src, "flat/a", '{"a": 1, "b": 2, "c": 3, "d": 4}').reason == "too_many_fields"
    assert one(src, "flat/a", '{"bad name": 1}').reason == "bad_field_name"
    src.close()


def test_others_keep_flattens_numbers_and_booleans_and_drops_the_rest(tmp_path):
    text = 'name = "flat"\n[source]\ntopic = "flat/{id}"\nothers = "keep"\n'
    src = source_with(tmp_path, text)
    record = one(src, "flat/a", '{"t": 1, "on": true, "off": false, "s": "x", "n": null, "l": [1, 2], '
                                '"seq": 5, "ts": 6, "o": {"p": 2.5, "q": {"r": 3, "s": {"t": 4, "u": {"v": 5}}}}}')
    # Four levels of keys at most: deeper objects are dropped. seq and ts would be taken for the gateway's own.
    assert record.payload == {"t": 1.0, "on": 1.0, "off": 0.0, "o.p": 2.5, "o.q.r": 3.0, "o.q.s.t": 4.0}
    src.close()


def test_a_strict_profile_refuses_what_it_does_not_name(tmp_path):
    text = 'name = "s"\nstrict = true\n[source]\ntopic = "s/{id}"\nothers = "keep"\n[fields.a]\n'
    src = source_with(tmp_path, text)
    assert one(src, "s/x", '{"a": 1}').payload == {"a": 1.0}
    assert one(src, "s/x", '{"a": 1, "b": 2}').reason == "unknown_field"
    src.close()


def test_units_named_by_the_message_are_converted_or_refused():
    p = parse('name = "u"\n[source]\ntopic = "u/{id}"\n[fields.t]\npath = "T"\nunit = "degC"\nunit_path = "Unit"\n'
              'units = { C = {}, F = { scale = 0.5, offset = -16 } }\n')
    match = ProfileIndex([p]).router.route("u/x", ["u", "x"])
    assert match.reading(b'{"T": 20, "Unit": "C"}').fields == {"t": 20.0}
    assert match.reading(b'{"T": 70, "Unit": "F"}').fields == {"t": 19.0}
    for payload, reason in ((b'{"T": 20, "Unit": "K"}', "unknown_unit"), (b'{"T": 20}', "missing_path")):
        with pytest.raises(TelemetryError) as err:
            match.reading(payload)
        assert err.value.reason == reason


def test_a_value_payload_is_one_field_named_by_the_topic(tmp_path):
    text = ('name = "v"\n[source]\ntopic = "v/{id}/{field}"\npayload = "value"\nvalues = { ON = 1, OFF = 0 }\n'
            '[fields.power]\nscale = 1000.0\n')
    src = source_with(tmp_path, text)
    assert one(src, "v/a/temp", " 21.50\n").payload == {"temp": 21.5}
    assert one(src, "v/a/relay", "OFF").payload == {"relay": 0.0}
    assert one(src, "v/a/power", "1.5").payload == {"power": 1500.0}
    for payload, reason in (("nan", "non_finite"), ("inf", "non_finite"), ("", "not_numeric"),
                            ("1e999", "non_finite"), ("1e301", "out_of_range"), (b"\xff", "invalid_utf8")):
        assert one(src, "v/a/temp", payload).reason == reason, payload
    assert one(src, "v/a/bad name", "1").reason == "bad_field_name"
    assert one(src, "v/a/ts", "1").reason == "bad_field_name"
    src.close()


def test_the_rate_limit_applies_to_the_mapped_device(tmp_path):
    src = source_with(tmp_path, SENSOR, limits=config.LimitsConfig(per_source_rate=1.0, per_source_burst=2.0))
    results = [one(src, "home/attic/sensor", '{"climate": {"temp": 21.0}}') for _ in range(4)]
    assert [getattr(r, "reason", "ok") for r in results] == ["ok", "ok", "rate_limited", "rate_limited"]
    src.close()


def test_an_ignored_topic_is_acknowledged_and_leaves_nothing(src):
    assert one(src, "zigbee2mqtt/bridge/state", '{"state": "online"}') is None
    assert one(src, "zigbee2mqtt/lamp/set", '{"state": "ON"}') is None
    assert src.appended == [] and src.dead == []
    assert src.link.acked == [1, 2]


# --- compiling patterns --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, message", [
    ('topic = "tele/SENSOR"', "must name the device with {id}"),
    ('topic = "{id}/{id}"', "more than once"),
    ('topic = "z/{id#}/x"', "must be the last level"),
    ('topic = "tele/{id}/SEN#SOR"', "must be a name"),
    ('topic = "tele/{name}/x"', "must be a name"),
    ('topic = "$SYS/{id}"', "must be a name"),
    ('topic = "tele/{id}/x"\nid = "dev"', "must contain {id}"),
    ('topic = "tele/{id}/x"\nid = "a b-{id}"', "only A-Z"),
    ('topic = "tele/{id}/x"\npayload = "xml"', "payload must be one of"),
    ('topic = "tele/{id}/x"\nothers = "all"', "others must be one of"),
    ('topic = "tele/{id}/x"\npayload = "value"', "needs its field named once"),
    ('topic = "tele/{id}/{field}"', "are for payload = 'value'"),
    ('topic = "tele/{id}/x"\nvalues = { ON = "yes" }', "must map strings to numbers"),
    ('topic = "tele/{id}/x"\nqos = 1', "unknown setting 'qos'"),
    ('topic = "feeds/{id}/x"', "gateway's own"),
    ('topic = "devices/{id}/telemetry"', "gateway's own"),
    ('topic = "{id}/{field}"\npayload = "value"', "could match the gateway's own topics (alerts/+)"),
    ('topic = "{id}/+/+/+/+"', "could match the gateway's own topics (feeds/+/+/+/+)"),
    ('topic = "+/{id#}"', "could match the gateway's own topics"),
])
def test_a_bad_source_names_what_is_wrong(source, message):
    with pytest.raises(ProfileError, match=re.escape(message)):
        parse(f'name = "x"\n[source]\n{source}\n', "x.toml")


@pytest.mark.parametrize("fields, message", [
    ('[fields.a]\npath = "a..b"', "fields.a.path"),
    ('[fields.a]\nunit_path = "U"', "unit_path and units go together"),
    ('[fields.a]\nunit_path = "U"\nunits = { C = {} }\nscale = 2.0', "own scale and offset"),
    ('[fields.a]\nunit_path = "U"\nunits = { C = { scale = 0 } }', "scale not 0"),
    ('[fields.a]\noptional = "yes"', "optional must be true or false"),
    ('[fields.a]\ncolour = "red"', "unknown setting 'colour'"),
    ('[fields.ts]\n', "reserved"),
])
def test_a_bad_mapped_field_names_what_is_wrong(fields, message):
    with pytest.raises(ProfileError, match=message):
        parse(f'name = "x"\n[source]\ntopic = "t/{{id}}"\n{fields}\n', "x.toml")


def test_patterns_become_mqtt_filters_and_the_gateway_subscribes_to_them():
    router = ProfileIndex(list(DIALECTS.values())).router
    assert set(router.subscriptions) == {"tele/+/SENSOR", "zigbee2mqtt/#", "+/sensor/+/state",
                                         "+/binary_sensor/+/state"}
    subs = mqtt_settings(config.Config(), router.subscriptions).subscriptions
    assert subs[:2] == ("devices/+/telemetry", "users/+/follows") and set(router.subscriptions) <= set(subs)
    assert not ProfileIndex(load_dir(Path(config.Config().profiles_path()))).router  # none by default


def test_the_router_only_compares_a_topic_with_patterns_that_can_match_it():
    profiles = [parse(f'name = "p{i}"\n[source]\ntopic = "vendor{i}/{{id}}"\n') for i in range(500)]
    profiles.append(parse('name = "node"\n[source]\ntopic = "{id}/sensor/{field}/state"\npayload = "value"\n'))
    router = ProfileIndex(profiles).router
    assert router.route("vendor499/a", ["vendor499", "a"]).profile.name == "p499"
    assert router.route("vendor7/sensor/t/state", "vendor7/sensor/t/state".split("/")).profile.name == "node"
    assert router.route("elsewhere/a", ["elsewhere", "a"]) is None
    # One dict lookup by the first level, one by the number of levels: the 500 other patterns are never tried.
    assert len(router._by_first["vendor499"]) == 1 and len(router._by_depth[4]) == 1


def test_the_id_rule_is_the_gateways():
    assert mapping.ID.pattern == ID.pattern


def test_profiles_without_a_source_still_need_match():
    with pytest.raises(ProfileError, match="match must be a non-empty list"):
        parse('name = "x"\n[fields.a]\n')


# --- the shipped dialects, with messages from each project's documentation ---------------------------------------


def read(profile: str, topic: str, payload: str) -> tuple[str, dict[str, float]]:
    match = ProfileIndex([DIALECTS[profile]]).router.route(topic, topic.split("/"))
    assert match, topic
    return match.device_id(), match.reading(payload.encode()).fields


def reason(profile: str, topic: str, payload: str) -> str:
    with pytest.raises(TelemetryError) as err:
        read(profile, topic, payload)
    return err.value.reason


def test_tasmota_sensor_messages():
    """Tasmota publishes `tele/%topic%/SENSOR` every TelePeriod: the time, one object per sensor named by its
    driver, and the units (https://tasmota.github.io/docs/MQTT/ and the BME280 page; a BME280's message, as
    Home Assistant configurations read it with `value_json.BME280.Temperature` on `tele/tasmota_C26D46/SENSOR`)."""
    device, fields = read("tasmota", "tele/tasmota_C26D46/SENSOR",
                          '{"Time":"2024-05-01T12:00:00","BME280":{"Temperature":21.4,"Humidity":40.2,'
                          '"DewPoint":7.5,"Pressure":1013.2},"PressureUnit":"hPa","TempUnit":"C"}')
    assert device == "tasmota-tasmota_C26D46"
    assert fields == {"temperature": 21.4, "humidity": 40.2, "pressure": 1013.2, "BME280.DewPoint": 7.5}
    # SetOption8 1: Fahrenheit; converted, so a series never mixes units.
    _, fields = read("tasmota", "tele/t1/SENSOR", '{"Time":"2024-05-01T12:00:00","BME280":{"Temperature":70.7},'
                                                  '"TempUnit":"F"}')
    assert fields["temperature"] == pytest.approx(21.5)
    # Several DS18B20 probes: one object each, with a string Id (dropped) beside the number.
    _, fields = read("tasmota", "tele/t1/SENSOR", '{"Time":"2024-05-01T12:00:00","DS18B20-1":{"Id":"000008BD38BF",'
                                                  '"Temperature":26.1},"DS18B20-2":{"Id":"000008BD9714",'
                                                  '"Temperature":25.1},"TempUnit":"C"}')
    assert fields == {"DS18B20-1.Temperature": 26.1, "DS18B20-2.Temperature": 25.1}
    assert reason("tasmota", "tele/t1/SENSOR", '{"Time":"2024-05-01T12:00:00","BME280":{"Temperature":21.4},'
                                               '"TempUnit":"K"}') == "unknown_unit"
    assert reason("tasmota", "tele/t1/SENSOR", '{"Time":"2024-05-01T12:00:00","BME280":{"Temperature":"21,4"},'
                                               '"TempUnit":"C"}') == "not_numeric"
    assert reason("tasmota", "tele/t1/SENSOR", '{"Time":"2024-05-01T12:00:00"}') == "no_fields"


def test_zigbee2mqtt_device_messages():
    """zigbee2mqtt publishes a device's state as one JSON object on `zigbee2mqtt/FRIENDLY_NAME`, which is the IEEE
    address or the friendly_name, and may contain `/` ("kitchen/floor_light"); its examples: a temperature sensor
    `{"temperature": 27.34, "humidity": 44.72}`, a switch `{"action": "single"}`, a motion sensor
    `{"occupancy": true}`, a bulb `{"state": "ON", "brightness": 215, "color_temp": 325}`; `/set`, `/get`,
    `/availability` and `zigbee2mqtt/bridge/...` are other topics
    (https://www.zigbee2mqtt.io/guide/usage/mqtt_topics_and_messages.html)."""
    device, fields = read("zigbee2mqtt", "zigbee2mqtt/0x00158d0001a2b3c4",
                          '{"temperature": 21.5, "humidity": 45, "battery": 97, "linkquality": 120, '
                          '"occupancy": true, "contact": false}')
    assert device == "z2m-0x00158d0001a2b3c4"
    assert fields == {"temperature": 21.5, "humidity": 45.0, "battery": 97.0, "linkquality": 120.0,
                      "occupancy": 1.0, "contact": 0.0}
    assert read("zigbee2mqtt", "zigbee2mqtt/bulb", '{"state": "ON", "brightness": 215, "color_temp": 325, '
                '"color": {"x": 0.46, "y": 0.41}, "update": {"state": "idle"}}')[1] == {
        "state": 1.0, "brightness": 215.0, "color_temp": 325.0, "color.x": 0.46, "color.y": 0.41}
    assert reason("zigbee2mqtt", "zigbee2mqtt/switch", '{"action": "single"}') == "no_fields"
    assert reason("zigbee2mqtt", "zigbee2mqtt/bulb", '{"state": "TOGGLE"}') == "not_numeric"
    # Friendly names with a space or a slash are not renamed: a dead letter says which and why.
    assert reason("zigbee2mqtt", "zigbee2mqtt/living room", '{"temperature": 21.5}') == "bad_device_id"
    assert reason("zigbee2mqtt", "zigbee2mqtt/kitchen/floor_light", '{"state": "ON"}') == "bad_device_id"
    router = ProfileIndex([DIALECTS["zigbee2mqtt"]]).router
    for topic in ("zigbee2mqtt/bridge/state", "zigbee2mqtt/bridge/devices", "zigbee2mqtt/bridge/request/permit_join",
                  "zigbee2mqtt/bulb/set", "zigbee2mqtt/bulb/set/state", "zigbee2mqtt/bulb/get",
                  "zigbee2mqtt/bulb/availability", "zigbee2mqtt/kitchen/floor_light/set",
                  "zigbee2mqtt/kitchen/floor_light/availability"):
        assert router.route(topic, topic.split("/")) is False, topic


def test_esphome_state_topics():
    """ESPHome's MQTT component publishes each entity's state on `<topic_prefix>/<component type>/<object id>/state`
    (the prefix is the node name by default): a sensor's value as text with its accuracy_decimals ("21.50"), a
    binary sensor's as ON or OFF; the node's availability is `<topic_prefix>/status` (https://esphome.io/components/
    mqtt.html; esphome/components/mqtt/mqtt_component.cpp `get_default_topic_for_`, mqtt_binary_sensor.cpp)."""
    assert read("esphome", "livingroom/sensor/temperature/state", "21.50") == (
        "esphome-livingroom", {"temperature": 21.5})
    assert read("esphome", "livingroom/binary_sensor/motion/state", "ON") == ("esphome-livingroom", {"motion": 1.0})
    assert read("esphome", "livingroom/binary_sensor/motion/state", "OFF")[1] == {"motion": 0.0}
    assert reason("esphome", "livingroom/sensor/temperature/state", "nan") == "non_finite"  # no reading yet
    assert reason("esphome", "livingroom/binary_sensor/motion/state", "on") == "not_numeric"
    router = ProfileIndex([DIALECTS["esphome"]]).router
    assert router.route("livingroom/status", ["livingroom", "status"]) is None  # not subscribed either
    assert "+/status" not in router.subscriptions


def test_one_field_readings_score_as_the_fields_would_together():
    """ESPHome's readings carry one field each. The anomaly filter keeps a series per (device, field), so a field
    scores the same whether it arrives alone or beside the others; a reading's score is its fields' highest."""
    pytest.importorskip("onnxruntime")
    from firmware_sim.signals import DeviceSignal
    from gateway.filters.anomaly import AnomalyDetector
    from tests.unit.test_anomaly_filter import MODEL

    together, apart = AnomalyDetector(MODEL), AnomalyDetector(MODEL)
    signal = DeviceSignal("node-1", 7, "water")
    for _ in range(6):
        readings = [signal.next() for _ in range(64)]
        joint = together.score([("devices/esphome-node", r.fields, r.ts_ms) for r in readings])
        single = apart.score([("devices/esphome-node", {name: value}, r.ts_ms)
                              for r in readings for name, value in r.fields.items()])
        width = len(readings[0].fields)
        for i, verdict in enumerate(joint):
            assert verdict.score == max(v.score for v in single[i * width:(i + 1) * width])
