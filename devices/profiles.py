"""Device profiles: what a kind of device sends, in which units, within which ranges.

A device needs no profile to be accepted; a profile adds meaning and checks. Profiles are TOML files::

    name = "env-sensor"
    match = ["env-*"]            # device ids this profile applies to (shell-style patterns)
    strict = false               # true: fields not listed here are rejected
    manufacturer = "Acme"        # optional: who makes it, and its model (shown by Home Assistant; the model
    model = "EnviroSense 2"      # defaults to the profile's name)

    [fields.temperature]
    unit = "degC"
    min = -40.0
    max = 85.0

A profile may also say how devices that speak another dialect (Tasmota, zigbee2mqtt, ESPHome) become readings: a
`[source]` table with their topic pattern, and `path`, `values`, `unit_path`/`units` in its fields
(devices/mapping.py). Such a profile needs no `match`: it applies to the devices of its topics.

Parsing (`parse`) is separate from reading files (`load_dir`) so that tests and `check-config` share it.
"""

from __future__ import annotations

import fnmatch
import tomllib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from devices import mapping
from devices.mapping import Conversion, MappingError, Router, Source
from devices.telemetry import RESERVED, Telemetry, TelemetryError

BUILTIN_DIR = Path(__file__).resolve().parent / "profiles"
# Profiles for devices that speak another dialect, shipped but not loaded: copy one into the profiles folder.
DIALECTS_DIR = Path(__file__).resolve().parent / "dialects"


class ProfileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    type: str = "float"  # "float" or "int"
    unit: str = ""
    min: float | None = None
    max: float | None = None
    scale: float = 1.0  # serial encodings send integers; value = raw * scale
    # What only foreign payloads use (devices/mapping.py): value = raw * scale + offset.
    offset: float = 0.0
    path: tuple[str, ...] = ()  # where the value is in a JSON payload; () is the field's own name
    optional: bool = False  # a message without it is still a reading (else: dead letter `missing_path`)
    values: Mapping[str, float] | None = None  # strings the device sends for numbers: { ON = 1, OFF = 0 }
    unit_path: tuple[str, ...] = ()  # where the message names its unit
    units: tuple[tuple[str, Conversion], ...] = ()  # each unit the device may use, converted to `unit`
    # Scored by the anomaly model. A field sent as words (`values`: ON/OFF) is a state, not a measurement: a door
    # contact holding its state for hours is not a stuck sensor, so such a field is not scored unless it says so.
    anomaly: bool = True


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    name: str
    match: tuple[str, ...]
    fields: tuple[FieldSpec, ...]
    strict: bool = False
    sources: tuple[Source, ...] = ()  # topics of devices that speak another dialect (devices/mapping.py)
    manufacturer: str = ""  # for Home Assistant's device registry (gateway/fanout/ha_discovery.py)
    model: str = ""
    # The fields the anomaly model leaves alone (`anomaly = false`): derived from `fields`, kept for the hot path.
    unscored: frozenset[str] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unscored", frozenset(f.name for f in self.fields if not f.anomaly))

    def applies_to(self, device_id: str) -> bool:
        """Its `match` covers the id, or one of its dialect sources makes such ids (`id = "z2m-{id}"`: every id with
        that prefix; a source whose ids are the bare names claims none this way)."""
        return any(fnmatch.fnmatchcase(device_id, pattern) for pattern in self.match) or any(
            (s.id_prefix or s.id_suffix) and len(device_id) > len(s.id_prefix) + len(s.id_suffix)
            and device_id.startswith(s.id_prefix) and device_id.endswith(s.id_suffix) for s in self.sources)

    def field(self, name: str) -> FieldSpec | None:
        for spec in self.fields:
            if spec.name == name:
                return spec
        return None

    def check(self, t: Telemetry) -> None:
        """Raise TelemetryError when a reading breaks the profile (unknown field in strict mode, out of range)."""
        for name, value in t.fields.items():
            spec = self.field(name)
            if spec is None:
                if self.strict:
                    raise TelemetryError("unknown_field", f"field {name!r} is not in profile {self.name!r}")
                continue
            if spec.type == "int" and value != int(value):
                raise TelemetryError("wrong_type", f"field {name!r} must be an integer in profile {self.name!r}")
            if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
                raise TelemetryError(
                    "out_of_range",
                    f"field {name!r}={value} is outside [{spec.min}, {spec.max}] {spec.unit} of {self.name!r}",
                )


def parse(text: str, origin: str = "<profile>") -> DeviceProfile:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{origin}: {exc}") from None
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{origin}: name must be a non-empty string, got {name!r}")
    raw_sources = doc.get("source", [])
    raw_sources = [raw_sources] if isinstance(raw_sources, dict) else raw_sources
    if not isinstance(raw_sources, list):
        raise ProfileError(f"{origin}: source must be a table ([source]) or tables ([[source]])")
    try:
        sources = tuple(mapping.compile_source(raw, f"source[{i}]" if len(raw_sources) > 1 else "source")
                        for i, raw in enumerate(raw_sources))
    except MappingError as exc:
        raise ProfileError(f"{origin}: {exc}") from None
    # A dialect's profile applies to the devices of its topics; `match` (device ids on devices/{id}/telemetry and
    # serial ports) is then optional.
    match = doc.get("match", [])
    if not isinstance(match, list) or not all(isinstance(m, str) for m in match) or not (match or sources):
        raise ProfileError(f"{origin}: match must be a non-empty list of patterns, got {match!r}")
    raw_fields = doc.get("fields", {})
    if not isinstance(raw_fields, dict):
        raise ProfileError(f"{origin}: fields must be a table")
    fields = tuple(_field(origin, key, spec) for key, spec in raw_fields.items())
    if sources:
        for spec in fields:
            if spec.name in RESERVED:
                raise ProfileError(f"{origin}: fields.{spec.name}: {spec.name!r} is reserved (seq, ts)")
            if spec.unit_path and any(s.payload == "value" for s in sources):
                raise ProfileError(f"{origin}: fields.{spec.name}.unit_path: a value payload has no unit to read")
    strict = doc.get("strict", False)
    if not isinstance(strict, bool):
        raise ProfileError(f"{origin}: strict must be true or false, got {strict!r}")
    about = {}
    for key in ("manufacturer", "model"):
        value = doc.get(key, "")
        if not isinstance(value, str):
            raise ProfileError(f"{origin}: {key} must be a string, got {value!r}")
        about[key] = value
    unknown = set(doc) - {"name", "match", "strict", "fields", "source", "manufacturer", "model"}
    if unknown:
        raise ProfileError(f"{origin}: unknown setting {sorted(unknown)[0]!r}")
    return DeviceProfile(name, tuple(match), fields, strict, sources, about["manufacturer"], about["model"])


def _field(origin: str, name: str, spec: Any) -> FieldSpec:
    if not isinstance(spec, dict):
        raise ProfileError(f"{origin}: fields.{name} must be a table")
    kind = spec.get("type", "float")
    if kind not in ("float", "int"):
        raise ProfileError(f"{origin}: fields.{name}.type must be 'float' or 'int', got {kind!r}")
    bounds = {}
    for key in ("min", "max", "scale"):
        value = spec.get(key)
        if value is not None and (type(value) not in (int, float) or not -1e300 <= value <= 1e300):
            raise ProfileError(f"{origin}: fields.{name}.{key} must be a finite number, got {value!r}")
        bounds[key] = None if value is None else float(value)
    if bounds["min"] is not None and bounds["max"] is not None and bounds["min"] > bounds["max"]:
        raise ProfileError(f"{origin}: fields.{name}: min {bounds['min']} is above max {bounds['max']}")
    unit = spec.get("unit", "")
    if not isinstance(unit, str):
        raise ProfileError(f"{origin}: fields.{name}.unit must be a string, got {unit!r}")
    if bounds["scale"] is not None and bounds["scale"] <= 0:
        raise ProfileError(f"{origin}: fields.{name}.scale must be greater than 0, got {bounds['scale']!r}")
    offset = spec.get("offset", 0.0)
    if type(offset) not in (int, float) or not -1e300 <= offset <= 1e300:
        raise ProfileError(f"{origin}: fields.{name}.offset must be a finite number, got {offset!r}")
    optional = spec.get("optional", False)
    if not isinstance(optional, bool):
        raise ProfileError(f"{origin}: fields.{name}.optional must be true or false, got {optional!r}")
    anomaly = spec.get("anomaly", "values" not in spec)
    if not isinstance(anomaly, bool):
        raise ProfileError(f"{origin}: fields.{name}.anomaly must be true or false, got {anomaly!r}")
    unknown = set(spec) - {"type", "unit", "min", "max", "scale", "offset", "path", "optional", "values",
                           "unit_path", "units", "anomaly"}
    if unknown:
        raise ProfileError(f"{origin}: fields.{name}: unknown setting {sorted(unknown)[0]!r}")
    try:
        path = mapping.path(spec["path"], f"fields.{name}.path") if "path" in spec else ()
        values = mapping.string_values(spec["values"], f"fields.{name}.values") if "values" in spec else None
        unit_path = mapping.path(spec["unit_path"], f"fields.{name}.unit_path") if "unit_path" in spec else ()
        units = mapping.conversions(spec["units"], f"fields.{name}.units") if "units" in spec else ()
    except MappingError as exc:
        raise ProfileError(f"{origin}: {exc}") from None
    if bool(unit_path) != bool(units):
        raise ProfileError(f"{origin}: fields.{name}: unit_path and units go together")
    if units and (bounds["scale"] is not None or offset):
        raise ProfileError(f"{origin}: fields.{name}: with units, each unit has its own scale and offset")
    return FieldSpec(name, kind, unit, bounds["min"], bounds["max"], bounds["scale"] or 1.0, float(offset), path,
                     optional, values, unit_path, units, anomaly)


def load_dir(path: Path) -> list[DeviceProfile]:
    return [parse(p.read_text(), str(p)) for p in sorted(path.glob("*.toml"))]


class ProfileIndex:
    """Finds the profile of a device id, caching the answer: the lookup runs once per device, not per event."""

    def __init__(self, profiles: list[DeviceProfile], max_cached: int = 100_000) -> None:
        self._profiles = profiles
        self._cache: dict[str, DeviceProfile | None] = {}
        self._max_cached = max_cached
        # The dialects' topic patterns, compiled once per profile list (a SIGHUP builds a new index).
        self.router = Router(profiles)

    def __len__(self) -> int:
        return len(self._profiles)

    def get(self, device_id: str) -> DeviceProfile | None:
        try:
            return self._cache[device_id]
        except KeyError:
            pass
        found = next((p for p in self._profiles if p.applies_to(device_id)), None)
        if len(self._cache) >= self._max_cached:
            self._cache.clear()  # a device-id flood must not grow memory; the cache refills from the hot devices
        self._cache[device_id] = found
        return found
