"""The feeds' connections against a real mosquitto: a moderate load on one connection, a burst over several, and
every feed in its order whichever connections carried it."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.mqtt.client import MqttClient, Settings
from gateway.mqtt.pool import PublishPool
from tests import servers
from tests.mqtt_helpers import Collector

pytestmark = pytest.mark.integration

WINDOW = 5  # our send maximum, below the broker's 1000, so that a burst of a few publishes fills a window


# Each pool's clients' run() tasks, for close().
RUNNING: dict[int, list[asyncio.Task[None]]] = {}


async def pool_of(broker: servers.Server, n: int, *, down_first: bool = False) -> PublishPool:
    host, _, port = broker.address.rpartition(":")
    clients = []
    for i in range(n):
        down = down_first and i == 0
        clients.append(MqttClient(Settings(host=host, port=1 if down else int(port),
                                           client_id=f"pool-{uuid.uuid4().hex[:8]}-{i}", status_topic="",
                                           send_maximum=WINDOW, reconnect_min=60, reconnect_max=60),
                                  lambda m, c: None))
    tasks = [asyncio.create_task(client.run()) for client in clients]
    for client in clients[1:] if down_first else clients:
        await asyncio.wait_for(client.connected.wait(), 15)
        assert client.window == WINDOW
    pool = PublishPool(clients)
    RUNNING[id(pool)] = tasks
    return pool


async def acknowledged(pool: PublishPool) -> None:
    for _ in range(500):
        if pool.in_flight == 0 and pool.queued == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the broker did not acknowledge everything within 10 s")


async def close(pool: PublishPool) -> None:
    for client, task in zip(pool.clients, RUNNING.pop(id(pool))):
        await client.close(timeout=1.0)
        await asyncio.wait_for(task, 10)


def carried(pool: PublishPool) -> list[int]:
    return [c.unacknowledged for c in pool.clients]


def test_a_moderate_load_goes_over_the_first_connection_and_a_burst_opens_the_next_ones(mosquitto):
    prefix = f"pool/{uuid.uuid4().hex[:8]}"

    async def run() -> None:
        pool = await pool_of(mosquitto, 3)
        for round_ in range(3):  # a commit's deliveries, acknowledged before the next commit's
            for i in range(4):
                assert pool.publish(f"{prefix}/feed-{round_}-{i}".encode(), b"{}", 1)
            assert carried(pool) == [4, 0, 0], "within the first window: the first connection alone"
            await acknowledged(pool)
        for i in range(12):  # a burst over two windows
            assert pool.publish(f"{prefix}/burst-{i}".encode(), b"{}", 1)
        assert carried(pool) == [WINDOW, WINDOW, 2], "the next connection opens when the one before it is full"
        await acknowledged(pool)
        await close(pool)

    asyncio.run(run())


def test_a_topic_stays_on_its_connection_while_it_has_publishes_unacknowledged_so_every_feed_keeps_its_order(
        mosquitto):
    prefix = f"pool/{uuid.uuid4().hex[:8]}"
    feeds = Collector(mosquitto.address, f"{prefix}/#")
    topics = [f"{prefix}/feed-{i}" for i in range(7)]

    async def run() -> None:
        pool = await pool_of(mosquitto, 3)
        first = pool.client_for(topics[0].encode())
        sent: dict[str, list[bytes]] = {t: [] for t in topics}
        for i in range(WINDOW):  # the first connection's window full, topics[0] among its publishes
            sent[topics[i % 2]].append(b"w%d" % i)
            pool.publish(topics[i % 2].encode(), sent[topics[i % 2]][-1], 1)
        assert pool.client_for(topics[0].encode()) is first, "not acknowledged yet: it stays"
        assert pool.client_for(topics[2].encode()) is not first, "a new topic takes the next open window"
        for n in range(200):  # bursts well beyond all three windows, with nothing acknowledged in between
            topic = topics[n % len(topics)]
            sent[topic].append(b"%d" % n)
            assert pool.publish(topic.encode(), sent[topic][-1], 1)
            if n % 40 == 39:
                await asyncio.sleep(0)  # some acknowledgements arrive: connections empty and fill again
        await acknowledged(pool)
        await close(pool)
        assert feeds.wait_count(WINDOW + 200)
        received = {t: [p for topic, p, _ in feeds.messages if topic == t] for t in topics}
        for t in topics:
            assert received[t] == sent[t], f"{t} out of order"

    asyncio.run(run())
    feeds.close()


def test_a_connection_that_is_down_is_passed_over_for_new_topics(mosquitto):
    async def run() -> None:
        pool = await pool_of(mosquitto, 2, down_first=True)
        topic = f"pool/{uuid.uuid4().hex[:8]}/feed".encode()
        assert pool.publish(topic, b"{}", 1)
        assert carried(pool) == [0, 1]
        await acknowledged(pool)
        await close(pool)

    asyncio.run(run())
