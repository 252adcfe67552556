"""MQTT 3.1.1 and 5.0 packets: encoding what the gateway sends, decoding what a broker sends. Pure, no I/O.

Only the client side of the protocol, and only what a gateway that subscribes and publishes at QoS 0 and 1 needs:

    sends     CONNECT, SUBSCRIBE, UNSUBSCRIBE, PUBLISH (QoS 0/1), PUBACK, PINGREQ, DISCONNECT
    receives  CONNACK, SUBACK, UNSUBACK, PUBLISH (QoS 0/1), PUBACK, PINGRESP, DISCONNECT (5.0)

`Decoder.feed` takes the bytes of one socket read and returns every complete packet in them, so a read that carries
a hundred PUBLISH packets is parsed in one call and handed on as one batch. PUBLISH packets come out as
`(topic, payload, packet_id)` tuples (packet id 0 for QoS 0) because that is the hot path; the rarer packets come
out as small typed records. Anything a broker must never send us (QoS 2, a topic alias we did not allow, a
malformed length) raises `ProtocolError`, and the connection is dropped: a broker that breaks the protocol cannot be
trusted with the rest of the stream.

References: MQTT Version 5.0 (OASIS Standard, 2019) and MQTT Version 3.1.1 (OASIS Standard, 2014); section numbers
below are the 5.0 document's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Union

V311 = 4  # protocol level byte of MQTT 3.1.1
V5 = 5

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
PUBREC, PUBREL, PUBCOMP = 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT, AUTH = 12, 13, 14, 15

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"  # 3.1.1, and 5.0 with reason 0 (normal disconnection) and no properties

# Property identifiers (2.2.2.2) the client reads or writes.
P_SESSION_EXPIRY = 0x11
P_ASSIGNED_CLIENT_ID = 0x12
P_SERVER_KEEP_ALIVE = 0x13
P_REASON_STRING = 0x1F
P_RECEIVE_MAXIMUM = 0x21
P_TOPIC_ALIAS_MAXIMUM = 0x22
P_TOPIC_ALIAS = 0x23
P_MAXIMUM_QOS = 0x24
P_MAXIMUM_PACKET_SIZE = 0x27
P_USER_PROPERTY = 0x26

# How each property's value is laid out (2.2.2.2), so that unknown ones can be skipped.
_BYTE, _TWO, _FOUR, _VARINT, _STRING, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    0x01: _BYTE, 0x02: _FOUR, 0x03: _STRING, 0x08: _STRING, 0x09: _BINARY, 0x0B: _VARINT, 0x11: _FOUR,
    0x12: _STRING, 0x13: _TWO, 0x15: _STRING, 0x16: _BINARY, 0x17: _BYTE, 0x18: _FOUR, 0x19: _BYTE,
    0x1A: _STRING, 0x1C: _STRING, 0x1F: _STRING, 0x21: _TWO, 0x22: _TWO, 0x23: _TWO, 0x24: _BYTE, 0x25: _BYTE,
    0x26: _PAIR, 0x27: _FOUR, 0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}

MAX_REMAINING_LENGTH = 268_435_455  # four bytes of variable byte integer (1.5.5)

# CONNACK reason codes (3.2.2.2) and 3.1.1 return codes (3.2.2.3) that say "try the older protocol".
UNSUPPORTED_PROTOCOL_V5 = 0x84
UNACCEPTABLE_PROTOCOL_V311 = 0x01

_CONNACK_V311 = {0: "accepted", 1: "unacceptable protocol version", 2: "identifier rejected",
                 3: "server unavailable", 4: "bad user name or password", 5: "not authorized"}
_REASONS_V5 = {
    0x00: "success", 0x04: "disconnect with will message", 0x80: "unspecified error", 0x81: "malformed packet",
    0x82: "protocol error", 0x83: "implementation specific error", 0x84: "unsupported protocol version",
    0x85: "client identifier not valid", 0x86: "bad user name or password", 0x87: "not authorized",
    0x88: "server unavailable", 0x89: "server busy", 0x8A: "banned", 0x8B: "server shutting down",
    0x8C: "bad authentication method", 0x8D: "keep alive timeout", 0x8E: "session taken over",
    0x8F: "topic filter invalid", 0x90: "topic name invalid", 0x93: "receive maximum exceeded",
    0x94: "topic alias invalid", 0x95: "packet too large", 0x96: "message rate too high", 0x97: "quota exceeded",
    0x98: "administrative action", 0x99: "payload format invalid", 0x9A: "retain not supported",
    0x9B: "QoS not supported", 0x9C: "use another server", 0x9D: "server moved",
    0x9E: "shared subscriptions not supported", 0x9F: "connection rate exceeded", 0xA0: "maximum connect time",
    0xA1: "subscription identifiers not supported", 0xA2: "wildcard subscriptions not supported",
}


class ProtocolError(Exception):
    """The broker sent something the protocol does not allow; the connection must be closed."""


def reason_text(code: int, version: int = V5) -> str:
    """A reason or return code as words, for logs and errors."""
    table = _REASONS_V5 if version == V5 else _CONNACK_V311
    return f"{table.get(code, 'unknown reason')} (0x{code:02x})"


# --- encoding ----------------------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    """A variable byte integer (1.5.5)."""
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError(f"string of {len(data)} bytes is longer than MQTT allows (65535)")
    return struct.pack("!H", len(data)) + data


def _binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"binary field of {len(data)} bytes is longer than MQTT allows (65535)")
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


def _properties(props: dict[int, int]) -> bytes:
    """Integer-valued properties only: all the client ever sends."""
    out = bytearray()
    for ident, value in props.items():
        kind = _PROPERTY_TYPES[ident]
        out.append(ident)
        if kind == _BYTE:
            out.append(value)
        elif kind == _TWO:
            out += struct.pack("!H", value)
        elif kind == _FOUR:
            out += struct.pack("!I", value)
        else:
            raise ValueError(f"property 0x{ident:02x} is not an integer property")
    return varint(len(out)) + bytes(out)


def user_properties(pairs: list[tuple[str, str]]) -> bytes:
    """User Properties (3.3.2.3.7), encoded for `publish(properties=...)`: one name-value string pair each."""
    return b"".join(bytes((P_USER_PROPERTY,)) + _string(name) + _string(value) for name, value in pairs)


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def connect(client_id: str, *, version: int = V5, keepalive: int = 60, clean_start: bool = False,
            username: str | None = None, password: str | None = None, will: Will | None = None,
            session_expiry: int = 0, receive_maximum: int = 65535) -> bytes:
    """A CONNECT packet (3.1). `session_expiry` and `receive_maximum` are 5.0 properties; 3.1.1 has neither (a
    3.1.1 session without clean start lasts until the broker's own expiry)."""
    flags = 0x02 if clean_start else 0
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = bytearray(_string("MQTT") + bytes((version, flags)) + struct.pack("!H", keepalive))
    if version == V5:
        props: dict[int, int] = {}
        if session_expiry:
            props[P_SESSION_EXPIRY] = session_expiry
        if receive_maximum != 65535:
            props[P_RECEIVE_MAXIMUM] = receive_maximum
        body += _properties(props)
    body += _string(client_id)
    if will is not None:
        if version == V5:
            body += b"\x00"  # no will properties
        body += _string(will.topic) + _binary(will.payload)
    if username is not None:
        body += _string(username)
    if password is not None:
        body += _binary(password.encode("utf-8"))
    return _packet(CONNECT << 4, bytes(body))


def subscribe(packet_id: int, filters: list[str], qos: int = 1, version: int = V5) -> bytes:
    body = bytearray(struct.pack("!H", packet_id))
    if version == V5:
        body += b"\x00"
    for topic_filter in filters:
        body += _string(topic_filter) + bytes((qos,))
    return _packet((SUBSCRIBE << 4) | 0x02, bytes(body))


def unsubscribe(packet_id: int, filters: list[str], version: int = V5) -> bytes:
    body = bytearray(struct.pack("!H", packet_id))
    if version == V5:
        body += b"\x00"
    for topic_filter in filters:
        body += _string(topic_filter)
    return _packet((UNSUBSCRIBE << 4) | 0x02, bytes(body))


def publish(topic: bytes, payload: bytes, packet_id: int, *, qos: int = 1, retain: bool = False,
            dup: bool = False, version: int = V5, properties: bytes = b"") -> bytes:
    """A PUBLISH packet. `topic` is the UTF-8 topic name, already encoded: the hot path encodes a follower's topic
    once and may send many payloads to it. `packet_id` is ignored at QoS 0. `properties`: 5.0 properties, encoded
    (`user_properties`); 3.1.1 has none, so they are left out there."""
    first = (PUBLISH << 4) | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    if qos:
        head = struct.pack("!H", len(topic)) + topic + struct.pack("!H", packet_id)
    else:
        head = struct.pack("!H", len(topic)) + topic
    if version == V5:
        head += varint(len(properties)) + properties if properties else b"\x00"
    length = len(head) + len(payload)
    if length < 128:
        return bytes((first, length)) + head + payload
    return bytes((first,)) + varint(length) + head + payload


def with_dup(packet: bytes) -> bytes:
    """The same PUBLISH with its DUP flag set, for a resend after reconnecting (4.4)."""
    return bytes((packet[0] | 0x08,)) + packet[1:]


def puback(packet_id: int) -> bytes:
    """A PUBACK with reason 0: four bytes in both versions (5.0 lets the reason code be left out when it is 0)."""
    return struct.pack("!BBH", PUBACK << 4, 2, packet_id)


def pubacks(packet_ids: list[int]) -> bytes:
    """Many PUBACKs as one buffer, for one socket write after a group commit."""
    return struct.pack("!" + "BBH" * len(packet_ids), *[v for pid in packet_ids for v in (0x40, 2, pid)])


def disconnect(reason: int = 0, version: int = V5) -> bytes:
    if version == V5 and reason:
        return bytes((DISCONNECT << 4, 2, reason, 0))
    return DISCONNECT_PACKET


# --- decoding ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnAck:
    session_present: bool
    reason: int  # 0: accepted; otherwise a 5.0 reason code or a 3.1.1 return code
    receive_maximum: int = 65535  # how many QoS 1 publishes the broker takes unacknowledged
    maximum_packet_size: int = MAX_REMAINING_LENGTH + 5
    maximum_qos: int = 2
    server_keep_alive: int | None = None
    assigned_client_id: str | None = None
    reason_string: str | None = None


@dataclass(frozen=True)
class SubAck:
    packet_id: int
    reasons: tuple[int, ...]  # per filter: the granted QoS (0-2), or a failure code (0x80 and above)


@dataclass(frozen=True)
class UnsubAck:
    packet_id: int
    reasons: tuple[int, ...]  # 5.0: per filter, 0 or 0x11 (no subscription existed) or a failure; 3.1.1: none


@dataclass(frozen=True)
class PubAck:
    packet_id: int
    reason: int = 0  # 0x10 "no matching subscribers" is a success too


@dataclass(frozen=True)
class PingResp:
    pass


@dataclass(frozen=True)
class Disconnect:
    reason: int
    reason_string: str | None = None


Control = Union[ConnAck, SubAck, UnsubAck, PubAck, PingResp, Disconnect]
Inbound = tuple[str, bytes, int]  # a PUBLISH: topic, payload, packet id (0 at QoS 0)


@dataclass
class Received:
    """What one `feed` decoded, in arrival order within each list."""

    publishes: list[Inbound] = field(default_factory=list)
    pubacks: list[int] = field(default_factory=list)  # packet ids the broker acknowledged
    control: list[Control] = field(default_factory=list)  # everything else


class Decoder:
    """Splits the byte stream from the broker into packets. One per connection.

    `parse(buffer, end)` reads the complete packets at the start of a buffer the caller owns (the connection's read
    buffer) and says how many bytes they took; `feed(data)` keeps a partial packet itself, for callers that hand
    over the stream in pieces.
    """

    def __init__(self, version: int = V5, max_packet: int = MAX_REMAINING_LENGTH) -> None:
        self.version = version
        self.max_packet = max_packet
        self._buffer = b""

    def feed(self, data: bytes) -> Received:
        buf = self._buffer + data if self._buffer else data
        got, used = self.parse(buf, len(buf))
        self._buffer = buf[used:]
        return got

    def parse(self, buf: bytes | bytearray, end: int) -> tuple[Received, int]:
        """The complete packets in buf[:end], and how many bytes they took (the rest is a packet's beginning)."""
        view = memoryview(buf)
        try:
            got, used = self._parse(buf, view, end)
        except (IndexError, struct.error):
            # A field that runs past its packet (a topic length longer than the packet, say): malformed.
            raise ProtocolError("malformed packet from the broker") from None
        finally:
            view.release()
        if end - used > 5:
            pending = self.pending_length(buf, used)
            if pending > self.max_packet:
                raise ProtocolError(f"packet of {pending} bytes is over the limit of {self.max_packet}")
        return got, used

    def _parse(self, buf: bytes | bytearray, view: memoryview, end: int) -> tuple[Received, int]:
        out = Received()
        publishes, pubacks = out.publishes, out.pubacks
        v5 = self.version == V5
        pos = 0
        while pos + 2 <= end:
            first = buf[pos]
            # The remaining length: one byte nearly always (a feed publish is well under 128 bytes of header).
            length = buf[pos + 1]
            start = pos + 2
            if length & 0x80:
                length, start = self._long_length(buf, pos + 1, end)
                if start < 0:
                    break  # the length itself is not complete yet
            stop = start + length
            if stop > end:
                break
            kind = first >> 4
            if kind == PUBLISH:
                qos = (first >> 1) & 0x03
                topic_len = (buf[start] << 8) | buf[start + 1]
                i = start + 2 + topic_len
                if i > stop:
                    raise ProtocolError("PUBLISH topic runs past the packet")
                try:
                    topic = str(view[start + 2:i], "utf-8")
                except UnicodeDecodeError:
                    raise ProtocolError("PUBLISH topic is not UTF-8") from None
                packet_id = 0
                if qos:
                    if qos == 2:
                        raise ProtocolError("QoS 2 PUBLISH on a subscription granted at most QoS 1")
                    packet_id = (buf[i] << 8) | buf[i + 1]
                    i += 2
                if v5:
                    props_len = buf[i]
                    i += 1
                    if props_len & 0x80:
                        props_len, i = _varint_at(buf, i - 1)
                    if props_len:
                        if P_TOPIC_ALIAS in _property_ids(bytes(view[i:i + props_len])):
                            raise ProtocolError("PUBLISH with a topic alias; the client allows none")
                        i += props_len
                if i > stop:
                    raise ProtocolError("PUBLISH shorter than its own header")
                publishes.append((topic, bytes(view[i:stop]), packet_id))
            elif kind == PUBACK:
                if length < 2:
                    raise ProtocolError("PUBACK without a packet identifier")
                pubacks.append((buf[start] << 8) | buf[start + 1])
                if length > 2 and buf[start + 2] >= 0x80:
                    out.control.append(PubAck((buf[start] << 8) | buf[start + 1], buf[start + 2]))
            else:
                out.control.append(self._control(kind, bytes(view[start:stop])))
            pos = stop
        return out, pos

    def pending_length(self, buf: bytes | bytearray, at: int) -> int:
        """The announced size of the packet starting at `at` (0 while its length is incomplete)."""
        try:
            length, start = _varint_at(buf, at + 1)
        except IndexError:
            return 0
        return length + start - at

    def _long_length(self, buf: bytes | bytearray, at: int, end: int) -> tuple[int, int]:
        """(length, offset of the packet's body) for a remaining length of 2-4 bytes; start -1 when incomplete."""
        try:
            length, start = _varint_at(buf, at, end)
        except IndexError:
            return 0, -1
        if length > self.max_packet:
            raise ProtocolError(f"packet of {length} bytes is over the limit of {self.max_packet}")
        return length, start

    def _control(self, kind: int, body: bytes) -> Control:
        v5 = self.version == V5
        if kind == CONNACK:
            if len(body) < 2:
                raise ProtocolError("CONNACK shorter than 2 bytes")
            props = _decode_properties(body, 2) if v5 and len(body) > 2 else {}
            return ConnAck(
                session_present=bool(body[0] & 0x01), reason=body[1],
                receive_maximum=int(props.get(P_RECEIVE_MAXIMUM, 65535)),  # type: ignore[arg-type]
                maximum_packet_size=int(props.get(P_MAXIMUM_PACKET_SIZE, MAX_REMAINING_LENGTH + 5)),  # type: ignore
                maximum_qos=int(props.get(P_MAXIMUM_QOS, 2)),  # type: ignore[arg-type]
                server_keep_alive=props.get(P_SERVER_KEEP_ALIVE),  # type: ignore[arg-type]
                assigned_client_id=props.get(P_ASSIGNED_CLIENT_ID),  # type: ignore[arg-type]
                reason_string=props.get(P_REASON_STRING))  # type: ignore[arg-type]
        if kind == SUBACK:
            if len(body) < 3:
                raise ProtocolError("SUBACK without reason codes")
            packet_id = (body[0] << 8) | body[1]
            i = 2
            if v5:
                props_len, i = _varint_at(body, 2)
                i += props_len
            return SubAck(packet_id, tuple(body[i:]))
        if kind == UNSUBACK:
            if len(body) < 2:
                raise ProtocolError("UNSUBACK shorter than 2 bytes")
            i = 2
            if v5 and len(body) > 2:
                props_len, i = _varint_at(body, 2)
                i += props_len
            return UnsubAck((body[0] << 8) | body[1], tuple(body[i:]))
        if kind == PINGRESP:
            return PingResp()
        if kind == DISCONNECT and v5:
            reason = body[0] if body else 0
            props = _decode_properties(body, 1) if len(body) > 1 else {}
            return Disconnect(reason, props.get(P_REASON_STRING))  # type: ignore[arg-type]
        raise ProtocolError(f"unexpected packet type {kind} from the broker")


def _varint_at(buf: bytes | bytearray, at: int, end: int | None = None) -> tuple[int, int]:
    """(value, offset after it) of the variable byte integer at `at`; IndexError when the buffer (or `end`) ends
    first."""
    value, shift = 0, 0
    for i in range(at, at + 4):
        if end is not None and i >= end:
            raise IndexError(i)
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise ProtocolError("variable byte integer longer than 4 bytes")


def _property_ids(props: bytes) -> set[int]:
    return set(_decode_properties(props, 0, with_length=False))


def _decode_properties(body: bytes, at: int, with_length: bool = True) -> dict[int, object]:
    """The properties starting at `at` (with their length prefix unless `with_length` is False). Repeated ones
    (user properties) keep their last value: the client reads none of those."""
    if with_length:
        length, i = _varint_at(body, at)
    else:
        length, i = len(body) - at, at
    stop = i + length
    if stop > len(body):
        raise ProtocolError("properties run past the end of the packet")
    out: dict[int, object] = {}
    while i < stop:
        ident = body[i]
        kind = _PROPERTY_TYPES.get(ident)
        i += 1
        if kind is None:
            raise ProtocolError(f"unknown property 0x{ident:02x}")
        value: object
        if kind == _BYTE:
            value, i = body[i], i + 1
        elif kind == _TWO:
            value, i = struct.unpack_from("!H", body, i)[0], i + 2
        elif kind == _FOUR:
            value, i = struct.unpack_from("!I", body, i)[0], i + 4
        elif kind == _VARINT:
            value, i = _varint_at(body, i)
        else:
            n = struct.unpack_from("!H", body, i)[0]
            raw = body[i + 2:i + 2 + n]
            i += 2 + n
            if kind == _PAIR:
                m = struct.unpack_from("!H", body, i)[0]
                i += 2 + m
            value = raw.decode("utf-8", "replace") if kind == _STRING else raw
        out[ident] = value
    if i != stop:
        raise ProtocolError("a property runs past the end of its list")
    return out
