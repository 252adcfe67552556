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
