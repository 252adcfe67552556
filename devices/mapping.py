"""Foreign payloads: devices that publish their own dialect (Tasmota, zigbee2mqtt, ESPHome, ...) on their own topics.

A profile with a `[source]` table (or several `[[source]]` tables) says which topics a kind of device publishes on and
how a message becomes a reading::

    [source]
    topic = "tele/{id}/SENSOR"        # {id}: the device's name, one topic level; {id#} (last only): the rest
    id = "tasmota-{id}"               # the gateway's device id made from that name (default "{id}")
    payload = "json"                  # "json": an object, fields taken by path; "value": the payload is one value
    others = "keep"                   # "keep": every other number and boolean too, named by its path; "drop"
    ignore = ["tele/+/STATE"]         # topics under the pattern that are not readings (+ one level, # any levels)

    [fields.temperature]
    path = "BME280.Temperature"       # dotted path into nested objects (a list for keys holding a dot)
    unit_path = "TempUnit"            # where the message names its unit; `units` converts each to `unit`
    units = { C = {}, F = { scale = 0.5555555555555556, offset = -17.77777777777778 } }

Everything a message can do wrong is a `TelemetryError` with a stable reason, so the source dead-letters it like any
other bad telemetry. Patterns are compiled once per profile list into a `Router`, which finds a topic's source by its
first level (or, for patterns starting with a placeholder, by its number of levels): a message is compared with the
few patterns that can match it, not with every profile.

Pure: no I/O. The gateway's MQTT source and `gateway try-profile` run the same code.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from devices.telemetry import MAX_ABS_VALUE, RESERVED, Telemetry, TelemetryError, from_mapping, parse_json

if TYPE_CHECKING:
    from devices.profiles import DeviceProfile, FieldSpec

# The gateway's device-id rule (gateway/event.py ID, README "Device and follower ids"); devices/ cannot import the
# gateway, and the rule is short enough to state twice (tests/unit/test_dialects.py checks both agree).
ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
PAYLOADS = ("json", "value")
OTHERS = ("drop", "keep")
MAX_DEPTH = 4  # nested objects flattened by `others = "keep"`; deeper ones are dropped
# The topics the gateway reads and writes itself. A pattern that could match one is refused: a dialect on
# `{id}/{field}` would take the gateway's own `gateway/deadletter` for a reading, dead-letter it, and loop.
# A pattern may not start with one of their first levels either.
OWN_TOPICS = ("devices/+/telemetry", "users/+/+", "feeds/+/+/+/+", "feeds/+/notices", "alerts/+", "quarantine/+",
              "events/+/stats", "gateway/status", "gateway/deadletter")
OWN_LEVELS = frozenset(t.split("/")[0] for t in OWN_TOPICS)


class MappingError(ValueError):
    """A `[source]` table that does not make sense; profiles.parse turns it into a ProfileError."""


class Conversion(NamedTuple):
    scale: float = 1.0
    offset: float = 0.0


@dataclass(frozen=True, slots=True)
class Source:
    """One compiled `[source]`: a topic pattern and how its messages become readings."""

    topic: str  # the pattern as written
    levels: tuple[str | None, ...]  # literal levels; None where a placeholder or `+` stands
    id_at: int  # the level of {id}
    id_rest: bool  # {id#}: the name is every level from id_at on
    field_at: int  # the level of {field}, -1 without one
    id_prefix: str
    id_suffix: str
    payload: str
    others: str
    field: str  # the field of a value payload when the topic does not name it
    values: tuple[tuple[str, float], ...]  # strings a value payload may be, and the number each stands for
    ignore: tuple[str, ...]
    ignore_re: re.Pattern[str] | None

    @property
    def subscription(self) -> str:
        """The MQTT filter the gateway subscribes to for this pattern."""
        out = ["+" if lit is None else lit for lit in self.levels]
        if self.id_rest:
            out[self.id_at] = "#"
        return "/".join(out)

    def matches(self, parts: Sequence[str]) -> bool:
        levels = self.levels
        if len(parts) != len(levels) and not (self.id_rest and len(parts) > len(levels)):
            return False
        for i, lit in enumerate(levels):
            if lit is not None and parts[i] != lit:
                return False
        return True

    def ignored(self, topic: str) -> bool:
        return self.ignore_re is not None and self.ignore_re.fullmatch(topic) is not None


class Match(NamedTuple):
    """A topic routed to its profile and source."""

    profile: "DeviceProfile"
    source: Source
    name: str  # the device's own name, as the topic carries it
    field: str  # the field a value payload is for ("" for json payloads)

    def device_id(self) -> str:
        """The gateway's id for the device, or TelemetryError `bad_device_id`: a name with a space or a slash (a
        zigbee2mqtt friendly name may have both) is not renamed behind the operator's back, since two names could
        then become one device."""
        s = self.source
        device_id = f"{s.id_prefix}{self.name}{s.id_suffix}"
        if not ID.fullmatch(device_id):
            raise TelemetryError(
                "bad_device_id",
                f"{self.profile.name}: name {_show(self.name)} gives device id {_show(device_id)}, which is not 1-64 "
                "characters of A-Z a-z 0-9 _ . -; rename the device on its side (no spaces or slashes)")
        return device_id

    def reading(self, payload: bytes, *, max_bytes: int = 16_384, max_fields: int = 64) -> Telemetry:
        """The reading the message carries, checked against the profile (ranges, strict), or TelemetryError."""
        if len(payload) > max_bytes:
            raise TelemetryError("oversize", f"payload is {len(payload)} bytes, the limit is {max_bytes}")
        if self.source.payload == "value":
            fields = self._value(payload)
        else:
            fields = self._json(payload)
        t = from_mapping(fields, max_fields=max_fields)
        self.profile.check(t)
        return t

    # --- value payloads: one topic per field (ESPHome) -----------------------------------------------------------

    def _value(self, payload: bytes) -> dict[str, Any]:
        name = self.field
        if name in RESERVED:
            raise TelemetryError("bad_field_name", f"field name {name!r} is reserved")
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise TelemetryError("invalid_utf8", f"payload is not UTF-8 (byte {exc.start})") from None
        spec = self.profile.field(name)
        values = dict(self.source.values)
        if spec is not None and spec.values:
            values.update(spec.values)
        if text in values:
            raw = values[text]
        else:
            try:
                raw = float(text)
            except ValueError:
                accepted = f" or one of {sorted(values)}" if values else ""
                raise TelemetryError("not_numeric", f"field {name!r}: {_show(text)} is not a number{accepted}") \
                    from None
            if not math.isfinite(raw):
                raise TelemetryError("non_finite", f"field {name!r}: {_show(text)} is not a finite reading")
            if abs(raw) > MAX_ABS_VALUE:
                raise TelemetryError("out_of_range", f"field {name!r}: {_show(text)} is too large")
        return {name: _converted(raw, spec, None, name)}

    # --- JSON payloads (Tasmota, zigbee2mqtt) --------------------------------------------------------------------

    def _json(self, payload: bytes) -> dict[str, Any]:
        doc = parse_json(payload)
        if not isinstance(doc, dict):
            raise TelemetryError("not_an_object", f"payload must be a JSON object, got {type(doc).__name__}")
        out: dict[str, Any] = {}
        taken: set[tuple[str, ...]] = set()
        for spec in self.profile.fields:
            path = spec.path or (spec.name,)
            raw = _at(doc, path)
            if raw is None:
                if spec.optional:
                    continue
                raise TelemetryError("missing_path", f"field {spec.name!r}: {'.'.join(path)} is not in the message")
            taken.add(path)
            number = _number(raw, spec, spec.name, declared=True)
            assert number is not None  # declared fields raise instead of dropping
            out[spec.name] = _converted(number, spec, doc, spec.name)
        if self.source.others == "keep":
            _keep(doc, doc, (), taken, out, self.profile)
        return out


def _at(doc: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if isinstance(doc, dict):
            doc = doc.get(key)
        elif isinstance(doc, list) and key.isdigit() and int(key) < len(doc):
            doc = doc[int(key)]
        else:
            return None
    return doc


def _number(raw: Any, spec: "FieldSpec | None", name: str, *, declared: bool) -> float | None:
    """A JSON value as a reading: numbers as they are, booleans as 1 and 0, strings through the field's `values`.
    None: not a reading, dropped (only for fields the mapping did not name)."""
    if raw is True or raw is False:
        return 1.0 if raw else 0.0
    if type(raw) is int or type(raw) is float:
        if abs(raw) > MAX_ABS_VALUE:
            raise TelemetryError("out_of_range", f"field {name!r}: {_show(raw)} is too large")
        return float(raw)
    if isinstance(raw, str):
        if spec is not None and spec.values:
            try:
                return spec.values[raw]
            except KeyError:
                raise TelemetryError("not_numeric", f"field {name!r}: {_show(raw)} is not one of "
                                                    f"{sorted(spec.values)}") from None
        if declared:
            raise TelemetryError("not_numeric", f"field {name!r}: {_show(raw)} is a string, not a number")
        return None
    if declared:
        raise TelemetryError("wrong_type", f"field {name!r} must be a number, got {type(raw).__name__}")
    return None


def _converted(value: float, spec: "FieldSpec | None", doc: Any, name: str) -> float:
    if spec is None:
        return value
    if spec.unit_path:
        said = _at(doc, spec.unit_path) if doc is not None else None
        if not isinstance(said, str):
            raise TelemetryError("missing_path", f"field {name!r}: its unit {'.'.join(spec.unit_path)} is not in "
                                                 "the message")
        conversion = dict(spec.units).get(said)
        if conversion is None:
            raise TelemetryError("unknown_unit", f"field {name!r}: unit {_show(said)} is not one of "
                                                  f"{sorted(u for u, _ in spec.units)}")
        return value * conversion.scale + conversion.offset
    if spec.scale != 1.0 or spec.offset:
        return value * spec.scale + spec.offset
    return value


def _keep(root: dict[str, Any], doc: dict[str, Any], prefix: tuple[str, ...], taken: set[tuple[str, ...]],
          out: dict[str, Any], profile: "DeviceProfile") -> None:
    """`others = "keep"`: every number and boolean not taken yet, named by its path (BME280.DewPoint); strings,
    lists and nulls are dropped, unless a field of that name declares `values` for its strings."""
    for key, raw in doc.items():
        path = (*prefix, key)
        if path in taken:
            continue
        if isinstance(raw, dict):
            if len(path) < MAX_DEPTH:
                _keep(root, raw, path, taken, out, profile)
            continue
        name = ".".join(path)
        if name in RESERVED or name in out:
            continue
        spec = profile.field(name)
        number = _number(raw, spec, name, declared=False)
        if number is not None:
            out[name] = _converted(number, spec, root, name)


# --- compiling [source] tables ----------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(id#?|field)\}")
_ID_CHARS = re.compile(r"^[A-Za-z0-9_.\-]*$")


def compile_source(raw: Any, where: str) -> Source:
    if not isinstance(raw, dict):
        raise MappingError(f"{where} must be a table")
    unknown = set(raw) - {"topic", "id", "payload", "others", "field", "values", "ignore"}
    if unknown:
        raise MappingError(f"{where}: unknown setting {sorted(unknown)[0]!r}")
    topic = raw.get("topic")
    if not isinstance(topic, str) or not topic:
        raise MappingError(f"{where}.topic must be a topic pattern such as 'tele/{{id}}/SENSOR', got {topic!r}")
    parts = topic.split("/")
    levels: list[str | None] = []
    id_at, id_rest, field_at = -1, False, -1
    for i, part in enumerate(parts):
        holder = _PLACEHOLDER.fullmatch(part)
        if holder is not None:
            what = holder.group(1)
            if what.startswith("id"):
                if id_at >= 0:
                    raise MappingError(f"{where}.topic {topic!r}: {{id}} more than once")
                id_at, id_rest = i, what == "id#"
                if id_rest and i != len(parts) - 1:
                    raise MappingError(f"{where}.topic {topic!r}: {{id#}} must be the last level")
            else:
                if field_at >= 0:
                    raise MappingError(f"{where}.topic {topic!r}: {{field}} more than once")
                field_at = i
            levels.append(None)
        elif part == "+":
            levels.append(None)
        elif not part or "{" in part or "}" in part or "#" in part or "+" in part or part.startswith("$"):
            raise MappingError(f"{where}.topic {topic!r}: level {part!r} must be a name, +, {{id}}, {{id#}} or "
                               "{field}")
        else:
            levels.append(part)
    if id_at < 0:
        raise MappingError(f"{where}.topic {topic!r} must name the device with {{id}}")
    template = raw.get("id", "{id}")
    if not isinstance(template, str) or template.count("{id}") != 1:
        raise MappingError(f"{where}.id must contain {{id}} once, got {template!r}")
    prefix, _, suffix = template.partition("{id}")
    if not _ID_CHARS.fullmatch(prefix + suffix):
        raise MappingError(f"{where}.id {template!r}: around {{id}} only A-Z a-z 0-9 _ . - may stand")
    payload = raw.get("payload", "json")
    if payload not in PAYLOADS:
        raise MappingError(f"{where}.payload must be one of {PAYLOADS}, got {payload!r}")
    others = raw.get("others", "drop")
    if others not in OTHERS:
        raise MappingError(f"{where}.others must be one of {OTHERS}, got {others!r}")
    field = raw.get("field", "")
    if not isinstance(field, str):
        raise MappingError(f"{where}.field must be a field name, got {field!r}")
    if payload == "value":
        if (field_at >= 0) == bool(field):
            raise MappingError(f"{where}: a value payload needs its field named once: {{field}} in the topic, or "
                               "field = NAME")
    elif field_at >= 0 or field:
        raise MappingError(f"{where}: {{field}} and field = are for payload = 'value'")
    values = string_values(raw.get("values", {}), f"{where}.values")
    ignore = raw.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(i, str) and i for i in ignore):
        raise MappingError(f"{where}.ignore must be a list of topic filters, got {ignore!r}")
    source = Source(topic, tuple(levels), id_at, id_rest, field_at, prefix, suffix, payload, others, field,
                    tuple(sorted(values.items())), tuple(ignore), _ignore_re(ignore) if ignore else None)
    if levels[0] in OWN_LEVELS:
        raise MappingError(f"{where}.topic {topic!r}: {levels[0]}/ is the gateway's own")
    for own in OWN_TOPICS:
        if _overlap(source.subscription.split("/"), own.split("/")):
            raise MappingError(f"{where}.topic {topic!r} could match the gateway's own topics ({own})")
    return source


def string_values(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict) or not all(type(v) in (int, float, bool) for v in raw.values()):
        raise MappingError(f"{where} must map strings to numbers, e.g. {{ ON = 1, OFF = 0 }}, got {raw!r}")
    out = {str(k): float(v) for k, v in raw.items()}
    if not all(math.isfinite(v) and abs(v) <= MAX_ABS_VALUE for v in out.values()):
        raise MappingError(f"{where}: every number must be finite")
    return out


def conversions(raw: Any, where: str) -> tuple[tuple[str, Conversion], ...]:
    if not isinstance(raw, dict) or not raw:
        raise MappingError(f"{where} must be a table of units, e.g. {{ C = {{}}, F = {{ scale = 0.5556, offset = "
                           f"-17.78 }} }}")
    out = []
    for unit, conv in raw.items():
        if not isinstance(conv, dict) or set(conv) - {"scale", "offset"}:
            raise MappingError(f"{where}.{unit} must be a table with scale and offset")
        numbers = {k: conv.get(k, d) for k, d in (("scale", 1.0), ("offset", 0.0))}
        if not all(type(v) in (int, float) and math.isfinite(v) for v in numbers.values()) or not numbers["scale"]:
            raise MappingError(f"{where}.{unit}: scale and offset must be finite numbers, scale not 0")
        out.append((unit, Conversion(float(numbers["scale"]), float(numbers["offset"]))))
    return tuple(sorted(out))


def path(raw: Any, where: str) -> tuple[str, ...]:
    if isinstance(raw, str) and raw and all(raw.split(".")):
        return tuple(raw.split("."))
    if isinstance(raw, list) and raw and all(isinstance(k, str) and k for k in raw):
        return tuple(raw)
    raise MappingError(f"{where} must be a dotted path such as 'BME280.Temperature', or a list of keys, got {raw!r}")


def _ignore_re(filters: Sequence[str]) -> re.Pattern[str]:
    """MQTT filters, except that `#` may stand anywhere for any number of levels: zigbee2mqtt/#/set ignores the
    /set topic of a device whatever its name's depth."""
    alternatives = []
    for f in filters:
        out = []
        for i, level in enumerate(f.split("/")):
            sep = "/" if i else ""
            if level == "#":
                out.append(f"(?:{sep}[^/]*)*" if i else "[^/]*(?:/[^/]*)*")
            elif level == "+":
                out.append(f"{sep}[^/]*")
            else:
                out.append(re.escape(sep + level))
        alternatives.append("".join(out))
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


def _overlap(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether some topic matches both MQTT filters."""
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return False
        if x != y and x != "+" and y != "+":
            return False
    return True


# --- routing ------------------------------------------------------------------------------------------------------


class Router:
    """Finds the profile and source of a topic. Patterns starting with a literal level are found by it (one dict
    lookup); the others by their number of levels; the few with both a placeholder first and {id#} are tried last.
    When two patterns match one topic, the one found first wins: a literal first level before a placeholder, then
    the first profile (profiles load in file-name order)."""

    def __init__(self, profiles: Sequence["DeviceProfile"]) -> None:
        self._by_first: dict[str, list[tuple["DeviceProfile", Source]]] = {}
        self._by_depth: dict[int, list[tuple["DeviceProfile", Source]]] = {}
        self._open: list[tuple["DeviceProfile", Source]] = []
        subscriptions: dict[str, None] = {}
        for profile in profiles:
            for source in profile.sources:
                subscriptions[source.subscription] = None
                first = source.levels[0]
                if first is not None and not (source.id_rest and source.id_at == 0):
                    self._by_first.setdefault(first, []).append((profile, source))
                elif not source.id_rest:
                    self._by_depth.setdefault(len(source.levels), []).append((profile, source))
                else:
                    self._open.append((profile, source))
        self.subscriptions = tuple(subscriptions)

    def __bool__(self) -> bool:
        return bool(self.subscriptions)

    def route(self, topic: str, parts: Sequence[str]) -> Match | None | bool:
        """The match; False for a topic a source ignores; None for one no pattern matches."""
        for candidates in (self._by_first.get(parts[0]), self._by_depth.get(len(parts)), self._open):
            if not candidates:
                continue
            for profile, source in candidates:
                if source.matches(parts):
                    if source.ignored(topic):
                        return False
                    name = "/".join(parts[source.id_at:]) if source.id_rest else parts[source.id_at]
                    field = parts[source.field_at] if source.field_at >= 0 else source.field
                    return Match(profile, source, name, field)
        return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["ID", "Match", "MappingError", "Router", "Source", "compile_source", "conversions", "path",
           "string_values"]
