import pytest

from devices.profiles import BUILTIN_DIR, ProfileError, ProfileIndex, load_dir, parse
from devices.telemetry import Telemetry, TelemetryError

PROFILE = """
name = "pump"
match = ["pump-*"]
strict = true
[fields.flow]
unit = "l/min"
min = 0
max = 500
[fields.starts]
type = "int"
"""


def test_a_profile_checks_ranges_types_and_unknown_fields():
    p = parse(PROFILE)
    p.check(Telemetry(1, None, {"flow": 120.0, "starts": 3.0}))
    with pytest.raises(TelemetryError, match="outside") as err:
        p.check(Telemetry(1, None, {"flow": 501.0}))
    assert err.value.reason == "out_of_range"
    with pytest.raises(TelemetryError) as err:
        p.check(Telemetry(1, None, {"starts": 2.5}))
    assert err.value.reason == "wrong_type"
    with pytest.raises(TelemetryError) as err:
        p.check(Telemetry(1, None, {"rpm": 2.0}))
    assert err.value.reason == "unknown_field"


@pytest.mark.parametrize(
    "text, message",
    [
        ('match = ["x"]', "name"),
        ('name = "x"', "match"),
        ('name = "x"\nmatch = ["x"]\n[fields.a]\nmin = "low"', "fields.a.min"),
        ('name = "x"\nmatch = ["x"]\n[fields.a]\nmin = 5\nmax = 1', "above max"),
        ('name = "x"\nmatch = ["x"]\n[fields.a]\ntype = "complex"', "fields.a.type"),
        ("name = ", "pump.toml"),
        ('name = "x"\nmatch = ["x"]\nmanufacturer = 3', "manufacturer"),
    ],
)
def test_profile_errors_name_the_field(text, message):
    with pytest.raises(ProfileError, match=message):
        parse(text, "pump.toml")


def test_a_profile_may_name_the_manufacturer_and_model():
    p = parse(PROFILE.replace('strict = true', 'strict = true\nmanufacturer = "Acme"\nmodel = "Flow 3"'))
    assert (p.manufacturer, p.model) == ("Acme", "Flow 3")
    assert (parse(PROFILE).manufacturer, parse(PROFILE).model) == ("", "")


def test_the_index_finds_a_profile_by_device_id_pattern():
    index = ProfileIndex([parse(PROFILE)])
    assert index.get("pump-7").name == "pump"
    assert index.get("dev-0001") is None


def test_the_builtin_profiles_load():
    assert {p.name for p in load_dir(BUILTIN_DIR)} >= {"env-sensor"}


def test_fields_sent_as_words_are_states_the_anomaly_model_leaves_alone_unless_a_field_says_otherwise():
    p = parse('name = "door"\nmatch = ["door-*"]\n'
              '[fields.temperature]\n'
              '[fields.contact]\nvalues = { OPEN = 1, CLOSED = 0 }\n'
              '[fields.mode]\nvalues = { ECO = 0, COMFORT = 1, BOOST = 2 }\nanomaly = true\n'
              '[fields.energy_kwh]\nanomaly = false\n')
    assert [(f.name, f.anomaly) for f in p.fields] == [("temperature", True), ("contact", False), ("mode", True),
                                                      ("energy_kwh", False)]
    assert p.unscored == frozenset({"contact", "energy_kwh"})
    assert parse(PROFILE).unscored == frozenset()
    with pytest.raises(ProfileError, match="fields.contact.anomaly must be true or false"):
        parse('name = "door"\nmatch = ["door-*"]\n[fields.contact]\nanomaly = "no"\n', "door.toml")


def test_the_zigbee2mqtt_dialect_leaves_its_binary_states_to_home_assistant_not_the_anomaly_model():
    z2m = next(p for p in load_dir(BUILTIN_DIR.parent / "dialects") if p.name == "zigbee2mqtt")
    assert {"state", "contact", "occupancy", "water_leak"} <= z2m.unscored
    assert not {"temperature", "humidity", "battery", "linkquality"} & z2m.unscored


def test_a_dialect_profile_is_the_profile_of_the_ids_its_sources_make():
    dialects = load_dir(BUILTIN_DIR.parent / "dialects")
    index = ProfileIndex(dialects)
    assert index.get("z2m-0x00158d0001a2b3c4").name == "zigbee2mqtt"
    assert index.get("esphome-hall").name == "esphome"
    assert index.get("tasmota-plug").name == "tasmota"
    assert index.get("z2m-") is None, "a prefix alone names no device"
    assert index.get("dev-0001") is None
    bare = parse('name = "bare"\n[source]\ntopic = "bare/{id}/state"\npayload = "json"\n')
    assert not bare.applies_to("anything"), "ids that are the bare names would claim every device"
