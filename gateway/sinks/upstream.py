"""The upstream link: the site's events to a central MQTT broker, stored and forwarded.

    log ──Consumer "upstream" (own offset)──▶ UpstreamSink ──pace (events/s, bytes/s)──▶ MqttClient (upstream)
                                                 │ telemetry ─▶ sites/{site}/devices/ID/telemetry   PUBLISH QoS 1,
                                                 │ episode start/end ─▶ .../devices/ID/alert         user property
                                                 ▼                                                   event-id
                                  the batch is done when the central broker acknowledged all of its publishes
    log ──Consumer "upstream_stats" (behind the feeds) ──▶ StatsSink ──▶ sites/{site}/events/ID/stats (retained)

There is no queue file of its own: the log is the queue. While the WAN is down the consumer stops where the
central broker stopped acknowledging; its committed offset holds those events in the log (the trim keeps the log
back to the slowest consumer), within `storage.max_log_bytes`, and it reads them back when the link returns. So
memory holds at most the link's window (`upstream.max_inflight`) plus one batch, whatever the outage's length.

Nothing is published while the link is down (the sink waits for the connection), so the rate cap paces the catch-up
after an outage too; what was in flight when the link dropped is sent again at once on the new connection (MQTT
requires it first, in order). One connection carries everything, so each source's events arrive in log order;
after a reconnect or a crash the far side may see an event twice, with the same event id (the MQTT 5 user property
`event-id`, and `id` in the envelope, which is the payload).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, Sequence

from gateway.envelope import envelope
from gateway.event import KIND_TELEMETRY, Event
from gateway.mqtt import packets as pk
from gateway.mqtt.acks import AckedBatch
from gateway.ops.metrics import Metrics
from gateway.ratelimit import TokenBucket

EVENT_ID_PROPERTY = "event-id"


class Link(Protocol):
    """What the sink needs of the upstream connection (gateway.mqtt.client.MqttClient)."""

    connected: asyncio.Event

    def publish(self, topic: bytes, payload: bytes, qos: int = 1, retain: bool = False, tracker: Any = None,
                properties: bytes = b"") -> bool: ...

    async def room(self) -> None: ...


class Topics:
    """`upstream.topic_template` filled in per (source, kind); the topics are remembered (one per device)."""

    def __init__(self, template: str, site: str, max_cached: int = 100_000) -> None:
        self._template = template
        self._site = site
        self._cache: dict[tuple[str, str], bytes] = {}
        self._max = max_cached

    def __call__(self, source: str, kind: str) -> bytes:
        key = (source, kind)
        topic = self._cache.get(key)
        if topic is None:
            source_kind, _, source_id = source.partition("/")
            topic = self._template.format(site=self._site, source=source, source_kind=source_kind,
                                          source_id=source_id, kind=kind).encode()
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[key] = topic
        return topic

    def stats(self, event_id: str) -> bytes:
        return self(f"events/{event_id}", "stats")


class Pacer:
    """The rate cap: events per second and payload bytes per second, each a token bucket that paces (one
    second's worth of burst); either may be off (0)."""

    def __init__(self, events_per_second: float, bytes_per_second: float) -> None:
        self._events = TokenBucket(events_per_second) if events_per_second > 0 else None
        self._bytes = TokenBucket(bytes_per_second) if bytes_per_second > 0 else None

    def delay(self, nbytes: int) -> float:
        wait = 0.0
        if self._events is not None:
            wait = self._events.delay(1)
        if self._bytes is not None:
            wait = max(wait, self._bytes.delay(nbytes))
        return wait




class UpstreamSink:
    name = "upstream"

    def __init__(self, link: Link, topics: Topics, kinds: Sequence[str], metrics: Metrics,
                 pacer: Pacer | None = None) -> None:
        self._link = link
        self._topics = topics
        self._telemetry = "telemetry" in kinds
        self._alerts = "alerts" in kinds
        self._metrics = metrics
        self._pacer = pacer
        self.paced_seconds = 0.0  # time spent waiting for the rate cap, since the start

    async def deliver(self, events: Sequence[Event]) -> asyncio.Future[Any] | None:
        batch: AckedBatch | None = None
        sent = 0
        for event in events:
            if event.kind != KIND_TELEMETRY:
                continue
            verdict = event.verdict
            alert = self._alerts and verdict is not None and verdict.detail is not None and "episode" in verdict.detail
            if not (self._telemetry or alert):
                continue
            if batch is None:
                batch = AckedBatch(asyncio.get_running_loop())
            body = envelope(event)
            props = pk.user_properties([(EVENT_ID_PROPERTY, event.id)])
            if self._telemetry:
                await self._publish(self._topics(event.source, "telemetry"), body, props, batch)
                sent += 1
            if alert:
                await self._publish(self._topics(event.source, "alert"), body, props, batch)
                sent += 1
        if batch is None:
            return None
        metrics = self._metrics
        batch.future.add_done_callback(
            lambda f: f.cancelled() or f.exception() is not None or metrics.inc("upstream_forwarded", sent))
        batch.seal()
        return batch.future

    async def _publish(self, topic: bytes, body: bytes, props: bytes, batch: AckedBatch) -> None:
        link = self._link
        if not link.connected.is_set():
            await link.connected.wait()  # nothing piles up in memory while the WAN is down: the log holds it
        if self._pacer is not None:
            wait = self._pacer.delay(len(body))
            if wait > 0.002:  # shorter debts are paid with the next message's wait
                self.paced_seconds += wait
                await asyncio.sleep(wait)
        batch.pending += 1
        while not link.publish(topic, body, 1, False, batch, props):
            await link.room()

    def state(self, results: list[Any]) -> None:
        return None
