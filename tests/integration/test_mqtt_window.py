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
