"""The MQTT packet codec: what the gateway sends is what the standard lays out, and the decoder takes any byte
stream a broker sends apart into the same packets, however the socket reads cut it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mqtt import packets as pk


@pytest.mark.parametrize("n, encoded", [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"), (16_384, b"\x80\x80\x01"),
    (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"), (268_435_455, b"\xff\xff\xff\x7f"),
])
def test_variable_byte_integers_are_the_standards_examples(n, encoded):  # MQTT 5.0, 1.5.5
    assert pk.varint(n) == encoded
    assert pk._varint_at(encoded, 0) == (n, len(encoded))


def test_a_connect_carries_the_session_the_will_and_the_receive_maximum():
    packet = pk.connect("gw-1", version=pk.V5, keepalive=30, clean_start=False, username="gateway",
                        password="s3cret", will=pk.Will("gateway/status", b"offline"), session_expiry=3600,
                        receive_maximum=2000)
    assert packet[0] == 0x10
    length, start = pk._varint_at(packet, 1)
    assert len(packet) == start + length
    body = packet[start:]
    assert body[:7] == b"\x00\x04MQTT\x05"
    flags = body[7]
    assert flags & 0x02 == 0  # clean start off: the broker keeps our session
    assert flags & 0x04 and (flags >> 3) & 0x03 == 1 and flags & 0x20  # will, QoS 1, retained
    assert flags & 0x80 and flags & 0x40  # user name and password
    assert struct.unpack("!H", body[8:10])[0] == 30
    props = pk._decode_properties(body, 10)
    assert props == {pk.P_SESSION_EXPIRY: 3600, pk.P_RECEIVE_MAXIMUM: 2000}
    assert b"\x00\x04gw-1" in body and body.endswith(b"\x00\x07gateway\x00\x06s3cret")


def test_a_3_1_1_connect_has_no_properties():
    packet = pk.connect("gw", version=pk.V311, keepalive=10, session_expiry=3600, receive_maximum=10)
    assert packet == b"\x10\x0e\x00\x04MQTT\x04\x00\x00\x0a\x00\x02gw"


@pytest.mark.parametrize("version", [pk.V5, pk.V311])
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("size", [0, 10, 200, 70_000])
def test_a_publish_decodes_to_what_was_encoded(version, qos, size):
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    packet = pk.publish("feeds/älice/devices/d-1/telemetry".encode(), payload, 513, qos=qos, version=version)
    got = pk.Decoder(version).feed(packet)
    assert got.publishes == [("feeds/älice/devices/d-1/telemetry", payload, 513 if qos else 0)]
    assert not got.pubacks and not got.control


def test_a_resent_publish_carries_the_dup_flag_and_nothing_else_changes():
    packet = pk.publish(b"t", b"p", 7, qos=1, retain=True)
    again = pk.with_dup(packet)
    assert again[0] == packet[0] | 0x08 and again[1:] == packet[1:]


def test_many_pubacks_are_one_buffer_of_four_byte_packets():
    assert pk.pubacks([1, 258, 65535]) == pk.puback(1) + pk.puback(258) + pk.puback(65535)
    assert pk.puback(258) == b"\x40\x02\x01\x02"
    got = pk.Decoder().feed(pk.pubacks([1, 258, 65535]))
    assert got.pubacks == [1, 258, 65535]


def stream() -> bytes:
    """What a broker might send in one go: CONNACK, SUBACK, publishes, PUBACKs, PINGRESP."""
    connack = b"\x20\x08\x01\x00\x05\x21\x00\x14\x24\x01"  # session present, receive max 20, max QoS 1
    suback = b"\x90\x05\x00\x01\x00\x01\x87"  # granted QoS 1, then "not authorized"
    publishes = b"".join(pk.publish(f"devices/d-{i}/telemetry".encode(), b'{"seq":%d}' % i, i + 1, qos=1)
                         for i in range(5))
    return connack + suback + publishes + b"\x40\x03\x00\x09\x10" + b"\xd0\x00"


def test_a_stream_of_mixed_packets_comes_apart_in_order():
    got = pk.Decoder().feed(stream())
    connack, suback, pingresp = got.control
    assert connack == pk.ConnAck(session_present=True, reason=0, receive_maximum=20, maximum_qos=1)
    assert suback == pk.SubAck(1, (1, 0x87))
    assert pingresp == pk.PingResp()
    assert [(t, p, i) for t, p, i in got.publishes] == [
        (f"devices/d-{i}/telemetry", b'{"seq":%d}' % i, i + 1) for i in range(5)]
    assert got.pubacks == [9]  # "no matching subscribers" (0x10) is a success


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(stream()) - 1), max_size=12, unique=True))
def test_any_cut_of_the_stream_into_reads_gives_the_same_packets(cuts):
    data = stream()
    decoder = pk.Decoder()
    publishes, pubacks, control = [], [], []
    bounds = [0, *sorted(cuts), len(data)]
    for a, b in zip(bounds, bounds[1:]):
        got = decoder.feed(data[a:b])
        publishes += got.publishes
        pubacks += got.pubacks
        control += got.control
    whole = pk.Decoder().feed(data)
    assert (publishes, pubacks, control) == (whole.publishes, whole.pubacks, whole.control)


def test_a_3_1_1_stream_has_no_properties_to_skip():
    data = b"\x20\x02\x00\x00" + pk.publish(b"a/b", b"xyz", 3, qos=1, version=pk.V311) + b"\x90\x03\x00\x01\x01"
    got = pk.Decoder(pk.V311).feed(data)
    assert got.control == [pk.ConnAck(False, 0), pk.SubAck(1, (1,))]
    assert got.publishes == [("a/b", b"xyz", 3)]


def test_unsubscribe_names_the_filters_and_the_unsuback_comes_back_with_its_reasons():
    assert pk.unsubscribe(7, ["tele/+/SENSOR", "zigbee2mqtt/#"]) == (
        b"\xa2\x21\x00\x07\x00" + b"\x00\x0dtele/+/SENSOR" + b"\x00\x0dzigbee2mqtt/#")
    assert pk.unsubscribe(7, ["a/b"], version=pk.V311) == b"\xa2\x07\x00\x07\x00\x03a/b"
    # 5.0: packet id, no properties, "success" and "no subscription existed"; 3.1.1: the packet id alone.
    assert pk.Decoder().feed(b"\xb0\x05\x00\x07\x00\x00\x11").control == [pk.UnsubAck(7, (0x00, 0x11))]
    assert pk.Decoder(pk.V311).feed(b"\xb0\x02\x00\x07").control == [pk.UnsubAck(7, ())]


def test_a_disconnect_from_the_broker_says_why():
    reason_string = b"\x1f\x00\x05quota"
    got = pk.Decoder().feed(b"\xe0" + bytes([2 + len(reason_string)]) + b"\x97" + bytes([len(reason_string)])
                            + reason_string)
    assert got.control == [pk.Disconnect(0x97, "quota")]
    assert "quota exceeded" in pk.reason_text(0x97)


@pytest.mark.parametrize("data, why", [
    (b"\x34\x07\x00\x01t\x00\x01\x00p", "QoS 2"),  # PUBLISH QoS 2
    (b"\x32\x0a\x00\x01t\x00\x01\x03\x23\x00\x01p", "topic alias"),  # a topic alias we never allowed
    (b"\x32\x05\x00\x09tt\x00", "topic runs past the packet"),
    (b"\x32\x04\x00\x01t\x00", "malformed"),  # the packet id runs past the end of the stream
    (b"\xa0\x00", "unexpected packet type"),  # UNSUBSCRIBE is the client's to send
    (b"\x30\xff\xff\xff\xff\x01", "longer than 4 bytes"),
])
def test_what_a_broker_must_never_send_is_a_protocol_error(data, why):
    with pytest.raises(pk.ProtocolError, match=why):
        pk.Decoder().feed(data)


def test_a_packet_over_the_limit_is_refused_before_it_is_buffered():
    decoder = pk.Decoder(max_packet=1000)
    with pytest.raises(pk.ProtocolError, match="over the limit"):
        decoder.feed(b"\x30\xe9\x07")  # announces 1001 bytes


def test_a_subscribe_names_every_filter_with_its_qos():
    packet = pk.subscribe(5, ["devices/+/telemetry", "users/+/follows"], qos=1)
    assert packet[0] == 0x82
    body = packet[2:]
    assert body[:3] == b"\x00\x05\x00"
    assert body[3:] == b"\x00\x13devices/+/telemetry\x01\x00\x0fusers/+/follows\x01"
