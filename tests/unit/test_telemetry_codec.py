"""The JSON telemetry codec accepts any object of finite numbers and names what is wrong with anything else."""

import json

import pytest
from hypothesis import given, strategies as st

from devices.telemetry import Telemetry, TelemetryError, decode, encode


def test_an_object_of_numbers_with_seq_and_ts_is_telemetry():
    t = decode(b'{"seq": 7, "ts": 1764322800123, "temperature": 21.5, "count": 3}')
    assert t == Telemetry(seq=7, ts_ms=1764322800123, fields={"temperature": 21.5, "count": 3.0})
    assert t.as_payload() == {"seq": 7, "ts": 1764322800123, "temperature": 21.5, "count": 3.0}


def test_seq_and_ts_are_optional():
    assert decode(b'{"v": 1}') == Telemetry(None, None, {"v": 1.0})


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"{not json", "malformed_json"),
        (b"\xff\xfe{}", "invalid_utf8"),
        (b"[1, 2]", "not_an_object"),
        (b'{"t": NaN}', "non_finite"),
        (b'{"t": Infinity}', "non_finite"),
        (b'{"t": -Infinity}', "non_finite"),
        (b'{"t": 1e999}', "non_finite"),
        (b'{"t": "21.5"}', "wrong_type"),
        (b'{"t": true}', "wrong_type"),
        (b'{"t": null}', "wrong_type"),
        (b'{"t": {"nested": 1}}', "wrong_type"),
        (b'{"seq": -1, "t": 1}', "bad_seq"),
        (b'{"seq": 1.5, "t": 1}', "bad_seq"),
        (b'{"ts": 1764322800, "t": 1}', "bad_ts"),
        (b'{"ts": "now", "t": 1}', "bad_ts"),
        (b'{"seq": 1}', "no_fields"),
        (b"{}", "no_fields"),
        (b'{"a/b": 1}', "bad_field_name"),
        (b'{"+": 1}', "bad_field_name"),
        (b'{"t": 1' + b"0" * 400 + b"}", "out_of_range"),
        (b"[" * 100_000 + b"]" * 100_000, "oversize"),
    ],
)
def test_bad_payloads_are_rejected_with_a_stable_reason(payload, reason):
    with pytest.raises(TelemetryError) as err:
        decode(payload, max_bytes=100_000)
    assert err.value.reason == reason
    assert err.value.message


def test_deep_nesting_is_malformed_not_a_crash():
    with pytest.raises(TelemetryError) as err:
        decode(b"[" * 50_000 + b"]" * 50_000, max_bytes=200_000)
    assert err.value.reason in ("malformed_json", "not_an_object")


def test_oversize_is_checked_before_parsing():
    with pytest.raises(TelemetryError) as err:
        decode(b'{"v": 1, "pad": "' + b"x" * 20_000 + b'"}', max_bytes=16_384)
    assert err.value.reason == "oversize"


def test_too_many_fields():
    doc = {f"f{i}": i for i in range(65)}
    with pytest.raises(TelemetryError) as err:
        decode(json.dumps(doc).encode(), max_fields=64)
    assert err.value.reason == "too_many_fields"


@given(st.binary(max_size=300))
def test_arbitrary_bytes_either_decode_or_raise_the_codec_error(data):
    try:
        t = decode(data)
    except TelemetryError as exc:
        assert exc.reason
    else:
        assert t.fields


finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)
names = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True).filter(lambda n: n not in ("seq", "ts"))


@given(st.dictionaries(names, finite, min_size=1, max_size=8), st.none() | st.integers(0, 2**63 - 1))
def test_encode_then_decode_round_trips(fields, seq):
    t = Telemetry(seq, 1764322800123, fields)
    assert decode(encode(t)) == t
