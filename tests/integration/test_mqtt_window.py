"""The gateway's MQTT link against a real mosquitto: how much the broker may hand us before we acknowledge."""

from __future__ import annotations

import asyncio

import paho.mqtt.client as mqtt

from gateway.config import MqttConfig
from gateway.metrics import Metrics
from gateway.mqtt_link import MqttLink


def publish_backlog(address: str, topic: str, n: int) -> None:
    host, _, port = address.rpartition(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="window-device", protocol=mqtt.MQTTv5)
    client.connect(host, int(port))
    client.loop_start()
    infos = [client.publish(topic, b'{"t": 1.0}', qos=1) for _ in range(n)]
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


async def held_messages(address: str, max_inflight: int, client_id: str) -> tuple[int, int]:
    """Connect a link that takes every message and never acknowledges one; how many arrive, and the link's own
    publish window (from the broker's CONNACK)."""
    taken: list[object] = []

    async def general(topic: str, payload: bytes, properties: dict) -> int:
        return 0

    def take(topic: str, payload: bytes, token: object) -> bool:
        taken.append(token)
        return True

    cfg = MqttConfig(broker=address, client_id=client_id, max_inflight=max_inflight)
    link = MqttLink(cfg, Metrics(), general, ["window/+/telemetry"], take=take)
    await link.connect()
    await asyncio.sleep(1.5)  # the broker sends what it may at once; give it time to send more if it would
    arrived = len(taken)
    window = link.tracker.limit
    await link.client.disconnect()
    return arrived, window


def test_the_broker_sends_at_most_max_inflight_unacknowledged_messages_from_a_queued_backlog(mosquitto):
    # First connection makes the persistent session and its subscription; the backlog queues while we are away.
    asyncio.run(held_messages(mosquitto.address, 150, "window-gw"))
    publish_backlog(mosquitto.address, "window/dev-1/telemetry", 600)
    arrived, window = asyncio.run(held_messages(mosquitto.address, 150, "window-gw"))
    assert arrived == 150
    assert window == 150  # and our own publishes keep to the same window


def test_our_publish_window_follows_the_brokers_receive_maximum_not_the_one_we_asked_for(mosquitto):
    # mosquitto.conf: max_inflight_messages 1000. Exceeding it would get the gateway disconnected.
    arrived, window = asyncio.run(held_messages(mosquitto.address, 5000, "window-gw-2"))
    assert window == 1000 - 2


class Gate:
    """Room for `limit` messages, then none until opened: what the ingestor says when it is full."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self.opened = asyncio.Event()

    def has_room(self) -> bool:
        return self.taken < self.limit or self.opened.is_set()

    async def room(self) -> None:
        await self.opened.wait()


def test_a_closed_read_gate_stops_the_link_reading_and_opening_it_resumes(mosquitto):
    # 1 KiB payloads: one 64 KiB read of the socket holds about 60 of them, far fewer than the broker's window.
    payload = b'{"t": 1.0, "pad": "' + b"x" * 1000 + b'"}'

    async def run() -> tuple[int, int]:
        gate = Gate(limit=100)

        async def general(topic: str, payload: bytes, properties: dict) -> int:
            return 0

        def take(topic: str, payload: bytes, token: object) -> bool:
            gate.taken += 1
            return True

        def open_gate() -> None:
            nonlocal while_closed
            while_closed = gate.taken
            gate.opened.set()

        while_closed = 0
        # Opened by the clock, not after connect(): gmqtt's connect waits for the PUBACKs of publishes it
        # re-sends from the last connection, and those arrive behind the gate (the ingestor opens it on its own).
        asyncio.get_running_loop().call_later(1.5, open_gate)
        cfg = MqttConfig(broker=mosquitto.address, client_id="gate-gw", max_inflight=5000)
        link = MqttLink(cfg, Metrics(), general, ["gate/+/telemetry"], take=take, read_gate=gate)
        await link.connect()
        await gate.opened.wait()
        await asyncio.sleep(1.5)
        await link.client.disconnect()
        return while_closed, gate.taken

    asyncio.run(run())  # the session and its subscription
    host, _, port = mosquitto.address.rpartition(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="gate-device", protocol=mqtt.MQTTv5)
    client.connect(host, int(port))
    client.loop_start()
    for info in [client.publish("gate/dev-1/telemetry", payload, qos=1) for _ in range(800)]:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()

    while_closed, after = asyncio.run(run())
    assert 100 <= while_closed < 100 + 2 * 65  # the read that crossed the limit, and nothing after it
    assert after == 800
