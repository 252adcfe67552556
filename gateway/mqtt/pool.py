"""Publishing over several connections: the broker's window is per connection.

    FeedsSink ──publish(topic)──▶ the connection the topic has publishes unacknowledged on, if any;
                                  else the first connection whose window is open ──▶ connection i

An MQTT 5 broker tells each connection how many QoS 1 publishes it may have unacknowledged (its Receive Maximum;
mosquitto's `max_inflight_messages`, 20 by default). A fan-out of ten deliveries per event fills 20 in two events,
and then waits a round trip: one window, not the CPU, bounded the feeds (benchmarks/RESULTS.md). N connections
give N windows.

Which connection: the first, in the pool's order, whose window is open. A moderate load stays on one connection, so
a commit's deliveries leave in one write and their PUBACKs come back on one socket; the next connections open only
when a burst fills the window of those before them.

Order: a feed keeps its order because a topic moves to another connection only when the one it last used has
nothing unacknowledged. Everything it sent there was then PUBACKed, so the broker has queued it to the subscribers
ahead of whatever comes over the next connection. QoS 0 has no acknowledgement to tell that by: a QoS 0 topic
always takes the connection its name hashes to.
"""

from __future__ import annotations

import zlib
from operator import attrgetter
from typing import Sequence

from gateway.mqtt.client import MqttClient, Tracker

# Topics remembered with their connection. Only those whose connection has publishes unacknowledged matter; the rest
# are pruned when the map reaches this size, so it holds about the topics of one burst, not every feed ever served.
OWNERS_PRUNE_AT = 4096


class PublishPool:
    def __init__(self, clients: Sequence[MqttClient]) -> None:
        if not clients:
            raise ValueError("a pool needs at least one connection")
        self.clients = list(clients)
        self._owner: dict[bytes, MqttClient] = {}
        self._prune_at = OWNERS_PRUNE_AT

    def client_for(self, topic: bytes, qos: int = 1) -> MqttClient:
        clients = self.clients
        if len(clients) == 1:
            return clients[0]
        if not qos:
            return clients[zlib.crc32(topic) % len(clients)]
        owner = self._owner.get(topic)
        if owner is not None and owner.unacknowledged:
            return owner
        for client in clients:
            if client.window_open():
                break
        else:
            client = min(clients, key=attrgetter("unacknowledged"))
        if len(self._owner) >= self._prune_at:
            self._owner = {t: c for t, c in self._owner.items() if c.unacknowledged}
            self._prune_at = max(OWNERS_PRUNE_AT, 2 * len(self._owner))  # a burst of many topics: not every insert
        self._owner[topic] = client
        return client

    def publish(self, topic: bytes, payload: bytes, qos: int = 1, retain: bool = False,
                tracker: Tracker | None = None) -> bool:
        """As MqttClient.publish, on the connection `client_for` chooses."""
        return self.client_for(topic, qos).publish(topic, payload, qos, retain, tracker)

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
