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

Parsing (`parse`) is separate from reading files (`load_dir`) so that tests and `check-config` share it.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devices.telemetry import Telemetry, TelemetryError

BUILTIN_DIR = Path(__file__).resolve().parent / "profiles"


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


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    name: str
    match: tuple[str, ...]
    fields: tuple[FieldSpec, ...]
    strict: bool = False
    manufacturer: str = ""
    model: str = ""

    def applies_to(self, device_id: str) -> bool:
        return any(fnmatch.fnmatchcase(device_id, pattern) for pattern in self.match)

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
    match = doc.get("match", [])
    if not isinstance(match, list) or not all(isinstance(m, str) for m in match) or not match:
        raise ProfileError(f"{origin}: match must be a non-empty list of patterns, got {match!r}")
    raw_fields = doc.get("fields", {})
    if not isinstance(raw_fields, dict):
        raise ProfileError(f"{origin}: fields must be a table")
    fields = tuple(_field(origin, key, spec) for key, spec in raw_fields.items())
    strict = doc.get("strict", False)
    if not isinstance(strict, bool):
        raise ProfileError(f"{origin}: strict must be true or false, got {strict!r}")
    about = {}
    for key in ("manufacturer", "model"):
        value = doc.get(key, "")
        if not isinstance(value, str):
            raise ProfileError(f"{origin}: {key} must be a string, got {value!r}")
        about[key] = value
    return DeviceProfile(name, tuple(match), fields, strict, about["manufacturer"], about["model"])


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
    return FieldSpec(name, kind, unit, bounds["min"], bounds["max"], bounds["scale"] or 1.0)


def load_dir(path: Path) -> list[DeviceProfile]:
    return [parse(p.read_text(), str(p)) for p in sorted(path.glob("*.toml"))]


class ProfileIndex:
    """Finds the profile of a device id, caching the answer: the lookup runs once per device, not per event."""

    def __init__(self, profiles: list[DeviceProfile], max_cached: int = 100_000) -> None:
        self._profiles = profiles
        self._cache: dict[str, DeviceProfile | None] = {}
        self._max_cached = max_cached

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
