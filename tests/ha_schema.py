"""Home Assistant's documented rules for MQTT discovery of sensors and binary sensors, as a checker for tests.

Written from Home Assistant's documentation (home-assistant.io; its source is github.com/home-assistant/home-assistant.io,
read at the versions current in 2025-2026), not from Home Assistant's code:

- the discovery topic, payload, abbreviations and origin:
  https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery
  (`<discovery_prefix>/<component>/[<node_id>/]<object_id>/config`, ids of `[a-zA-Z0-9_-]`; a JSON object whose
  required options are present; abbreviated option names stand for the full ones; `platform` only in device-based
  discovery; `origin` needs a `name`)
- the options of an MQTT sensor and binary sensor, which are required, and the `device` and `availability` maps:
  https://www.home-assistant.io/integrations/sensor.mqtt/ and https://www.home-assistant.io/integrations/binary_sensor.mqtt/
  (`state_topic` required; `availability` a list of maps with a `topic`, not together with `availability_topic`;
  `device` needs `identifiers` or `connections`, and works only with a `unique_id`)
- the device classes and, for sensors, the units each accepts:
  https://www.home-assistant.io/integrations/sensor/#device-class and
  https://www.home-assistant.io/integrations/binary_sensor/#device-class
- state classes: https://developers.home-assistant.io/docs/core/entity/sensor/#available-state-classes

Home Assistant ignores options it does not know; this checker refuses them, so that a misspelt option (which Home
Assistant would silently drop) fails a test.
"""

from __future__ import annotations

import re
from typing import Any

TOPIC = re.compile(r"^(?P<prefix>.+)/(?P<component>[a-z_]+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?"
                   r"(?P<object_id>[a-zA-Z0-9_-]+)/config$")

# Abbreviations the documentation lists, for the options these two platforms have.
ABBREVIATIONS = {
    "avty": "availability", "avty_mode": "availability_mode", "avty_t": "availability_topic",
    "avty_tpl": "availability_template", "dev": "device", "dev_cla": "device_class", "e": "encoding",
    "en": "enabled_by_default", "ent_cat": "entity_category", "ent_pic": "entity_picture", "exp_aft": "expire_after",
    "frc_upd": "force_update", "ic": "icon", "json_attr_t": "json_attributes_topic",
    "json_attr_tpl": "json_attributes_template", "lrst_val_tpl": "last_reset_value_template", "o": "origin",
    "obj_id": "object_id", "off_dly": "off_delay", "ops": "options", "p": "platform",
    "pl_avail": "payload_available", "pl_not_avail": "payload_not_available", "pl_off": "payload_off",
    "pl_on": "payload_on", "stat_cla": "state_class", "stat_t": "state_topic",
    "sug_dsp_prc": "suggested_display_precision", "t": "topic", "uniq_id": "unique_id",
    "unit_of_meas": "unit_of_measurement", "val_tpl": "value_template",
}
DEVICE_ABBREVIATIONS = {"cu": "configuration_url", "cns": "connections", "ids": "identifiers", "mf": "manufacturer",
                        "mdl": "model", "mdl_id": "model_id", "hw": "hw_version", "sw": "sw_version",
                        "sa": "suggested_area", "sn": "serial_number"}
ORIGIN_ABBREVIATIONS = {"sw": "sw_version", "url": "support_url"}

COMMON_OPTIONS = {
    "availability", "availability_mode", "availability_template", "availability_topic", "device", "device_class",
    "enabled_by_default", "encoding", "entity_category", "entity_picture", "expire_after", "force_update", "icon",
    "json_attributes_template", "json_attributes_topic", "name", "object_id", "payload_available",
    "payload_not_available", "platform", "qos", "state_topic", "unique_id", "value_template",
    "origin", "~",  # discovery payload options
}
SENSOR_OPTIONS = COMMON_OPTIONS | {"last_reset_value_template", "options", "state_class",
                                   "suggested_display_precision", "unit_of_measurement"}
BINARY_SENSOR_OPTIONS = COMMON_OPTIONS | {"off_delay", "payload_off", "payload_on"}
DEVICE_OPTIONS = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
                  "model_id", "name", "serial_number", "suggested_area", "sw_version", "via_device"}
AVAILABILITY_OPTIONS = {"payload_available", "payload_not_available", "topic", "value_template"}
ORIGIN_OPTIONS = {"name", "sw_version", "support_url"}

_PRESSURE = {"Pa", "kPa", "hPa", "bar", "cbar", "mbar", "mmHg", "inHg", "psi"}
_ENERGY = {"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh", "cal", "kcal", "Mcal", "Gcal"}
_VOLUME = {"L", "mL", "gal", "fl. oz.", "m³", "ft³", "CCF"}
_UG_M3 = {"µg/m³"}
# Sensor device classes and the units the documentation lists for each (None: no unit).
SENSOR_CLASS_UNITS: dict[str, set[str | None]] = {
    "absolute_humidity": {"g/m³", "mg/m³"},
    "apparent_power": {"mVA", "VA"},
    "aqi": {None},
    "area": {"m²", "cm²", "km²", "mm²", "in²", "ft²", "yd²", "mi²", "ac", "ha"},
    "atmospheric_pressure": _PRESSURE,
    "battery": {"%"},
    "blood_glucose_concentration": {"mg/dL", "mmol/L"},
    "carbon_dioxide": {"ppm"},
    "carbon_monoxide": {"ppm"},
    "current": {"A", "mA"},
    "data_rate": {"bit/s", "kbit/s", "Mbit/s", "Gbit/s", "B/s", "kB/s", "MB/s", "GB/s", "KiB/s", "MiB/s", "GiB/s"},
    "data_size": {"bit", "kbit", "Mbit", "Gbit", "B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB", "KiB", "MiB",
                  "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"},
    "date": {None},
    "distance": {"km", "m", "cm", "mm", "mi", "nmi", "yd", "in"},
    "duration": {"d", "h", "min", "s", "ms", "µs"},
    "energy": _ENERGY,
    "energy_distance": {"kWh/100km", "Wh/km", "mi/kWh", "km/kWh"},
    "energy_storage": _ENERGY,
    "enum": {None},
    "frequency": {"Hz", "kHz", "MHz", "GHz"},
    "gas": {"L", "m³", "ft³", "CCF"},
    "humidity": {"%"},
    "illuminance": {"lx"},
    "irradiance": {"W/m²", "BTU/(h⋅ft²)"},
    "moisture": {"%"},
    "nitrogen_dioxide": _UG_M3,
    "nitrogen_monoxide": _UG_M3,
    "nitrous_oxide": _UG_M3,
    "ozone": _UG_M3,
    "ph": {None},
    "pm1": _UG_M3,
    "pm25": _UG_M3,
    "pm10": _UG_M3,
    "power_factor": {None, "%"},
    "power": {"mW", "W", "kW", "MW", "GW", "TW"},
    "precipitation": {"cm", "in", "mm"},
    "precipitation_intensity": {"in/d", "in/h", "mm/d", "mm/h"},
    "pressure": _PRESSURE,
    "reactive_energy": {"varh", "kvarh"},
    "reactive_power": {"var", "kvar"},
    "signal_strength": {"dB", "dBm"},
    "sound_pressure": {"dB", "dBA"},
    "speed": {"ft/s", "in/d", "in/h", "in/s", "km/h", "kn", "m/s", "mph", "mm/d", "mm/s"},
    "sulphur_dioxide": _UG_M3,
    "temperature": {"°C", "°F", "K"},
    "timestamp": {None},
    "volatile_organic_compounds": {"µg/m³", "mg/m³"},
    "volatile_organic_compounds_parts": {"ppm", "ppb"},
    "voltage": {"V", "mV", "µV", "kV", "MV"},
    "volume": _VOLUME,
    "volume_flow_rate": {"m³/h", "m³/s", "ft³/min", "L/h", "L/min", "L/s", "gal/min", "mL/s"},
    "volume_storage": _VOLUME,
    "water": {"L", "gal", "m³", "ft³", "CCF"},
    "weight": {"kg", "g", "mg", "µg", "oz", "lb", "st"},
    "wind_direction": {"°"},
    "wind_speed": {"Beaufort", "ft/s", "km/h", "kn", "m/s", "mph"},
}
BINARY_SENSOR_CLASSES = {
    "battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door", "garage_door", "gas", "heat",
    "light", "lock", "moisture", "motion", "moving", "occupancy", "opening", "plug", "power", "presence", "problem",
    "running", "safety", "smoke", "sound", "tamper", "update", "vibration", "window",
}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}


class SchemaError(AssertionError):
    pass


def _fail(config: Any, why: str) -> None:
    raise SchemaError(f"{why}: {config!r}")


def check_topic(topic: str, component: str, prefix: str = "homeassistant") -> dict[str, str]:
    """The parts of a single-component discovery topic, checked; SchemaError when it is not one."""
    m = TOPIC.fullmatch(topic)
    if m is None or m["prefix"] != prefix or m["component"] != component:
        _fail(topic, f"not a {component} discovery topic under {prefix}/")
    return {k: v for k, v in m.groupdict().items() if v is not None}


def expand(config: dict[str, Any]) -> dict[str, Any]:
    """The payload with abbreviated option names replaced by the full ones, and `~` put into the topics."""
    out = {ABBREVIATIONS.get(k, k): v for k, v in config.items()}
    if isinstance(out.get("device"), dict):
        out["device"] = {DEVICE_ABBREVIATIONS.get(k, k): v for k, v in out["device"].items()}
    if isinstance(out.get("origin"), dict):
        out["origin"] = {ORIGIN_ABBREVIATIONS.get(k, k): v for k, v in out["origin"].items()}
    if isinstance(out.get("availability"), list):
        out["availability"] = [{ABBREVIATIONS.get(k, k): v for k, v in a.items()} if isinstance(a, dict) else a
                               for a in out["availability"]]
    base = out.get("~")
    if isinstance(base, str):
        for key, value in out.items():
            if key.endswith("_topic") and isinstance(value, str):
                if value.startswith("~"):
                    out[key] = base + value[1:]
                elif value.endswith("~"):
                    out[key] = value[:-1] + base
    return out


def _check_common(config: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    if not isinstance(config, dict):
        _fail(config, "a discovery payload is a JSON object")
    c = expand(config)
    unknown = set(c) - allowed
    if unknown:
        _fail(config, f"options Home Assistant does not know: {sorted(unknown)}")
    if "platform" in c:
        _fail(config, "`platform` belongs to device-based discovery only")
    topic = c.get("state_topic")
    if not isinstance(topic, str) or not topic or any(ch in topic for ch in "+#"):
        _fail(config, "state_topic is required: a topic to publish to (no wildcards)")
    if "qos" in c and c["qos"] not in (0, 1, 2):
        _fail(config, "qos is 0, 1 or 2")
    for key in ("name", "unique_id", "value_template", "payload_available", "payload_not_available"):
        if key in c and not isinstance(c[key], str):
            _fail(config, f"{key} is a string")
    if "availability" in c:
        if "availability_topic" in c:
            _fail(config, "availability and availability_topic must not be used together")
        if not isinstance(c["availability"], list) or not c["availability"]:
            _fail(config, "availability is a list")
        for entry in c["availability"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("topic"), str) or not entry["topic"]:
                _fail(config, "each availability entry has a topic")
            if set(entry) - AVAILABILITY_OPTIONS:
                _fail(config, f"unknown availability options {sorted(set(entry) - AVAILABILITY_OPTIONS)}")
    if c.get("availability_mode", "latest") not in ("all", "any", "latest"):
        _fail(config, "availability_mode is all, any or latest")
    if "device" in c:
        dev = c["device"]
        if not isinstance(dev, dict) or set(dev) - DEVICE_OPTIONS:
            _fail(config, "device is a map of the documented device options")
        if not dev.get("identifiers") and not dev.get("connections"):
            _fail(config, "device needs identifiers or connections")
        ids = dev.get("identifiers")
        if ids is not None and not (isinstance(ids, str) or (isinstance(ids, list)
                                                             and all(isinstance(i, str) for i in ids))):
            _fail(config, "device identifiers is a string or a list of strings")
        if "unique_id" not in c:
            _fail(config, "a device block works only with a unique_id")
    if "origin" in c:
        origin = c["origin"]
        if not isinstance(origin, dict) or not isinstance(origin.get("name"), str) or set(origin) - ORIGIN_OPTIONS:
            _fail(config, "origin is a map with a name")
    if c.get("entity_category") not in (None, "diagnostic", "config"):
        _fail(config, "entity_category is diagnostic or config")
    return c


def check_sensor(config: dict[str, Any]) -> dict[str, Any]:
    """An MQTT sensor discovery payload as the documentation describes it; returns it expanded."""
    c = _check_common(config, SENSOR_OPTIONS)
    klass = c.get("device_class")
    unit = c.get("unit_of_measurement")
    if unit is not None and not isinstance(unit, str):
        _fail(config, "unit_of_measurement is a string")
    if klass is not None:
        if klass not in SENSOR_CLASS_UNITS:
            _fail(config, f"{klass!r} is not a sensor device class")
        if klass != "monetary" and unit not in SENSOR_CLASS_UNITS[klass]:
            _fail(config, f"unit {unit!r} is not one of {klass}'s units {SENSOR_CLASS_UNITS[klass]}")
    if "state_class" in c and c["state_class"] not in STATE_CLASSES:
        _fail(config, f"state_class is one of {sorted(STATE_CLASSES)}")
    if "options" in c and (klass != "enum" or "state_class" in c or unit is not None):
        _fail(config, "options needs device_class enum and no state_class or unit")
    return c


def check_binary_sensor(config: dict[str, Any]) -> dict[str, Any]:
    """An MQTT binary sensor discovery payload as the documentation describes it; returns it expanded."""
    c = _check_common(config, BINARY_SENSOR_OPTIONS)
    if "device_class" in c and c["device_class"] is not None and c["device_class"] not in BINARY_SENSOR_CLASSES:
        _fail(config, f"{c['device_class']!r} is not a binary sensor device class")
    for key in ("payload_on", "payload_off"):
        if key in c and not isinstance(c[key], str):
            _fail(config, f"{key} is a string")
    return c
