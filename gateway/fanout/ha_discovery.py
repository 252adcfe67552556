"""What the gateway tells Home Assistant about a device: MQTT discovery topics and payloads, pure functions.

Home Assistant's MQTT integration creates an entity for every config published under its discovery prefix
(https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery); one config per entity ("single component
discovery", understood by every Home Assistant release with MQTT discovery):

    {prefix}/sensor/{node}/{device}__{field}/config          a sensor per field: unit and device class from the profile
    {prefix}/binary_sensor/{node}/{device}__anomaly/config   device class `problem`: on during an anomaly episode
    gateway/ha/{device}/state       retained: the latest value of every field the device sent, {"temperature": 21.4}
    gateway/ha/{device}/anomaly     retained: ON from an anomaly episode's start to its end, else OFF
    gateway/status                  retained online/offline and the gateway's last will: every entity's availability

`node` is the gateway's client id and `unique_id` is `{client id}/{device}/{field}`, so two gateways on one broker
never claim each other's entities. Topic levels of a discovery topic may hold only `[a-zA-Z0-9_-]`, while ids may also
hold `.` (and a client id anything): `object_id` escapes `_` as `_u`, `.` as `_d` and anything else as `_xHHHH`, and
joins device and field with `__`, which no escaped id contains, so different (device, field) pairs never share a
topic. The common id stays readable: `env-0001__temperature`.

The state topics are outside the discovery prefix: Home Assistant subscribes to everything under it and would parse
every reading as a candidate config.

Units. Home Assistant accepts a device class only with one of the units its sensor page lists for that class
(https://www.home-assistant.io/integrations/sensor/#device-class), spelled its way (`°C`, not `degC`). A profile's
unit is translated to that spelling where it has one, and the device class is chosen from the unit, with the field's
name deciding where a unit fits several classes (`%`: humidity, battery or moisture; `ppm`: carbon dioxide or
monoxide). A unit without a class is passed on as it is, with no device class: Home Assistant shows it and keeps
long-term statistics (`state_class: measurement`) all the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from devices.profiles import DeviceProfile
from gateway.event import compact_json

STATE_ROOT = "gateway/ha"
ANOMALY_ON, ANOMALY_OFF = b"ON", b"OFF"
NOT_FIELDS = frozenset({"seq", "ts"})  # what a reading carries besides its measurements

# A profile's unit as Home Assistant spells it, where the spellings differ.
_SPELLING = {
    "degC": "°C", "C": "°C", "celsius": "°C", "degF": "°F", "F": "°F", "fahrenheit": "°F",
    "%RH": "%", "%rh": "%", "RH": "%", "percent": "%",
    "uV": "µV", "ug/m3": "µg/m³", "µg/m3": "µg/m³", "lux": "lx", "kmh": "km/h", "km/hr": "km/h",
}

# Units that name what is measured by themselves (Home Assistant's sensor device classes and their units).
_CLASS_OF_UNIT = {
    **dict.fromkeys(("°C", "°F", "K"), "temperature"),
    **dict.fromkeys(("Pa", "kPa", "hPa", "bar", "cbar", "mbar", "mmHg", "inHg", "psi"), "pressure"),
    **dict.fromkeys(("V", "mV", "µV", "kV", "MV"), "voltage"),
    **dict.fromkeys(("A", "mA"), "current"),
    **dict.fromkeys(("W", "kW", "MW", "GW", "TW"), "power"),
    **dict.fromkeys(("Hz", "kHz", "MHz", "GHz"), "frequency"),
    "lx": "illuminance",
    "dBm": "signal_strength",
    "dBA": "sound_pressure",
    **dict.fromkeys(("m/s", "km/h", "mph", "kn", "ft/s"), "speed"),
    **dict.fromkeys(("km", "m", "cm", "mm", "mi", "yd", "in"), "distance"),
    **dict.fromkeys(("d", "h", "min", "s", "ms"), "duration"),
}

# Units shared by several classes: the first (class, words) whose word is in the field's name decides; none, no class.
_CLASS_BY_NAME = {
    "%": (("humidity", ("humid", "rh")), ("battery", ("batt",)), ("moisture", ("moist", "soil"))),
    "ppm": (("carbon_dioxide", ("co2", "carbon_dioxide")), ("carbon_monoxide", ("co", "carbon_monoxide"))),
    "µg/m³": (("pm25", ("pm25", "pm2_5", "pm2.5")), ("pm10", ("pm10",)), ("pm1", ("pm1",))),
    "dB": (("signal_strength", ("rssi", "signal", "snr")), ("sound_pressure", ("sound", "noise"))),
}


def ha_unit(unit: str) -> str:
    return _SPELLING.get(unit, unit)


def device_class(field: str, unit: str) -> str | None:
    """The sensor device class of a field with this (profile) unit, or None when there is none to be sure of."""
    spelled = ha_unit(unit)
    if unit in ("%RH", "%rh", "RH"):
        return "humidity"
    name = field.lower()
    words = set(re.split(r"[^a-z0-9]+", name))
    for klass, hints in _CLASS_BY_NAME.get(spelled, ()):
        if any(h in words or (len(h) > 2 and h in name) for h in hints):
            return klass
    klass = _CLASS_OF_UNIT.get(spelled)
    if klass == "speed" and "wind" in name:
        return "wind_speed"
    return klass


_UNSAFE = re.compile(r"[^A-Za-z0-9-]")


def object_id(*parts: str) -> str:
    """A discovery topic level (`[a-zA-Z0-9_-]` only) that differs whenever `parts` differ (see the module doc)."""
    return "__".join(_UNSAFE.sub(_escape, p) for p in parts)


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return "_u" if c == "_" else "_d" if c == "." else f"_x{ord(c):04x}"


@dataclass(frozen=True, slots=True)
class Discovery:
    """Topics and configs for one gateway: its client id, Home Assistant's discovery prefix, its status topic."""

    prefix: str
    client_id: str
    availability_topic: str
    origin_version: str = ""
    expire_after: int = 0  # seconds without a state before Home Assistant shows a sensor unavailable; 0: never

    def state_topic(self, device: str) -> bytes:
        return f"{STATE_ROOT}/{device}/state".encode()

    def anomaly_topic(self, device: str) -> bytes:
        return f"{STATE_ROOT}/{device}/anomaly".encode()

    def sensor_topic(self, device: str, field: str) -> bytes:
        return f"{self.prefix}/sensor/{object_id(self.client_id)}/{object_id(device, field)}/config".encode()

    def anomaly_config_topic(self, device: str) -> bytes:
        return f"{self.prefix}/binary_sensor/{object_id(self.client_id)}/{object_id(device, 'anomaly')}/config".encode()

    def retained_topics(self, device: str, fields: frozenset[str]) -> list[bytes]:
        """Every retained topic the gateway may have published for the device, having announced these fields: what
        an empty retained message on each removes from the broker and, for a config, from Home Assistant."""
        return [*(self.sensor_topic(device, f) for f in sorted(fields)), self.anomaly_config_topic(device),
                self.state_topic(device), self.anomaly_topic(device)]

    def _common(self, device: str, profile: DeviceProfile | None) -> dict[str, Any]:
        dev: dict[str, Any] = {"identifiers": [f"{self.client_id}/{device}"], "name": device}
        if profile is not None:
            if profile.manufacturer:
                dev["manufacturer"] = profile.manufacturer
            dev["model"] = profile.model or profile.name
        origin: dict[str, Any] = {"name": "edge-gateway"}
        if self.origin_version:
            origin["sw_version"] = self.origin_version
        return {
            "availability": [{"topic": self.availability_topic, "payload_available": "online",
                              "payload_not_available": "offline"}],
            "device": dev,
            "origin": origin,
            "qos": 1,
        }

    def sensor_config(self, device: str, field: str, profile: DeviceProfile | None) -> bytes:
        """One field of a device as a Home Assistant sensor. The value template reads the field from the device's
        state; `default('')` keeps a field the device has not sent yet unknown instead of logging a template
        warning (Home Assistant ignores an empty value for a numeric sensor)."""
        spec = profile.field(field) if profile is not None else None
        config: dict[str, Any] = {
            "name": field,
            "unique_id": f"{self.client_id}/{device}/{field}",
            "state_topic": self.state_topic(device).decode(),
            "value_template": f"{{{{ value_json['{field}'] | default('') }}}}",
            "state_class": "measurement",
        }
        if self.expire_after:
            config["expire_after"] = self.expire_after
        if spec is not None and spec.unit:
            config["unit_of_measurement"] = ha_unit(spec.unit)
            klass = device_class(field, spec.unit)
            if klass is not None:
                config["device_class"] = klass
        config.update(self._common(device, profile))
        return compact_json(config)

    def anomaly_config(self, device: str, profile: DeviceProfile | None) -> bytes:
        config: dict[str, Any] = {
            "name": "Anomaly",
            "unique_id": f"{self.client_id}/{device}/anomaly",
            "state_topic": self.anomaly_topic(device).decode(),
            "payload_on": ANOMALY_ON.decode(),
            "payload_off": ANOMALY_OFF.decode(),
            "device_class": "problem",
        }
        config.update(self._common(device, profile))
        return compact_json(config)


def fields_of(profile: DeviceProfile | None) -> frozenset[str]:
    """The fields every device of the profile has: its optional ones (a dialect lists every field a kind of device
    may send, a door sensor sends few of them) get their sensor when the device first sends them."""
    return frozenset(f.name for f in profile.fields if not f.optional) if profile is not None else frozenset()
