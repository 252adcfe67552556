"""The feeds' connections, before any of them is up: QoS 0 topics by hash, QoS 1 publishes queued on a connection."""

from __future__ import annotations

import pytest

from gateway.mqtt.client import MqttClient, Settings
from gateway.mqtt.pool import PublishPool


def clients(n: int) -> list[MqttClient]:
    return [MqttClient(Settings(host="127.0.0.1", port=1, client_id=f"gw-out{i}"), lambda m, c: None)
            for i in range(n)]


def test_a_qos_0_topic_always_takes_the_connection_its_name_hashes_to_and_all_connections_carry_some():
    pool = PublishPool(clients(4))
    topics = [f"feeds/user-{i}/devices/dev-{i % 7}/telemetry".encode() for i in range(400)]
    first = [pool.client_for(t, qos=0) for t in topics]
    assert [pool.client_for(t, qos=0) for t in topics] == first
    assert PublishPool(clients(4)).client_for(topics[0], qos=0).settings.client_id == first[0].settings.client_id
    share = {c.settings.client_id: sum(1 for f in first if f is c) for c in pool.clients}
    assert min(share.values()) > 400 / 4 / 2, share  # spread, not piled on one


def test_with_every_connection_down_a_publish_waits_in_the_queue_of_the_emptiest_and_its_topic_stays_there():
    pool = PublishPool(clients(3))
    topic = b"feeds/alice/devices/dev-1/telemetry"
    assert pool.publish(topic, b"{}", 1)
    first = pool.client_for(topic)
    assert first.queued == 1 and pool.queued == 1 and pool.in_flight == 0
    assert pool.publish(b"feeds/bob/devices/dev-1/telemetry", b"{}", 1)
    assert pool.client_for(b"feeds/bob/devices/dev-1/telemetry") is not first, "the emptiest queue takes a new topic"
    assert pool.publish(topic, b"{}", 1) and first.queued == 2, "a topic does not leave what it has queued"


def test_a_pool_needs_a_connection():
    with pytest.raises(ValueError):
        PublishPool([])
