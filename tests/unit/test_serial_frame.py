"""The serial frame codec: what goes in comes out, and nothing a noisy line sends can break the decoder."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from devices import serial_frame as sf
from devices.profiles import BUILTIN_DIR, DeviceProfile, FieldSpec, load_dir
from devices.serial_frame import Frame, FrameDecoder, FrameError, FrameType
from devices.telemetry import from_mapping

ENV = next(p for p in load_dir(BUILTIN_DIR) if p.name == "env-sensor")
TS = 1_767_225_600_000

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=sf.MAX_ID)
seqs = st.integers(0, sf.U32)
i32 = st.integers(sf.I32_MIN, sf.I32_MAX)


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    kind = draw(st.sampled_from(list(FrameType)))
    device, seq = draw(ids), draw(seqs)
    if kind == FrameType.DATA:
        return Frame(kind, device, seq, ts_ms=draw(st.integers(0, sf.U64)),
                     values=tuple(draw(st.lists(i32, max_size=sf.MAX_FIELDS))))
    if kind == FrameType.HELLO:
        return sf.hello(device, seq, draw(st.text(alphabet="abc-xyz0189", max_size=sf.MAX_PROFILE_NAME)))
    return Frame(kind, device, seq, code=draw(st.integers(0, 255)))


def decode_all(data: bytes, chunks: list[int] | None = None) -> list[Frame | FrameError]:
    decoder = FrameDecoder()
    out: list[Frame | FrameError] = []
    pos = 0
    for size in chunks or []:
        out += decoder.feed(data[pos:pos + size])
        pos += size
    out += decoder.feed(data[pos:])
    assert decoder.buffered <= sf.MAX_ENCODED
    return out


# --- the fixed parts of the format -----------------------------------------------------------------------------


def test_the_checksum_is_crc16_ccitt_false():
    assert sf.crc16(b"123456789") == 0x29B1  # the catalogue check value of CRC-16/CCITT-FALSE


@pytest.mark.parametrize("raw, stuffed", [
    (b"", b"\x01"),
    (b"\x00", b"\x01\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x01" * 254, b"\xff" + b"\x01" * 254 + b"\x01"),
])
def test_cobs_matches_the_published_examples(raw, stuffed):
    assert sf.cobs_encode(raw) == stuffed
    assert sf.cobs_decode(stuffed) == raw


def test_a_data_frame_has_the_documented_layout():
    wire = sf.encode(Frame(FrameType.DATA, "d1", 5, ts_ms=2, values=(-1,)))
    body = sf.cobs_decode(wire[:-1])
    assert wire.endswith(b"\x00") and b"\x00" not in wire[:-1]
    assert body[:-2] == bytes([1, 2, 2]) + b"d1" + (5).to_bytes(4, "little") + (2).to_bytes(8, "little") \
        + bytes([1]) + (-1).to_bytes(4, "little", signed=True)
    assert int.from_bytes(body[-2:], "big") == sf.crc16(body[:-2])


def test_a_reading_decodes_to_what_the_mqtt_path_would_have_carried():
    fields = {"temperature": 21.37, "humidity": 40.2, "pressure": 1013.2, "battery": 3.912}
    frame = sf.data_frame("env-0001", 7, TS, fields, ENV)
    (decoded,) = decode_all(sf.encode(frame))
    mapping = sf.to_mapping(decoded, ENV)
    assert mapping == {"seq": 7, "ts": TS, **fields}
    assert from_mapping(mapping).as_payload() == mapping


def test_a_scale_that_is_not_a_power_of_ten_keeps_its_decimals():
    profile = DeviceProfile("p", ("*",), (FieldSpec("x", scale=0.25), FieldSpec("n", type="int")))
    frame = sf.data_frame("d", 1, TS, {"x": -3.75, "n": 12}, profile)
    assert frame.values == (-15, 12)
    assert sf.to_mapping(frame, profile) == {"seq": 1, "ts": TS, "x": -3.75, "n": 12.0}


def test_a_reading_that_does_not_fit_the_profile_is_refused_with_a_reason():
    with pytest.raises(FrameError) as missing:
        sf.data_frame("env-1", 1, TS, {"temperature": 1.0}, ENV)
    assert missing.value.reason == "field_count"
    with pytest.raises(FrameError) as big:
        sf.data_frame("env-1", 1, TS, {"temperature": 1e9, "humidity": 0, "pressure": 0, "battery": 0}, ENV)
    assert big.value.reason == "out_of_range"
    with pytest.raises(FrameError) as short:
        sf.to_mapping(Frame(FrameType.DATA, "env-1", 1, ts_ms=TS, values=(1, 2)), ENV)
    assert short.value.reason == "field_count"


@pytest.mark.parametrize("frame, reason", [
    (Frame(FrameType.DATA, "d", 2**32), "out_of_range"),
    (Frame(FrameType.DATA, "d", 1, values=(2**31,)), "out_of_range"),
    (Frame(FrameType.DATA, "", 1), "malformed"),
    (Frame(FrameType.DATA, "d" * 65, 1), "malformed"),
    (Frame(FrameType.DATA, "dé", 1), "malformed"),
    (Frame(FrameType.ACK, "d", 1, code=256), "out_of_range"),
])
def test_encoding_refuses_what_the_format_cannot_carry(frame, reason):
    with pytest.raises(FrameError) as exc:
        sf.encode(frame)
    assert exc.value.reason == reason


def body_frame(body: bytes) -> bytes:
    return sf.cobs_encode(body + sf.crc16(body).to_bytes(2, "big")) + b"\x00"


@pytest.mark.parametrize("wire, reason", [
    (b"\x05\x01\x00", "cobs"),
    (b"\x02\x01\x00", "truncated"),
    (body_frame(bytes([2, 2, 1]) + b"d" + bytes(4)), "version"),
    (body_frame(bytes([1, 9, 1]) + b"d" + bytes(4)), "frame_type"),
    (body_frame(bytes([1, 2, 0]) + b"d" + bytes(4)), "malformed"),
    (body_frame(bytes([1, 2, 1]) + b"\xff" + bytes(4)), "malformed"),
    (body_frame(bytes([1, 2, 1]) + b"d" + bytes(4) + bytes(3)), "truncated"),
    (body_frame(bytes([1, 2, 1]) + b"d" + bytes(4) + bytes(8) + bytes([2]) + bytes(4)), "truncated"),
    (body_frame(bytes([1, 2, 1]) + b"d" + bytes(4) + bytes(8) + bytes([0]) + bytes(1)), "malformed"),
    (body_frame(bytes([1, 1, 1]) + b"d" + bytes(4) + bytes([5]) + b"ab"), "malformed"),
    (body_frame(bytes([1, 1, 1]) + b"d" + bytes(4) + bytes([1]) + b"\xff"), "malformed"),
    (body_frame(bytes([1, 3, 1]) + b"d" + bytes(4)), "malformed"),
    (body_frame(bytes([1, 3, 1]) + b"d" + bytes(4) + b"\x02\x02"), "malformed"),
    (b"\x07" * 600 + b"\x00", "oversize"),
])
def test_every_malformed_frame_has_its_own_reason(wire, reason):
    (err,) = decode_all(wire)
    assert isinstance(err, FrameError) and err.reason == reason and err.reason in sf.REASONS


def test_a_damaged_frame_still_names_its_device_and_seq_so_it_can_be_nacked():
    wire = sf.encode(sf.data_frame("env-9", 41, TS, {"temperature": 1, "humidity": 2, "pressure": 300,
                                                     "battery": 3}, ENV))
    body = bytearray(sf.cobs_decode(wire[:-1]))
    body[-4] ^= 0x10  # a value byte, away from the header
    (err,) = decode_all(sf.cobs_encode(bytes(body)) + b"\x00")
    assert isinstance(err, FrameError) and err.reason == "crc"
    assert (err.device_id, err.seq, err.frame_type) == ("env-9", 41, FrameType.DATA)


def test_a_stream_without_delimiters_never_grows_the_buffer_and_recovers_at_the_next_one():
    decoder = FrameDecoder()
    errors = []
    for _ in range(100):
        errors += decoder.feed(b"\x55" * 1000)
        assert decoder.buffered <= sf.MAX_ENCODED
    assert [e.reason for e in errors] == ["oversize"]  # reported once, not once per read
    good = sf.encode(sf.ack("d", 3))
    assert decoder.feed(b"\x00" + good) == [sf.ack("d", 3)]


def test_a_frame_split_across_many_reads_is_reassembled():
    wire = sf.encode(sf.hello("env-7", 99, "env-sensor"))
    assert decode_all(wire, chunks=[1] * (len(wire) - 1)) == [sf.hello("env-7", 99, "env-sensor")]


# --- properties -------------------------------------------------------------------------------------------------


@given(st.lists(frames(), min_size=1, max_size=8), st.lists(st.integers(1, 60), max_size=10))
def test_any_frames_round_trip_however_the_bytes_are_split(batch, chunks):
    assert decode_all(b"".join(sf.encode(f) for f in batch), chunks) == batch


@given(st.binary(max_size=2000), st.lists(st.integers(1, 300), max_size=10))
def test_garbage_only_ever_yields_codec_errors_or_frames_with_a_valid_crc(garbage, chunks):
    for item in decode_all(garbage, chunks):  # anything else raised would fail the test
        if isinstance(item, Frame):
            assert sf.decode_body(sf.encode(item)[:-1]) == item
        else:
            assert item.reason in sf.REASONS


@given(st.binary(max_size=1500), frames())
def test_a_valid_frame_after_garbage_is_still_decoded(garbage, frame):
    out = decode_all(garbage + b"\x00" + sf.encode(frame))
    assert out[-1] == frame


def mutate(wire: bytes, rng: random.Random, edits: int) -> bytes:
    data = bytearray(wire)
    for _ in range(edits):
        op = rng.randrange(3)
        i = rng.randrange(len(data) + (op == 2))
        if op == 0 and data:
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and len(data) > 1:
            del data[i]
        else:
            data.insert(i, rng.randrange(256))
    return bytes(data)


@settings(suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.lists(frames(), min_size=1, max_size=5), st.randoms(use_true_random=False), st.integers(1, 4))
def test_damaged_frames_are_never_decoded_as_something_they_were_not(batch, rng, edits):
    """Bit flips, dropped and inserted bytes: each frame is either decoded as it was sent, or reported as an error.
    (CRC-16 lets about 1 in 65,536 random corruptions through, so the examples are derandomized: a pass stays a pass.)"""
    sent = [sf.encode(f) for f in batch]
    damaged = [mutate(w, rng, edits) for w in sent]
    assume(damaged != sent)
    for item in decode_all(b"".join(damaged)):
        if isinstance(item, Frame):
            assert item in batch
        else:
            assert item.reason in sf.REASONS
    # And the line recovers: the next intact frame after the damage gets through.
    assert decode_all(b"".join(damaged) + b"\x00" + sent[0])[-1] == batch[0]
