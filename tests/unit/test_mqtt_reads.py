"""How the client's connection hands what it reads to the gateway: every complete packet of one socket read in one
batch, whatever way the reads cut the stream, with a packet larger than the read buffer growing it only while that
packet is in."""

from __future__ import annotations

from gateway.mqtt import packets as pk
from gateway.mqtt.client import READ_SIZE, MqttClient, Settings, _Connection


class Batches:
    def __init__(self) -> None:
        self.calls: list[list[tuple[str, bytes, int]]] = []

    def __call__(self, messages, connection_no) -> None:
        self.calls.append(list(messages))

    @property
    def payloads(self) -> list[bytes]:
        return [payload for call in self.calls for _, payload, _ in call]


def connection() -> tuple[_Connection, Batches]:
    taken = Batches()
    client = MqttClient(Settings(host="127.0.0.1", port=1, client_id="reads"), taken)
    return _Connection(client, pk.V5), taken


def read(conn: _Connection, data: bytes) -> None:
    """What asyncio does for one socket read that brings `data`: fill the buffer it is given, at most its size."""
    while data:
        buffer = conn.get_buffer(-1)
        n = min(len(buffer), len(data))
        buffer[:n] = data[:n]
        conn.buffer_updated(n)
        data = data[n:]


def stream(payloads: list[bytes]) -> bytes:
    return b"".join(pk.publish(b"d/1/telemetry", p, i + 1) for i, p in enumerate(payloads))


def test_all_the_publishes_of_one_read_are_handed_on_in_one_call():
    conn, taken = connection()
    payloads = [b'{"n": %d}' % i for i in range(300)]
    read(conn, stream(payloads))
    assert len(taken.calls) == 1
    assert taken.payloads == payloads
    assert [pid for _, _, pid in taken.calls[0]] == list(range(1, 301))


def test_a_packet_cut_by_a_read_is_handed_on_whole_with_the_next_read():
    conn, taken = connection()
    data = stream([b"first", b"second", b"third"])
    cut = len(data) - 3
    read(conn, data[:cut])
    read(conn, data[cut:])
    assert taken.calls[0] and [p for _, p, _ in taken.calls[0]] == [b"first", b"second"]
    assert [p for _, p, _ in taken.calls[-1]] == [b"third"]


def test_a_packet_larger_than_the_buffer_grows_it_and_the_buffer_shrinks_back_after():
    conn, taken = connection()
    large = b"x" * (5 * READ_SIZE)
    payloads = [b"before", large, b"after"]
    read(conn, stream(payloads))
    assert taken.payloads == payloads
    assert len(taken.calls) <= 1 + len(large) // READ_SIZE + 2  # one call per read that completed a packet at most
    assert len(conn.get_buffer(-1)) == READ_SIZE
