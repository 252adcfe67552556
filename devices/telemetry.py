"""The JSON telemetry codec: pure functions, no I/O, shared by the gateway and the simulator.

Wire format (one MQTT message on `devices/{id}/telemetry`)::

    {"seq": 17, "ts": 1764322800123, "temperature": 21.4, "humidity": 40.2}

Every key other than `seq` and `ts` is a measurement and must be a finite number. `seq` (optional) is the device's
message counter, a non-negative integer; `ts` (optional) is the reading's time in milliseconds since the Unix epoch.
Anything else is rejected with a `TelemetryError` whose `reason` is a stable, countable code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

# Field names become InfluxDB field keys and JSON keys on subscribers' feeds: keep them boring.
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
RESERVED = frozenset({"seq", "ts"})
MAX_SEQ = 2**63 - 1
# Plausible reading times: 2001-09-09 .. 2286-11-20. Anything outside is a unit mistake (seconds, microseconds).
MIN_TS_MS = 1_000_000_000_000
MAX_TS_MS = 9_999_999_999_999
# Beyond this a number is not a measurement. (Integer readings above 2**53 lose their last digits as floats.)
MAX_ABS_VALUE = 1e300


class TelemetryError(ValueError):
    """A payload that is not valid telemetry. `reason` is a short stable code for counters and dead letters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Telemetry:
    seq: int | None
    ts_ms: int | None
    fields: dict[str, float]

    def as_payload(self) -> dict[str, Any]:
        """The device's original fields, `seq` and `ts` included when the device sent them."""
        out: dict[str, Any] = {}
        if self.seq is not None:
            out["seq"] = self.seq
        if self.ts_ms is not None:
            out["ts"] = self.ts_ms
        out.update(self.fields)
        return out


def _reject_constant(name: str) -> Any:
    # json.loads accepts NaN, Infinity and -Infinity by default; none of them is a reading.
    raise TelemetryError("non_finite", f"non-finite number {name} is not a valid reading")


def decode(payload: bytes, *, max_bytes: int = 16_384, max_fields: int = 64) -> Telemetry:
    """Parse and validate one telemetry message. Raises TelemetryError naming what is wrong."""
    if len(payload) > max_bytes:
        raise TelemetryError("oversize", f"payload is {len(payload)} bytes, the limit is {max_bytes}")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        # orjson is the fast path; what it refuses is parsed again by the standard library, whose errors name the
        # reason the way this codec always has (NaN is `non_finite`, 10**400 `out_of_range`, ...).
        doc = _slow_decode(payload)
    if not isinstance(doc, dict):
        raise TelemetryError("not_an_object", f"telemetry must be a JSON object, got {type(doc).__name__}")
    try:
        return from_mapping(doc, max_fields=max_fields)
    except TelemetryError as exc:
        if exc.reason != "non_finite":
            raise
        # orjson reads an integer beyond 64 bits as a float, so -10**301 would look like a non-finite float; the
        # standard library keeps it an integer, which is `out_of_range`. Only on this error path.
        return from_mapping(_slow_decode(payload), max_fields=max_fields)


def parse_json(payload: bytes) -> Any:
    """Any JSON document, with the codec's reasons for what is not JSON (`malformed_json`, `invalid_utf8`,
    `non_finite`): what the foreign payload mappings (devices/mapping.py) read."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return _slow_decode(payload)


def _slow_decode(payload: bytes) -> Any:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TelemetryError("invalid_utf8", f"payload is not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except TelemetryError:
        raise
    except (ValueError, RecursionError) as exc:
        raise TelemetryError("malformed_json", f"payload is not JSON: {str(exc)[:120]}") from None


# Field names that passed FIELD_NAME: a fleet sends the same few names in every message, and a set lookup is much
# cheaper than the regular expression. Bounded, so a device inventing names cannot grow it.
_GOOD_NAMES: set[str] = set()
_GOOD_NAMES_MAX = 4096


def from_mapping(doc: dict[str, Any], *, max_fields: int = 64) -> Telemetry:
    """Validate an already-parsed telemetry object (the serial codec decodes to the same shape)."""
    seq = doc.get("seq")
    if seq is not None and (type(seq) is not int or not 0 <= seq <= MAX_SEQ):
        raise TelemetryError("bad_seq", f"seq must be an integer from 0 to 2^63-1, got {_show(seq)}")
    ts = doc.get("ts")
    ts_ms: int | None = None
    if ts is not None:
        # The range check first: math.isfinite() of an integer beyond float range raises OverflowError.
        if type(ts) not in (int, float) or not MIN_TS_MS <= ts <= MAX_TS_MS:
            raise TelemetryError("bad_ts", f"ts {_show(ts)} is not milliseconds since the epoch")
        ts_ms = int(ts)
    fields: dict[str, float] = {}
    for key, value in doc.items():
        if key in RESERVED:
            continue
        if key not in _GOOD_NAMES:
            if not FIELD_NAME.fullmatch(key):
                raise TelemetryError("bad_field_name", f"field name {_show(key)} is not allowed")
            if len(_GOOD_NAMES) < _GOOD_NAMES_MAX:
                _GOOD_NAMES.add(key)
        if type(value) is int:
            if abs(value) > MAX_ABS_VALUE:
                raise TelemetryError("out_of_range", f"field {key!r}: {_show(value)} is too large")
            fields[key] = float(value)
        elif type(value) is float:
            if not math.isfinite(value) or abs(value) > MAX_ABS_VALUE:
                raise TelemetryError("non_finite", f"field {key!r}: {value!r} is not a finite reading")
            fields[key] = value
        else:
            raise TelemetryError("wrong_type", f"field {key!r} must be a number, got {type(value).__name__}")
    if not fields:
        raise TelemetryError("no_fields", "telemetry has no numeric field")
    if len(fields) > max_fields:
        raise TelemetryError("too_many_fields", f"{len(fields)} fields, the limit is {max_fields}")
    return Telemetry(seq, ts_ms, fields)


def encode(t: Telemetry) -> bytes:
    return json.dumps(t.as_payload(), separators=(",", ":"), allow_nan=False).encode()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
