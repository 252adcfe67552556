"""The feeds' connections: each topic always over the same one, every one of them used."""

from __future__ import annotations

import pytest

from gateway.mqtt.client import MqttClient, Settings
from gateway.mqtt.pool import PublishPool


def clients(n: int) -> list[MqttClient]:
    return [MqttClient(Settings(host="127.0.0.1", port=1, client_id=f"gw-out{i}"), lambda m, c: None)
            for i in range(n)]


def test_a_topic_always_goes_over_the_same_connection_and_all_connections_carry_feeds():
    pool = PublishPool(clients(4))
    topics = [f"feeds/user-{i}/devices/dev-{i % 7}/telemetry".encode() for i in range(400)]
    first = [pool.client_for(t) for t in topics]
    assert [pool.client_for(t) for t in topics] == first
    assert PublishPool(clients(4)).client_for(topics[0]).settings.client_id == first[0].settings.client_id
    share = {c.settings.client_id: sum(1 for f in first if f is c) for c in pool.clients}
    assert min(share.values()) > 400 / 4 / 2, share  # spread, not piled on one


def test_a_publish_waits_in_its_connections_queue_until_that_connection_is_up():
    pool = PublishPool(clients(3))
    topic = b"feeds/alice/devices/dev-1/telemetry"
    assert pool.publish(topic, b"{}", 1)
    assert pool.client_for(topic).queued == 1 and pool.queued == 1 and pool.in_flight == 0


def test_a_pool_needs_a_connection():
    with pytest.raises(ValueError):
        PublishPool([])
