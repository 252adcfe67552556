"""The line-protocol encoder writes what every server reads back the same way.

Two small parsers below stand in for the servers. They differ exactly where the real ones do:
  * `lookbehind`: InfluxDB 1.x scans the measurement and tags by looking one byte back (`buf[i-1] != '\\'`);
  * `pairs`: its field scanner, InfluxDB 2.x and victoria-metrics treat `\\X` as one escaped character.
Both split lines at every newline (victoria-metrics does, even inside a quoted string). A line either encoder
output must read back, through both parsers, as the sanitized point. The integration suite repeats this against
the real InfluxDB 1.6.
"""

from __future__ import annotations

import math
import re
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.sinks.lineprotocol import Point, count_lines, encode, sanitize_name, split_lines

# --- the model parsers -----------------------------------------------------------------------------------------

_FLOAT = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\Z")
_INT = re.compile(r"-?\d+i\Z")


class Misparse(AssertionError):
    pass


def _is_escaped(text: str, i: int, mode: str) -> bool:
    """Is text[i] escaped? `lookbehind` checks the previous byte only; `pairs` counts the run of backslashes."""
    if mode == "lookbehind":
        return i > 0 and text[i - 1] == "\\"
    run = 0
    j = i - 1
    while j >= 0 and text[j] == "\\":
        run += 1
        j -= 1
    return run % 2 == 1


def _split(text: str, seps: str, mode: str) -> list[str]:
    parts, start = [], 0
    for i, c in enumerate(text):
        if c in seps and not _is_escaped(text, i, mode):
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _unescape(text: str, specials: str, mode: str) -> str:
    if mode == "lookbehind":
        # InfluxDB 1.x replaces `\,` `\ ` (`\=` in tags) and leaves every other backslash alone.
        for c in specials:
            text = text.replace("\\" + c, c)
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in specials + "\\":
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _key_section_end(line: str, mode: str) -> int:
    for i, c in enumerate(line):
        if c == " " and not _is_escaped(line, i, mode):
            return i
    raise Misparse(f"no fields in {line!r}")


def _parse_fields(text: str) -> tuple[dict[str, object], str]:
    """Fields are scanned in pairs by every server (InfluxDB 1.x's scanFields too); returns fields and the rest."""
    fields: dict[str, object] = {}
    i = 0
    while True:
        start = i
        while i < len(text) and text[i] != "=":
            if text[i] in ", ":
                raise Misparse(f"separator inside field key in {text!r}")
            i += 2 if text[i] == "\\" else 1
        if i >= len(text):
            raise Misparse(f"field without value in {text!r}")
        key = _unescape(text[start:i], ", =", "pairs")
        i += 1
        if text[i:i + 1] == '"':
            i += 1
            chars = []
            while i < len(text) and text[i] != '"':
                if text[i] == "\\" and text[i + 1:i + 2] in ('"', "\\"):
                    i += 1
                chars.append(text[i])
                i += 1
            if i >= len(text):
                raise Misparse(f"unterminated string in {text!r}")
            value: object = "".join(chars)
            i += 1
        else:
            end = i
            while end < len(text) and text[end] not in ", ":
                end += 1
            raw = text[i:end]
            i = end
            if raw in ("true", "false"):
                value = raw == "true"
            elif _INT.match(raw):
                value = int(raw[:-1])
            elif _FLOAT.match(raw):
                value = float(raw)
            else:
                raise Misparse(f"bad field value {raw!r}")
        if key in fields:
            raise Misparse(f"duplicate field {key!r}")
        fields[key] = value
        if text[i:i + 1] == ",":
            i += 1
            continue
        return fields, text[i:]


def parse_line(line: str, mode: str) -> tuple[str, dict[str, str], dict[str, object], int]:
    if line.startswith("#"):
        raise Misparse(f"line is a comment to InfluxDB 1.x: {line!r}")
    end = _key_section_end(line, mode)
    key, rest = line[:end], line[end + 1:]
    measurement, *tag_texts = _split(key, ",", mode)
    if not measurement:
        raise Misparse("empty measurement")
    tags: dict[str, str] = {}
    for tag in tag_texts:
        pieces = _split(tag, "=", mode)
        if len(pieces) != 2 or not pieces[0] or not pieces[1]:
            raise Misparse(f"bad tag {tag!r} in {line!r}")
        k, v = (_unescape(p, ", =", mode) for p in pieces)
        if k in tags:
            raise Misparse(f"duplicate tag {k!r}")
        tags[k] = v
    fields, tail = _parse_fields(rest)
    if not re.fullmatch(r" -?\d+", tail):
        raise Misparse(f"bad timestamp section {tail!r} in {line!r}")
    return _unescape(measurement, ", ", mode), tags, fields, int(tail)


def parse(body: bytes, mode: str) -> list[tuple[str, dict[str, str], dict[str, object], int]]:
    text = body.decode("utf-8")
    assert text == "" or text.endswith("\n"), "every line ends with a newline"
    return [parse_line(line, mode) for line in text.split("\n")[:-1]]


# --- what a point should read back as --------------------------------------------------------------------------


def _utf8(text: str) -> str:
    """What survives encoding: a lone surrogate becomes "?"."""
    return text.encode("utf-8", "replace").decode("utf-8")


def expected(p: Point) -> tuple[str, dict[str, str], dict[str, object], int] | None:
    measurement = _utf8(sanitize_name(p.measurement, kind="measurement"))
    tags = {}
    for k, v in p.tags:
        k, v = _utf8(sanitize_name(k)), _utf8(sanitize_name(v))
        if k and v:
            tags[k] = v
    fields: dict[str, object] = {}
    for k, value in p.fields:
        k = _utf8(sanitize_name(k, kind="field"))
        if not k:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            continue
        if isinstance(value, str):
            value = _utf8(value.replace("\n", " ").replace("\r", " "))
        fields[k] = value
    if not measurement or not fields:
        return None
    return measurement, tags, fields, p.ts_ns


def same_value(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # bit-exact, so -0.0 is not 0.0
    return a == b


def assert_reads_back(points: list[Point]) -> None:
    body = encode(points)
    wanted = [e for e in map(expected, points) if e is not None]
    assert count_lines(body) == len(wanted)
    for mode in ("lookbehind", "pairs"):
        got = parse(body, mode)
        assert len(got) == len(wanted), mode
        for (gm, gt, gf, gts), (em, et, ef, ets) in zip(got, wanted):
            assert (gm, gt, gts) == (em, et, ets), mode
            assert gf.keys() == ef.keys(), mode
            assert all(same_value(gf[k], ef[k]) for k in ef), (mode, gf, ef)


# --- specification by example ----------------------------------------------------------------------------------


def pt(measurement="m", tags=(), fields=(("v", 1.0),), ts=1) -> Point:
    return Point(measurement, tuple(tags), tuple(fields), ts)


def test_a_plain_point_is_one_line_with_tags_sorted_and_a_ns_timestamp():
    p = pt("cpu", [("z", "1"), ("host", "a")], [("load", 0.5), ("n", 3)], 1_700_000_000_123_456_789)
    assert encode([p]) == b"cpu,host=a,z=1 load=0.5,n=3i 1700000000123456789\n"


def test_value_types_integers_carry_i_bools_are_words_strings_are_quoted():
    p = pt(fields=[("i", -7), ("f", 2.0), ("b", True), ("c", False), ("s", "hi")])
    assert encode([p]) == b'm i=-7i,f=2.0,b=true,c=false,s="hi" 1\n'


def test_floats_are_written_so_they_read_back_bit_exact():
    for x in (0.1, 1e16, 5e-324, -0.0, 1.7976931348623157e308, 123456789.123456789):
        line = encode([pt(fields=[("v", x)])]).decode()
        assert struct.pack("<d", float(line.split("=")[1].split(" ")[0])) == struct.pack("<d", x)


def test_numpy_scalars_are_written_as_their_python_values():
    p = pt(fields=[("f", np.float32(0.5)), ("i", np.int64(3)), ("d", np.float64(1.25))])
    assert encode([p]) == b"m f=0.5,i=3i,d=1.25 1\n"


def test_non_finite_floats_and_out_of_range_integers_are_dropped_from_the_point():
    p = pt(fields=[("nan", math.nan), ("inf", -math.inf), ("big", 2**63), ("ok", 1)])
    assert encode([p]) == b"m ok=1i 1\n"


def test_a_point_with_nothing_writable_is_skipped():
    assert encode([pt(fields=[]), pt(fields=[("x", math.nan)]), pt(measurement="")]) == b""
    assert encode([pt(fields=[]), pt()]) == b"m v=1.0 1\n"


def test_separators_in_names_are_escaped_where_they_would_end_the_name():
    p = pt("my m,x=1", [("a key", "v,1=2")], [("f=1,2", 1.0)])
    assert encode([p]) == rb"my\ m\,x=1,a\ key=v\,1\=2 f\=1\,2=1.0 1" + b"\n"


def test_string_values_escape_quotes_and_backslashes_and_lose_line_breaks():
    p = pt(fields=[("s", 'say "hi"\\\nbye\r')])
    assert encode([p]) == b'm s="say \\"hi\\"\\\\ bye " 1\n'


def test_empty_tag_keys_or_values_are_left_out_and_the_last_duplicate_wins():
    p = pt(tags=[("a", ""), ("", "x"), ("b", "1"), ("b", "2")], fields=[("v", 1), ("v", 2)])
    assert encode([p]) == b"m,b=2 v=2i 1\n"


@pytest.mark.parametrize(("raw", "kind", "stored"), [
    ("C:\\temp", "tag", "C:\\temp"),         # a backslash before an ordinary character is kept
    ("ends\\", "tag", "ends_"),               # ... but not at the end: InfluxDB would take it as an escape
    ("a\\,b", "tag", "a_,b"),                 # ... nor before a separator
    ("a\\\\b", "tag", "a_\\b"),               # ... nor before another backslash (1.x and 2.x read \\ differently)
    ("two\nlines\t", "tag", "two_lines_"),    # control characters would end or blur the line
    ('say"so', "field", "say_so"),            # victoria-metrics reads a quote in a field key as a string value
    ('say"so', "tag", 'say"so'),
    ("#hash", "measurement", "_hash"),        # InfluxDB 1.x would skip the line as a comment
    ("#hash", "tag", "#hash"),
])
def test_sanitize_name_changes_only_what_the_protocol_cannot_carry(raw, kind, stored):
    assert sanitize_name(raw, kind=kind) == stored


def test_lone_surrogates_become_question_marks_instead_of_failing_the_batch():
    assert encode([pt(tags=[("t", "a\ud800")])]) == b"m,t=a? v=1.0 1\n"


def test_unsupported_value_types_are_a_programming_error():
    with pytest.raises(TypeError):
        encode([pt(fields=[("x", [1, 2])])])  # type: ignore[list-item]


def test_split_lines_cuts_at_a_line_boundary_near_the_middle():
    body = encode([pt(ts=i) for i in range(5)])
    first, second = split_lines(body)
    assert first + second == body
    assert (count_lines(first), count_lines(second)) == (2, 3)


# --- properties ------------------------------------------------------------------------------------------------

# Names drawn mostly from the characters that matter, with arbitrary text mixed in.
_tricky = st.sampled_from(list('\\ ,="#=\n\r\t\x00') + ["é", "\u2028", "a", "b", "1"])
names = st.lists(_tricky | st.characters(), max_size=8).map("".join)
values = (st.floats(allow_nan=True, allow_infinity=True)
          | st.integers(min_value=-(2**64), max_value=2**64)
          | st.booleans()
          | st.text(alphabet=_tricky | st.characters(), max_size=10))
points = st.builds(
    Point,
    measurement=names,
    tags=st.lists(st.tuples(names, names), max_size=4).map(tuple),
    fields=st.lists(st.tuples(names, values), max_size=4).map(tuple),
    ts_ns=st.integers(min_value=-(2**63) + 2, max_value=2**63 - 2),
)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(points, max_size=4))
@example([Point("a\\", (("k\\", "v\\"),), (("f\\", "s\\"),), 0)])
@example([Point("m", (("t", "\\,"),), (("\\=", 1),), 0)])
def test_any_points_read_back_as_their_sanitized_selves_under_both_scanning_rules(pts):
    assert_reads_back(pts)


@given(names)
def test_ordinary_names_are_not_changed(name):
    ordinary = re.sub(r'[\x00-\x1f\x7f\\"#]', "", name)
    for kind in ("measurement", "tag", "field"):
        assert sanitize_name(ordinary, kind=kind) == ordinary
