"""Publishing over several connections: the broker's window is per connection.

    FeedsSink ──publish(topic)──▶ crc32(topic) mod N ──▶ connection i (its own window, queue, PUBACKs)

An MQTT 5 broker tells each connection how many QoS 1 publishes it may have unacknowledged (its Receive Maximum;
mosquitto's `max_inflight_messages`, 20 by default). A fan-out of ten deliveries per event fills 20 in two events,
and then waits a round trip: one window, not the CPU, bounded the feeds (benchmarks/RESULTS.md). Spreading the
publishes over N connections gives N windows. A topic always goes over the same connection, so every feed keeps
its order; the connections' order among themselves does not matter, as no feed spans two.
"""

from __future__ import annotations

import zlib
from typing import Sequence

from gateway.mqtt.client import MqttClient, Tracker


class PublishPool:
    def __init__(self, clients: Sequence[MqttClient]) -> None:
        if not clients:
            raise ValueError("a pool needs at least one connection")
        self.clients = list(clients)

    def client_for(self, topic: bytes) -> MqttClient:
        clients = self.clients
        return clients[zlib.crc32(topic) % len(clients)] if len(clients) > 1 else clients[0]

    def publish(self, topic: bytes, payload: bytes, qos: int = 1, retain: bool = False,
                tracker: Tracker | None = None) -> bool:
        """As MqttClient.publish, on the topic's connection."""
        return self.client_for(topic).publish(topic, payload, qos, retain, tracker)

    async def room(self) -> None:
        """Until every connection takes publishes again (a full queue is rare: it holds thousands)."""
        for client in self.clients:
            await client.room()

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self.clients)

    @property
    def queued(self) -> int:
        return sum(c.queued for c in self.clients)
