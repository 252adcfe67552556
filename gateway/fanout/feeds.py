"""The feeds consumer: every event to every follower's own MQTT feed, and what it means for the counts.

    batch ──▶ per event: envelope (once) ──▶ followers (graph, in memory) ──▶ PUBLISH QoS 1, one per follower
                  telemetry that starts or ends an anomaly episode ──▶ alerts/{device}
                  post blocked by the content policy ──▶ quarantine/{author} + a notice to feeds/{author}/notices
                  reply ──▶ also its original's author; repost ──▶ the original, to the reposter's followers
          └──▶ the batch is done when the broker acknowledged all of its publishes; its impressions (deliveries of
               posts) and their revenue are committed with the feeds offset that covers it (exactly once)

The delivery latency is measured once per batch that published anything: from the append of its oldest event (the
time in the event's id, stamped when its commit was sealed, within a commit window of its arrival) to the broker's
acknowledgement of the batch's last publish.

The publishes of a batch are written as they are made and leave in one socket write per loop pass; the broker's
window (its Receive Maximum) is the only thing that makes a batch wait.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, Awaitable, Callable, Protocol, Sequence

from gateway.envelope import alert_topic, envelope, notice, notice_topic, quarantine_topic
from gateway.event import KIND_INTERACTION, KIND_POST, KIND_TELEMETRY, Event, InTransaction, event_ms
from gateway.fanout import engagement
from gateway.fanout.engagement import Plan
from gateway.mqtt.acks import AckedBatch
from gateway.ops.metrics import Metrics

EMPTY_PLAN = Plan()


class Publisher(Protocol):
    """What the sink needs of the MQTT connection (gateway.mqtt.client.MqttClient)."""

    def publish(self, topic: bytes, payload: bytes, qos: int = 1, retain: bool = False,
                tracker: Any = None) -> bool: ...

    async def room(self) -> None: ...




class FeedsSink:
    name = "feeds"

    def __init__(self, publisher: Publisher, followers_of: Callable[[str], frozenset[str]],
                 planner: Callable[[Sequence[Event]], Awaitable[Plan]], metrics: Metrics, *, qos: int = 1,
                 micros_per_impression: Callable[[str], int] = lambda sponsor: 0) -> None:
        self._publisher = publisher
        self._followers_of = followers_of
        self._planner = planner
        self._metrics = metrics
        self._qos = qos
        self._micros = micros_per_impression

    async def deliver(self, events: Sequence[Event]) -> asyncio.Future[Any]:
        batch = AckedBatch(asyncio.get_running_loop())
        publish = self._publisher.publish
        qos = self._qos
        followers_of = self._followers_of
        plan = EMPTY_PLAN
        if any(e.kind != KIND_TELEMETRY for e in events):
            plan = await self._planner([e for e in events if e.kind == KIND_POST or e.kind == KIND_INTERACTION])
            if plan.ignored:
                self._metrics.inc("interactions_ignored", plan.ignored)
        deliveries = alerts = blocked = shown = 0
        impressions: dict[str, int] = {}
        revenue: dict[str, int] = {}
        for event in events:
            kind = event.kind
            if kind == KIND_TELEMETRY:
                followers = followers_of(event.source)
                verdict = event.verdict
                # An alert when a device's anomaly episode starts or ends, not one per anomalous reading.
                alert = verdict is not None and verdict.detail is not None and "episode" in verdict.detail
                if not followers and not alert:
                    continue
                body = envelope(event)
                tail = f"/{event.source}/telemetry".encode()
                for follower in followers:
                    batch.pending += 1
                    if not publish(b"feeds/" + follower.encode() + tail, body, qos, False, batch):
                        batch.pending -= 1
                        await self._publish_later(b"feeds/" + follower.encode() + tail, body, qos, batch)
                deliveries += len(followers)
                if alert:
                    await self._send(alert_topic(event), body, 1, batch)
                    alerts += 1
                continue
            if kind == KIND_POST:
                author = event.source_id
                body = envelope(event)
                if engagement.blocked(event):
                    assert event.verdict is not None
                    await self._send(quarantine_topic(author), body, 1, batch)
                    await self._send(notice_topic(author), notice(event, event.verdict), 1, batch)
                    blocked += 1
                    continue
                if event.verdict is not None and event.verdict.flagged:
                    self._metrics.inc("marked")
                to = set(followers_of(event.source))
                reply_author = plan.reply_authors.get(event.offset)
                if reply_author is not None:
                    to.add(reply_author)
                to.discard(author)
                tail = f"/{event.source}/{KIND_POST}".encode()
                counted, sponsor = event.id, event.payload.get("sponsor")
            elif kind == KIND_INTERACTION and event.offset in plan.reposts:
                original, recipients = plan.reposts[event.offset]  # the original goes to the reposter's followers
                to, body = set(recipients), original.envelope
                tail = f"/users/{original.author}/{KIND_POST}".encode()
                counted, sponsor = original.event_id, original.sponsor
            else:
                continue  # likes and unlikes are counted, not delivered
            for follower in to:
                await self._send(b"feeds/" + follower.encode() + tail, body, qos, batch)
            if to:
                impressions[counted] = impressions.get(counted, 0) + len(to)
                if sponsor is not None:
                    revenue[counted] = revenue.get(counted, 0) + len(to) * self._micros(sponsor)
                deliveries += len(to)
                shown += len(to)
        if deliveries:
            self._metrics.inc("delivered", deliveries)
        if alerts:
            self._metrics.inc("alerts", alerts)
        if blocked:
            self._metrics.inc("quarantined", blocked)
        if shown:
            self._metrics.inc("impressions", shown)
        if deliveries or alerts or blocked:
            appended_ms = event_ms(events[0].id)
            metrics = self._metrics
            batch.future.add_done_callback(
                lambda f: f.cancelled() or metrics.observe_latency(max(0.0, time.time() * 1000 - appended_ms)))
        batch.seal((impressions, revenue) if impressions else None)
        return batch.future

    async def _send(self, topic: bytes, body: bytes, qos: int, batch: AckedBatch) -> None:
        batch.pending += 1
        if not self._publisher.publish(topic, body, qos, False, batch):
            batch.pending -= 1
            await self._publish_later(topic, body, qos, batch)

    async def _publish_later(self, topic: bytes, body: bytes, qos: int, batch: AckedBatch) -> None:
        """The broker's window is full: wait for its acknowledgements to make room."""
        while True:
            await self._publisher.room()
            batch.pending += 1
            if self._publisher.publish(topic, body, qos, False, batch):
                return
            batch.pending -= 1

    def state(self, results: list[Any]) -> InTransaction | None:
        impressions: dict[str, int] = {}
        revenue: dict[str, int] = {}
        for counted, money in results:
            for key, n in counted.items():
                impressions[key] = impressions.get(key, 0) + n
            for key, n in money.items():
                revenue[key] = revenue.get(key, 0) + n
        if not impressions:
            return None
        return functools.partial(engagement.add_impressions, impressions=impressions, revenue_micros=revenue)
