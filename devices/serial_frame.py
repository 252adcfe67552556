"""The serial frame codec: pure functions and a streaming decoder, no I/O, shared by the gateway and the simulator.

One frame on the wire is `COBS(body + CRC) + 0x00` (docs/serial-protocol.md has the byte layout)::

    body = version u8 | type u8 | id_len u8 | device id (ASCII) | seq u32 LE | type-specific part
    CRC  = CRC-16/CCITT-FALSE of the body (poly 0x1021, init 0xFFFF, not reflected), big-endian

COBS removes every 0x00 from the frame, so 0x00 only ever means "end of frame": a receiver that joins mid-stream or
meets line noise resynchronises at the next 0x00. The CRC is `binascii.crc_hqx(body, 0xFFFF)`, which computes
exactly CRC-16/CCITT-FALSE (check value 0x29B1 for b"123456789").

DATA carries readings compactly: the reading time (ms, u64 LE), a field count, and each field of the device's
profile, in the profile's order, as a signed 32-bit little-endian integer `round(value / scale)`. `to_mapping` turns
that back into the `{"seq", "ts", field: value}` object `devices.telemetry.from_mapping` validates, so a serial
reading and the same reading sent as MQTT JSON end up as identical events.

Every decoding failure is a `FrameError` with a stable `reason` (see REASONS); nothing else escapes the decoder.
"""

from __future__ import annotations

import binascii
import decimal
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Mapping

from devices.profiles import DeviceProfile

VERSION = 1
DELIMITER = b"\x00"
MAX_ID = 64  # as long as an MQTT device id may be (gateway.graph.ID)
MAX_PROFILE_NAME = 64
MAX_FIELDS = 64
# The largest legal frame (64-character id, 64 fields) is 339 bytes encoded; anything longer without a delimiter is
# noise or a runaway sender, and the decoder drops it instead of buffering it.
MAX_ENCODED = 512
U32 = 0xFFFF_FFFF
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
U64 = 2**64 - 1

_HEAD = struct.Struct("<BBB")  # version, type, id length
_SEQ = struct.Struct("<I")
_DATA = struct.Struct("<QB")  # ts_ms, field count
_CRC = struct.Struct(">H")
_MIN_BODY = _HEAD.size + 1 + _SEQ.size  # a one-character id and no type-specific part


class FrameType(IntEnum):
    HELLO = 1  # device -> gateway on (re)connect: id and profile name
    DATA = 2  # device -> gateway: one reading
    ACK = 3  # gateway -> device: `seq` of that device is durably handled; `code` is the type acknowledged
    NACK = 4  # gateway -> device: resend `seq` (or HELLO first); `code` is a NackReason


class NackReason(IntEnum):
    CORRUPT = 1  # the frame arrived damaged: resend it
    HELLO_REQUIRED = 2  # the gateway does not know this device's profile: send HELLO, then resend


# Stable reason codes of FrameError, for counters and dead letters.
REASONS = (
    "cobs",  # byte stuffing is broken (a code byte points past the end of the frame)
    "truncated",  # shorter than a frame can be, or shorter than its own lengths say
    "crc",  # the checksum does not match
    "oversize",  # more than MAX_ENCODED bytes without a delimiter
    "version",  # a protocol version this codec does not speak
    "frame_type",  # unknown frame type
    "malformed",  # lengths or contents that cannot be right (trailing bytes, non-ASCII id, ...)
    "field_count",  # DATA with a different number of fields than the profile has
    "out_of_range",  # a value that does not fit the wire format (encoding only)
)


class FrameError(ValueError):
    """A frame that could not be decoded (or encoded). `reason` is one of REASONS.

    `device_id` and `seq` are best-effort hints read from a damaged frame (None when unreadable); they are NOT
    covered by a valid CRC, so they may only be used for something harmless, like asking for a resend.
    `raw` is the start of the offending bytes, for dead letters.
    """

    def __init__(self, reason: str, message: str, *, raw: bytes = b"", device_id: str | None = None,
                 seq: int | None = None, frame_type: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.raw = raw[:MAX_ENCODED]
        self.device_id = device_id
        self.seq = seq
        self.frame_type = frame_type


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    device_id: str
    seq: int
    ts_ms: int = 0  # DATA
    values: tuple[int, ...] = ()  # DATA: raw integers, in profile field order
    profile: str = ""  # HELLO
    code: int = 0  # ACK: the FrameType acknowledged; NACK: a NackReason


def hello(device_id: str, seq: int, profile: str) -> Frame:
    return Frame(FrameType.HELLO, device_id, seq, profile=profile)


def ack(device_id: str, seq: int, of: FrameType = FrameType.DATA) -> Frame:
    return Frame(FrameType.ACK, device_id, seq, code=int(of))


def nack(device_id: str, seq: int, reason: NackReason = NackReason.CORRUPT) -> Frame:
    return Frame(FrameType.NACK, device_id, seq, code=int(reason))


# --- COBS ------------------------------------------------------------------------------------------------------


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the result has no 0x00 and is at most len/254 + 1 bytes longer."""
    out = bytearray()
    for part in data.split(b"\x00"):
        # A run of 254 non-zero bytes is a 0xFF block, which implies no zero after it.
        while len(part) >= 254:
            out.append(0xFF)
            out += part[:254]
            part = part[254:]
        out.append(len(part) + 1)
        out += part
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise FrameError("cobs", f"zero code byte at {i}", raw=data)
        end = i + code
        if end > n:
            raise FrameError("cobs", f"code byte at {i} points {end - n} bytes past the end", raw=data)
        out += data[i + 1:end]
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


# --- frames ----------------------------------------------------------------------------------------------------


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE."""
    return binascii.crc_hqx(data, 0xFFFF)


def _ascii(text: str, what: str, limit: int, allow_empty: bool = False) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise FrameError("malformed", f"{what} {text[:80]!r} is not ASCII") from None
    if len(raw) > limit or (not raw and not allow_empty):
        raise FrameError("malformed", f"{what} must be {0 if allow_empty else 1} to {limit} characters")
    return raw


def encode(frame: Frame) -> bytes:
    """The frame as it goes on the wire, delimiter included. Raises FrameError for values the format cannot carry."""
    ident = _ascii(frame.device_id, "device id", MAX_ID)
    if not 0 <= frame.seq <= U32:
        raise FrameError("out_of_range", f"seq {frame.seq} does not fit in u32")
    body = bytearray(_HEAD.pack(VERSION, int(frame.type), len(ident)))
    body += ident
    body += _SEQ.pack(frame.seq)
    if frame.type == FrameType.DATA:
        if not 0 <= frame.ts_ms <= U64:
            raise FrameError("out_of_range", f"ts {frame.ts_ms} does not fit in u64")
        if len(frame.values) > MAX_FIELDS:
            raise FrameError("out_of_range", f"{len(frame.values)} fields, the limit is {MAX_FIELDS}")
        body += _DATA.pack(frame.ts_ms, len(frame.values))
        for v in frame.values:
            if not I32_MIN <= v <= I32_MAX:
                raise FrameError("out_of_range", f"value {v} does not fit in i32")
        body += struct.pack(f"<{len(frame.values)}i", *frame.values)
    elif frame.type == FrameType.HELLO:
        name = _ascii(frame.profile, "profile name", MAX_PROFILE_NAME, allow_empty=True)
        body.append(len(name))
        body += name
    elif frame.type in (FrameType.ACK, FrameType.NACK):
        if not 0 <= frame.code <= 0xFF:
            raise FrameError("out_of_range", f"code {frame.code} does not fit in u8")
        body.append(frame.code)
    else:  # pragma: no cover - FrameType is closed
        raise FrameError("frame_type", f"cannot encode frame type {frame.type!r}")
    body += _CRC.pack(crc16(bytes(body)))
    return cobs_encode(bytes(body)) + DELIMITER


def _hints(body: bytes) -> tuple[int | None, str | None, int | None]:
    """Type, device id and seq read from a frame that failed its CRC, where they are readable at all."""
    if len(body) < _HEAD.size:
        return None, None, None
    _, ftype, n = _HEAD.unpack_from(body)
    if not 1 <= n <= MAX_ID or len(body) < _HEAD.size + n + _SEQ.size:
        return ftype, None, None
    ident = body[_HEAD.size:_HEAD.size + n]
    if not ident.isascii():
        return ftype, None, None
    return ftype, ident.decode("ascii"), _SEQ.unpack_from(body, _HEAD.size + n)[0]


def decode_body(stuffed: bytes) -> Frame:
    """Decode one frame from the bytes between two delimiters (without them)."""
    raw = cobs_decode(stuffed)
    if len(raw) < _MIN_BODY + _CRC.size:
        raise FrameError("truncated", f"{len(raw)} bytes is shorter than any frame", raw=stuffed)
    body, (crc,) = raw[:-_CRC.size], _CRC.unpack_from(raw, len(raw) - _CRC.size)
    if crc16(body) != crc:
        ftype, ident, seq = _hints(body)
        raise FrameError("crc", f"CRC {crc:#06x} does not match {crc16(body):#06x}", raw=stuffed,
                         device_id=ident, seq=seq, frame_type=ftype)
    version, ftype, n = _HEAD.unpack_from(body)
    if version != VERSION:
        raise FrameError("version", f"protocol version {version}, this codec speaks {VERSION}", raw=stuffed)
    try:
        kind = FrameType(ftype)
    except ValueError:
        raise FrameError("frame_type", f"unknown frame type {ftype}", raw=stuffed) from None
    if not 1 <= n <= MAX_ID:
        raise FrameError("malformed", f"device id length {n}", raw=stuffed)
    pos = _HEAD.size + n
    if len(body) < pos + _SEQ.size:
        raise FrameError("truncated", "frame ends inside its header", raw=stuffed)
    ident = body[_HEAD.size:pos]
    if not ident.isascii():
        raise FrameError("malformed", "device id is not ASCII", raw=stuffed)
    device_id = ident.decode("ascii")
    (seq,) = _SEQ.unpack_from(body, pos)
    pos += _SEQ.size

    def bad(reason: str, message: str) -> FrameError:
        return FrameError(reason, message, raw=stuffed, device_id=device_id, seq=seq, frame_type=ftype)

    if kind == FrameType.DATA:
        if len(body) < pos + _DATA.size:
            raise bad("truncated", "DATA frame ends before its timestamp")
        ts_ms, count = _DATA.unpack_from(body, pos)
        pos += _DATA.size
        if len(body) != pos + 4 * count:
            raise bad("truncated" if len(body) < pos + 4 * count else "malformed",
                      f"DATA frame announces {count} fields in {len(body) - pos} bytes")
        values = struct.unpack_from(f"<{count}i", body, pos)
        return Frame(kind, device_id, seq, ts_ms=ts_ms, values=tuple(values))
    if kind == FrameType.HELLO:
        if len(body) < pos + 1 or len(body) != pos + 1 + body[pos]:
            raise bad("malformed", "HELLO profile name length does not match the frame")
        name = body[pos + 1:]
        if not name.isascii():
            raise bad("malformed", "profile name is not ASCII")
        return Frame(kind, device_id, seq, profile=name.decode("ascii"))
    if len(body) != pos + 1:
        raise bad("malformed", f"{kind.name} frame must end with one code byte")
    return Frame(kind, device_id, seq, code=body[pos])


class FrameDecoder:
    """Feed it bytes as they arrive; get back the frames and errors they complete, in order.

    Memory is bounded: at most `max_encoded` bytes of an unfinished frame are kept. Past that the decoder reports
    one "oversize" error and discards everything up to the next delimiter. Empty frames (two delimiters in a row)
    are ignored: senders may put a delimiter in front of a frame to cut off line noise before it.
    """

    def __init__(self, max_encoded: int = MAX_ENCODED) -> None:
        self._max = max_encoded
        self._buf = bytearray()
        self._discarding = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        out: list[Frame | FrameError] = []
        start = 0
        while True:
            end = data.find(0, start)
            if end < 0:
                break
            chunk = data[start:end]
            start = end + 1
            if self._discarding:
                self._discarding = False
                self._buf.clear()
                continue
            if self._buf:
                if len(self._buf) + len(chunk) > self._max:
                    out.append(FrameError("oversize", f"frame longer than {self._max} bytes", raw=bytes(self._buf)))
                    self._buf.clear()
                    continue
                self._buf += chunk
                chunk = bytes(self._buf)
                self._buf.clear()
            if not chunk:
                continue
            if len(chunk) > self._max:
                out.append(FrameError("oversize", f"frame of {len(chunk)} bytes, the limit is {self._max}",
                                      raw=chunk))
                continue
            try:
                out.append(decode_body(chunk))
            except FrameError as exc:
                out.append(exc)
        rest = data[start:]
        if rest and not self._discarding:
            if len(self._buf) + len(rest) > self._max:
                out.append(FrameError("oversize", f"more than {self._max} bytes without a delimiter",
                                      raw=bytes(self._buf) + rest[:64]))
                self._buf.clear()
                self._discarding = True
            else:
                self._buf += rest
        return out


# --- readings <-> DATA -----------------------------------------------------------------------------------------


def _decimals(scale: float) -> int:
    exponent = decimal.Decimal(repr(scale)).as_tuple().exponent
    return max(0, -int(exponent))


def data_frame(device_id: str, seq: int, ts_ms: int, fields: Mapping[str, float], profile: DeviceProfile) -> Frame:
    """A DATA frame for a reading, in `profile`'s field order. Raises FrameError if a field is missing or does not
    fit in i32 once scaled."""
    values: list[int] = []
    for spec in profile.fields:
        if spec.name not in fields:
            raise FrameError("field_count", f"reading has no field {spec.name!r} of profile {profile.name!r}")
        raw = round(fields[spec.name] / spec.scale)
        if not I32_MIN <= raw <= I32_MAX:
            raise FrameError("out_of_range", f"{spec.name}={fields[spec.name]} / {spec.scale} does not fit in i32")
        values.append(raw)
    return Frame(FrameType.DATA, device_id, seq, ts_ms=ts_ms, values=tuple(values))


def to_mapping(frame: Frame, profile: DeviceProfile) -> dict[str, Any]:
    """The telemetry object of a DATA frame: `{"seq": .., "ts": .., field: value, ...}` for `from_mapping`."""
    if len(frame.values) != len(profile.fields):
        raise FrameError("field_count", f"{len(frame.values)} values, profile {profile.name!r} has "
                         f"{len(profile.fields)} fields", device_id=frame.device_id, seq=frame.seq)
    out: dict[str, Any] = {"seq": frame.seq, "ts": frame.ts_ms}
    for spec, raw in zip(profile.fields, frame.values):
        # Round to the scale's own decimals: 2137 * 0.01 is 21.370000000000001 in binary, and the MQTT path would
        # have carried 21.37.
        out[spec.name] = round(raw * spec.scale, _decimals(spec.scale))
    return out
