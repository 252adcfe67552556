"""InfluxDB line protocol: a pure encoder shared by the gateway's sinks and the simulator.

    measurement[,tag=value...] field=value[,field=value...] timestamp_ns\\n

The protocol has no single grammar every server agrees on, so this encoder only emits what every parser we
write to reads the same way. Checked against InfluxDB 1.6 and VictoriaMetrics 1.79 (see the tests):

* InfluxDB 1.x finds the end of a measurement or tag by looking one byte *behind* (`buf[i-1] != '\\\\'`), while
  its field scanner, InfluxDB 2.x and VictoriaMetrics skip *pairs* (`\\\\X`). The two disagree about a backslash
  that precedes a separator (`a\\\\,`) or ends a name, and 1.x keeps `\\\\\\\\` in a tag value as two backslashes
  where the others read one. So a backslash in a name survives only when an ordinary character follows it
  (`C:\\\\temp` is fine); any other backslash becomes `_`.
* A line ends at a newline wherever it is: VictoriaMetrics splits lines before it looks at quotes. Control
  characters in names become `_`; CR and LF in string values become spaces.
* VictoriaMetrics misreads a double quote in a field key (it takes it for a string value), so it becomes `_`.
* InfluxDB 1.x skips a line that starts with `#` (a comment), so a measurement's leading `#` becomes `_`.

`sanitize_name` is that rule, public so a reader can compute the name a point is stored under. Everything that
cannot be written is left out rather than failing the batch: a point without a measurement or without any
writable field, a tag with an empty key or value (InfluxDB rejects those), a field with an empty key, a
non-finite float (InfluxDB rejects NaN and infinities) and an integer outside int64.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from typing import Iterable

from gateway.event import Point

FieldValue = float | int | bool | str

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A backslash is kept only before an ordinary character: before another backslash, a separator, a quote or the
# end of the name the parsers disagree about what it means.
_BAD_BACKSLASH = re.compile(r'\\(?=[\\,= "]|\Z)')

_MEASUREMENT_ESCAPES = str.maketrans({",": r"\,", " ": r"\ "})
_KEY_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": " ", "\r": " "})


def sanitize_name(name: str, *, kind: str = "tag") -> str:
    """The name a measurement, tag key, tag value or field key is stored under (see the module docstring).

    `kind` is "measurement", "tag" (keys and values) or "field" (field keys). Ordinary names come back unchanged.
    """
    name = _CONTROL.sub("_", name)
    name = _BAD_BACKSLASH.sub("_", name)
    if kind == "field":
        name = name.replace('"', "_")
    elif kind == "measurement" and name.startswith("#"):
        name = "_" + name[1:]
    return name


# Names repeat on every line (the same measurements, field keys and device ids), and sanitising is two regex
# passes: cache the escaped forms. Bounded, so a flood of new names cannot grow memory.
@functools.lru_cache(maxsize=65_536)
def _measurement(name: str) -> str:
    return sanitize_name(name, kind="measurement").translate(_MEASUREMENT_ESCAPES)


@functools.lru_cache(maxsize=65_536)
def _key(name: str, kind: str) -> str:
    return sanitize_name(name, kind=kind).translate(_KEY_ESCAPES)


def format_value(value: FieldValue) -> str | None:
    """The line-protocol text of one field value, or None when InfluxDB could not store it."""
    # Exact float and int first: nearly every value is one, and the checks below (abstract base classes) cost
    # several times more than the formatting.
    kind = type(value)
    if kind is float:
        # repr is the shortest text that reads back as the same double (1.5, 1e+16, 5e-324), and every parser
        # we target accepts its exponent form.
        return repr(value) if math.isfinite(value) else None
    if kind is int:
        return f"{value}i" if INT64_MIN <= value <= INT64_MAX else None
    # bool before Integral: it is an int subclass, and `True` must not become `1i`.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.translate(_STRING_ESCAPES) + '"'
    if isinstance(value, numbers.Integral):
        v = int(value)
        return f"{v}i" if INT64_MIN <= v <= INT64_MAX else None
    if isinstance(value, numbers.Real):
        f = float(value)
        return repr(f) if math.isfinite(f) else None
    raise TypeError(f"unsupported field value type {type(value).__name__}: {value!r}")


def field_key_is_plain(key: str) -> bool:
    """Whether a field key is stored exactly as written (nothing in it to escape or replace)."""
    return bool(key) and _key(key, "field") == key


def series_head(measurement: str, tags: tuple[tuple[str, str], ...]) -> str:
    """The `measurement,tag=value,...` part of a line (cached), for a caller that writes the rest itself."""
    return _head(measurement, tags)


@functools.lru_cache(maxsize=16_384)
def _head(measurement: str, tags: tuple[tuple[str, str], ...]) -> str:
    """`measurement,tag=value,...` escaped and with tags sorted; "" when the measurement is not writable. Cached:
    a gateway writes the same few series over and over."""
    name = _measurement(measurement)
    if not name:
        return ""
    # Later duplicates win, as in a dict; InfluxDB 1.x rejects a line with a repeated tag key. Tags are sorted by
    # key because that is InfluxDB's canonical series key and saves it re-sorting every line.
    escaped: dict[str, str] = {}
    for key, value in tags:
        k, v = _key(key, "tag"), _key(value, "tag")
        if k and v:
            escaped[k] = v
    return name + "".join(f",{k}={escaped[k]}" for k in sorted(escaped))


def encode_point(point: Point) -> str | None:
    """One line without the newline, or None when the point has nothing writable."""
    return encode_line(point.measurement, point.tags, point.fields, point.ts_ns)


def encode_line(measurement: str, tags: tuple[tuple[str, str], ...], fields: Iterable[tuple[str, FieldValue]],
                ts_ns: int) -> str | None:
    """`encode_point` from the parts, for a caller that has them at hand (no Point made per line)."""
    head = _head(measurement, tags)
    if not head:
        return None
    out: dict[str, str] = {}  # later duplicates win, as in a dict
    for key, value in fields:
        k = _key(key, "field")
        text = format_value(value)
        if k and text is not None:
            out[k] = text
    if not out:
        return None
    body = ",".join([f"{k}={v}" for k, v in out.items()])
    return f"{head} {body} {int(ts_ns)}"


def encode(points: Iterable[Point]) -> bytes:
    """Newline-terminated lines for every writable point; b"" when none is."""
    lines = [line for line in map(encode_point, points) if line is not None]
    if not lines:
        return b""
    # "replace": a lone surrogate (json.loads lets "\ud800" through) cannot be UTF-8; it becomes "?" instead of
    # failing the whole batch.
    return ("\n".join(lines) + "\n").encode("utf-8", "replace")


def count_lines(body: bytes) -> int:
    """How many points an encoded body holds (every line ends with a newline; string values carry none)."""
    return body.count(b"\n")


def split_lines(body: bytes) -> tuple[bytes, bytes]:
    """Cut a body at the line boundary nearest its middle, for a server that answered 413."""
    lines = body.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    half = len(lines) // 2
    first, second = lines[:half], lines[half:]
    return b"".join(line + b"\n" for line in first), b"".join(line + b"\n" for line in second)
