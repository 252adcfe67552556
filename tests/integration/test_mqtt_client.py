"""The gateway's own MQTT client against a real mosquitto: batches in, acknowledgements only when told, the broker's
window, keepalive, reconnects that lose nothing, the status and its will."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Callable

import pytest

from gateway.mqtt.client import MqttClient, Settings
from tests import servers
from tests.mqtt_helpers import Collector, publish_all
from tests.waiting import until

pytestmark = pytest.mark.integration


def uid(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


class Taken:
    """What the client hands over: every batch, as (topic, payload, packet id) lists, with its connection."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[tuple[str, bytes, int]], int]] = []

    def __call__(self, messages: list[tuple[str, bytes, int]], connection_no: int) -> None:
        self.batches.append((list(messages), connection_no))

    @property
    def messages(self) -> list[tuple[str, bytes, int]]:
        return [m for batch, _ in self.batches for m in batch]


def settings(broker: servers.Server, client_id: str, *topics: str, **kw: Any) -> Settings:
    host, _, port = broker.address.rpartition(":")
    return Settings(host=host, port=int(port), client_id=client_id, subscriptions=topics,
                    status_topic=f"status/{client_id}", **kw)


async def connected(s: Settings, taken: Taken, **kw: Any) -> tuple[MqttClient, asyncio.Task[None]]:
    client = MqttClient(s, taken, **kw)
    task = asyncio.create_task(client.run())
    await asyncio.wait_for(client.connected.wait(), 15)
    return client, task


async def closed(client: MqttClient, task: asyncio.Task[None]) -> None:
    await client.close()
    await asyncio.wait_for(task, 10)


def test_a_backlog_arrives_in_order_and_only_what_was_acknowledged_is_not_sent_again(mosquitto):
    client_id, topic = uid("batch-gw-"), f"batch/{uid('d')}/telemetry"
    s = settings(mosquitto, client_id, "batch/+/telemetry")

    async def session(ack: bool, expect: int = 0) -> Taken:
        """Connects, takes what the broker holds for us (`expect` messages; none: what a second brings), and
        acknowledges it or not."""
        taken = Taken()
        client, task = await connected(s, taken)
        if expect:
            await until(lambda: len(taken.messages) >= expect, what=f"{expect} messages")
        else:
            await asyncio.sleep(1.0)
        if ack:
            for batch, connection_no in taken.batches:
                client.ack([pid for _, _, pid in batch], connection_no)
            await asyncio.sleep(0.3)
        await closed(client, task)
        return taken

    asyncio.run(session(ack=True))  # makes the persistent session and its subscription
    sent = [b'{"n": %d}' % i for i in range(300)]
    sent[150] = b"x" * 300_000  # larger than a read: the client's buffer grows for it, then shrinks back
    publish_all(mosquitto.address, [(topic, p) for p in sent])
    first = asyncio.run(session(ack=False, expect=len(sent)))
    assert [p for _, p, _ in first.messages] == sent  # how reads make batches: tests/unit/test_mqtt_reads.py
    again = asyncio.run(session(ack=True, expect=len(sent)))  # nothing was acknowledged: all of it again
    assert [p for _, p, _ in again.messages] == [p for _, p, _ in first.messages]
    assert asyncio.run(session(ack=False)).messages == []  # acknowledged: gone from the session


def test_an_acknowledgement_meant_for_an_earlier_connection_is_not_sent_on_a_new_one(mosquitto):
    client_id, topic = uid("stale-gw-"), f"stale/{uid('d')}/telemetry"
    s = settings(mosquitto, client_id, "stale/+/telemetry")

    async def run() -> Taken:
        taken = Taken()
        client, task = await connected(s, taken)
        publish_all(mosquitto.address, [(topic, b"1")])
        await until(lambda: len(taken.messages) == 1, what="the message")
        (_, _, pid), = taken.messages
        old = taken.batches[0][1]
        client._lost_now("test")  # the connection drops before the log committed the message
        await until(lambda: client.connection_no > old and client.connected.is_set(), what="a reconnect")
        client.ack([pid], old)  # the commit finishes now: too late for that connection
        await until(lambda: len(taken.messages) == 2, what="the broker's resend")
        (_, payload, pid2), = taken.batches[-1][0]
        client.ack([pid2], taken.batches[-1][1])
        await asyncio.sleep(0.3)
        await closed(client, task)
        return taken

    taken = asyncio.run(run())
    assert [p for _, p, _ in taken.messages] == [b"1", b"1"]


def test_publishes_keep_to_the_brokers_window_and_the_rest_wait_in_order_in_a_bounded_queue(mosquitto):
    topic = f"win/{uid('out')}"
    feed = Collector(mosquitto.address, topic)

    async def run() -> None:
        client, task = await connected(settings(mosquitto, uid("win-gw-")), Taken(), queue_limit=500)
        assert client.window == 1000  # mosquitto.conf: max_inflight_messages 1000 (its CONNACK's receive maximum)
        await until(lambda: client.in_flight == 0, what="the PUBACK of the retained online status")
        acked: list[int] = []

        class Tracker:
            def acked(self) -> None:
                acked.append(1)

        taken = 0
        while client.publish(topic.encode(), b"%d" % taken, qos=1, tracker=Tracker()):
            taken += 1
        # Nothing was acknowledged yet (this loop pass never yielded): the window is full, the queue too.
        assert taken == 1500 and client.in_flight == 1000 and client.queued == 500
        await asyncio.wait_for(client.room(), 10)
        assert client.publish(topic.encode(), b"%d" % taken, qos=1, tracker=Tracker())
        await until(lambda: len(acked) == 1501, what="every PUBACK")
        assert client.queued == 0
        await closed(client, task)

    asyncio.run(run())
    assert feed.wait_count(1501)
    assert [p for _, p, _ in feed.messages] == [b"%d" % i for i in range(1501)], "in order"
    feed.close()


def test_a_silent_broker_is_noticed_by_the_keepalive_and_nothing_in_flight_is_lost(private_mosquitto):
    broker = private_mosquitto
    feed = Collector(broker.address, "silent/#", client_id=uid("silent-sub-"), clean_start=False)
    s = settings(broker, uid("silent-gw-"), keepalive=1, reconnect_min=0.2, reconnect_max=0.5, connect_timeout=2)

    async def run() -> MqttClient:
        client, task = await connected(s, Taken())
        broker.pause()
        try:
            for i in range(50):  # written to the socket, never read: no PUBACK comes back
                assert client.publish(b"silent/out", b"%d" % i, qos=1)
            await until(lambda: not client.connected.is_set(), timeout=4, what="the keepalive noticing")
        finally:
            broker.resume()
        await until(lambda: client.connected.is_set(), timeout=20, what="the reconnect")
        await until(lambda: client.in_flight == 0, what="the resent publishes acknowledged")
        await closed(client, task)
        return client

    client = asyncio.run(run())
    assert client.stats.disconnects >= 1 and client.stats.resent >= 1
    assert feed.wait_for(lambda m: {p for _, p, _ in m} >= {b"%d" % i for i in range(50)})
    feed.close()


def test_new_subscriptions_take_effect_live_and_survive_a_broker_that_did_not_answer(private_mosquitto, caplog):
    """resubscribe() on a live connection: a new filter is delivered at once, a dropped one no longer is. Against a
    frozen broker it gives up after the connect timeout without raising, and the connection that replaces the
    silent one subscribes to the new list."""
    broker = private_mosquitto
    s = settings(broker, uid("resub-gw-"), "resub/a/#", keepalive=1, reconnect_min=0.2, reconnect_max=0.5,
                 connect_timeout=1)

    async def run() -> Taken:
        taken = Taken()
        client, task = await connected(s, taken)
        assert await client.resubscribe(["resub/a/#", "resub/b/#"]) == []
        publish_all(broker.address, [("resub/b/1", b"b1")])
        await until(lambda: (b"b1" in [p for _, p, _ in taken.messages]), what="the new filter's message")
        assert await client.resubscribe(["resub/b/#"]) == []  # resub/a/# dropped
        publish_all(broker.address, [("resub/a/1", b"a1"), ("resub/b/2", b"b2")])
        await until(lambda: (b"b2" in [p for _, p, _ in taken.messages]), what="the kept filter's message")

        broker.pause()  # the SUBSCRIBE is written and never answered
        try:
            assert await client.resubscribe(["resub/b/#", "resub/c/#"]) == []
            assert client.settings.subscriptions == ("resub/b/#", "resub/c/#")
            await until(lambda: not client.connected.is_set(), timeout=4, what="the keepalive noticing")
        finally:
            broker.resume()
        await until(lambda: client.connected.is_set(), timeout=20, what="the reconnect")
        publish_all(broker.address, [("resub/c/1", b"c1")])
        await until(lambda: (b"c1" in [p for _, p, _ in taken.messages]), what="the message of the filter "
                    "subscribed to on the new connection")
        await closed(client, task)
        return taken

    with caplog.at_level("WARNING", logger="gateway.mqtt.client"):
        taken = asyncio.run(run())
    assert b"a1" not in [p for _, p, _ in taken.messages]  # published after its filter was dropped
    assert "no acknowledgement of the new subscriptions" in caplog.text


def test_the_status_is_online_while_connected_and_offline_after_close_or_a_crash(mosquitto):
    s = settings(mosquitto, uid("status-gw-"), reconnect_min=0.2, reconnect_max=0.5)

    def statuses(messages: list[tuple[str, bytes, bool]]) -> list[bytes]:
        """The payloads, a repeat of the one before left out: a QoS 1 `online` whose PUBACK the crash cut off
        is sent again on the next connection, besides that connection's own."""
        said: list[bytes] = []
        for _, payload, _ in messages:
            if said[-1:] != [payload]:
                said.append(payload)
        return said

    async def run() -> None:
        client, task = await connected(s, Taken())
        status = Collector(mosquitto.address, s.status_topic)
        assert status.wait_for(lambda m: statuses(m)[-1:] == [b"online"])

        before = len(statuses(status.messages))
        client._lost_now("test")  # no DISCONNECT: the broker publishes the will
        # In a thread: the event loop must run for the abort to close the socket and for the reconnect.
        assert await asyncio.to_thread(status.wait_for, lambda m: statuses(m)[before:][:1] == [b"offline"])
        assert await asyncio.to_thread(status.wait_for, lambda m: statuses(m)[before:] == [b"offline", b"online"])
        await until(lambda: client.connected.is_set(), what="the reconnect")

        await closed(client, task)
        assert status.wait_for(lambda m: statuses(m)[before:] == [b"offline", b"online", b"offline"])
        status.close()

    asyncio.run(run())


def test_a_close_while_the_connection_is_being_made_leaves_it_unmade(mosquitto):
    """close() right after run() started: the TCP connect is under way and there is nothing to abort yet. The
    connection that then comes up is dropped before the handshake: no CONNECT, so no `online` either."""
    s = settings(mosquitto, uid("early-close-gw-"))

    async def run() -> MqttClient:
        client = MqttClient(s, Taken())
        task = asyncio.create_task(client.run())
        await asyncio.sleep(0)  # run() is now awaiting the TCP connect
        await client.close()
        await asyncio.wait_for(task, 10)
        return client

    client = asyncio.run(run())
    assert client.stats.connects == 0 and not client.connected.is_set()
    status = Collector(mosquitto.address, s.status_topic)  # a retained status would arrive on subscribing
    assert not status.wait_for(lambda m: len(m) > 0, timeout=0.5)
    status.close()


def test_mqtt_3_1_1_works_the_same_way(mosquitto):
    topic = f"v311/{uid('d')}/telemetry"

    async def run() -> Taken:
        taken = Taken()
        client, task = await connected(settings(mosquitto, uid("v311-gw-"), "v311/+/telemetry", protocol="3.1.1"),
                                       taken)
        publish_all(mosquitto.address, [(topic, b"a"), (topic, b"b")])
        await until(lambda: len(taken.messages) == 2, what="both messages")
        client.ack([pid for _, _, pid in taken.messages], taken.batches[-1][1])
        await closed(client, task)
        return taken

    assert [p for _, p, _ in asyncio.run(run()).messages] == [b"a", b"b"]


def test_pausing_the_reads_holds_the_broker_back_and_resuming_delivers_the_rest(mosquitto):
    topic = f"gate/{uid('d')}/telemetry"
    payload = b"x" * 2000  # a socket read holds a few dozen of these, far fewer than the broker's window

    async def run() -> tuple[int, int]:
        taken = Taken()
        client: MqttClient | None = None

        def take(messages: list[tuple[str, bytes, int]], connection_no: int) -> None:
            taken(messages, connection_no)
            assert client is not None
            client.pause_reading()  # what the MQTT source does when the log has no room

        client = MqttClient(settings(mosquitto, uid("gate-gw-"), "gate/+/telemetry"), take)
        task = asyncio.create_task(client.run())
        await asyncio.wait_for(client.connected.wait(), 15)
        publish_all(mosquitto.address, [(topic, payload)] * 500)
        await until(lambda: taken.messages, what="the first read")
        await asyncio.sleep(1.0)
        while_paused = len(taken.messages)
        client.take = taken  # type: ignore[attr-defined]
        client._on_publishes = taken
        client.resume_reading()
        await until(lambda: len(taken.messages) == 500, what="the rest")
        client.ack([pid for _, _, pid in taken.messages], taken.batches[-1][1])
        await closed(client, task)
        return while_paused, len(taken.messages)

    while_paused, total = asyncio.run(run())
    assert 1 <= while_paused < 100 and total == 500


def test_a_publish_connection_in_step_with_the_log_reads_its_acknowledgements_when_told(mosquitto):
    """With `hold_reads` set (the appender's, on the publish-only connections), a write of publishes leaves their
    PUBACKs in the socket until the callback it hands over runs: they are read in the wake-up of the next batch,
    not in one of their own. Not asked once the window is full (publishes queue): then the acknowledgements are
    what makes room."""
    topic = f"hold/{uid('out')}"
    feed = Collector(mosquitto.address, topic)

    async def run() -> None:
        client, task = await connected(settings(mosquitto, uid("hold-gw-")), Taken())
        await until(lambda: client.in_flight == 0, what="the PUBACK of the retained online status")
        resumes: list[Callable[[], None]] = []
        client.hold_reads = lambda resume: resumes.append(resume) or True
        assert client.publish(topic.encode(), b"one", qos=1)
        await until(lambda: len(resumes) == 1, what="the write of the publish")
        await asyncio.sleep(0.5)  # the broker's PUBACK has long arrived: it waits in the socket
        assert client.in_flight == 1
        resumes.pop()()
        await until(lambda: client.in_flight == 0, what="the held PUBACK, read once resumed")

        for i in range(900):  # one write of 900 publishes into a window of 1000: held, the window is open
            assert client.publish(topic.encode(), b"%d" % i, qos=1)
        await until(lambda: len(resumes) == 1, what="the write of the 900")
        assert client.in_flight == 900
        resumes.pop()()
        await until(lambda: client.in_flight == 0, what="the 900 PUBACKs, read once resumed")

        for i in range(1200):  # 1,000 fill the window and 200 queue
            assert client.publish(topic.encode(), b"%d" % i, qos=1)
        await asyncio.sleep(0)  # the write
        assert client.queued == 200 and resumes == [], "a full window is not held: its PUBACKs make room"

        def resumed_all() -> bool:  # the writes of the queued ones, as PUBACKs make room, may be held again
            while resumes:
                resumes.pop()()
            return client.in_flight == 0 and client.queued == 0

        await until(resumed_all, what="every PUBACK")
        await closed(client, task)

    asyncio.run(run())
    assert feed.wait_count(2101)
    feed.close()
