"""MQTT source: the PUBLISH packets of one socket read become one group of records for the log.

    MqttClient (one read) ─▶ take(messages) ─▶ topic → decode + validate ─▶ Ingested / DeadLetter
                                           │                                 └─▶ appender.submit(group, done)
                                           └─▶ follow requests ─▶ follow(requests) (the graph's own file)
    done / follows written ─▶ PUBACKs of the read, in the order the messages arrived

Nothing here waits per message, makes a task per message, or writes anything: a read's records go to the log in one
call, and their acknowledgements leave in one write once the log committed them. Handled means one of: the event is
in the log, the follow is in the graph file, or the bad input is a dead letter. Nothing raises out of `take`: a
parser bug costs one dead letter (`unparseable`), not the read.

PUBACKs go out in the order the PUBLISH packets arrived (MQTT 5.0, 4.6), although a follow request is made durable
by another writer than the events around it: every read is a group in a FIFO, and only the ready front of it is
acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Awaitable, Callable, Protocol, Sequence

import orjson

from devices.profiles import ProfileIndex
from devices.telemetry import TelemetryError, decode
from gateway.config import LimitsConfig, SocialConfig
from gateway.event import (FOLLOW, ID, KIND_INTERACTION, KIND_POST, KIND_TELEMETRY, DeadLetter, FollowRequest,
                           Ingested, compact_json, dead, source_problem)
from gateway.mqtt.packets import Inbound
from gateway.ops.metrics import Metrics
from gateway.ratelimit import TokenBuckets
from gateway.sources.user_events import UserEventError, decode_interaction, decode_post

log = logging.getLogger(__name__)

MAX_CONTROL_BYTES = 1024


class Sink(Protocol):
    """Where records go (the log's appender)."""

    def submit(self, records: Sequence[Ingested | DeadLetter], done: Callable[[], None] | None = None) -> None: ...

    def has_room(self) -> bool: ...

    async def room(self) -> None: ...

    def hold_reads(self, resume: Callable[[], None]) -> bool: ...


class Link(Protocol):
    """What the source needs of the connection it reads (gateway.mqtt.client.MqttClient)."""

    def ack(self, packet_ids: list[int], connection_no: int) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


Follow = Callable[[list[FollowRequest]], Awaitable[None]]


class _Read:
    """The QoS 1 packet ids of one read, acknowledged once everything in the read is handled."""

    __slots__ = ("ids", "connection_no", "waiting")

    def __init__(self, ids: list[int], connection_no: int, waiting: int) -> None:
        self.ids = ids
        self.connection_no = connection_no
        self.waiting = waiting  # writers (the log, the graph) still to confirm


class MqttSource:
    def __init__(self, sink: Sink, follow: Follow, profiles: ProfileIndex, limits: LimitsConfig,
                 metrics: Metrics, social: SocialConfig | None = None) -> None:
        self._sink = sink
        self._follow = follow
        self._profiles = profiles
        self._limits = limits
        self._social = social or SocialConfig()
        self._metrics = metrics
        self._link: Link | None = None
        self._reads: deque[_Read] = deque()
        self._resuming = False  # paused until the log has room
        self._held = False  # paused until the log's next seal
        # One token bucket table per source kind (devices/ID and users/ID), keyed by the id: no key is built per
        # message. None when limits.per_source_rate is 0, so the hot path pays one attribute test.
        self._rate: dict[str, TokenBuckets] | None = None
        self.reconfigure(profiles, limits)

    def reconfigure(self, profiles: ProfileIndex, limits: LimitsConfig) -> None:
        """New profiles and limits (SIGHUP), from the next message on. The rate limit's buckets start full again
        only when the rate or burst changed."""
        before = self._limits
        self._profiles = profiles
        self._limits = limits
        if limits.per_source_rate <= 0:
            self._rate = None
        elif self._rate is None or (before.per_source_rate, before.per_source_burst) != (
                limits.per_source_rate, limits.per_source_burst):
            self._rate = {kind: TokenBuckets(limits.per_source_rate, limits.per_source_burst)
                          for kind in ("devices", "users")}

    def attach(self, link: Link) -> None:
        self._link = link

    # --- the hot path ----------------------------------------------------------------------------------------------

    def take(self, messages: list[Inbound], connection_no: int) -> None:
        """All PUBLISH packets of one socket read."""
        records: list[Ingested | DeadLetter] = []
        follows: list[FollowRequest] = []
        ids: list[int] = []
        rate = self._rate
        for topic, payload, packet_id in messages:
            if packet_id:
                ids.append(packet_id)
            parts = topic.split("/")
            if rate is not None and len(parts) == 3 and parts[0] in rate and not rate[parts[0]].allow(parts[1]):
                records.append(self._rate_limited(topic, payload))
                continue
            if len(parts) == 3 and parts[0] == "users" and parts[2] == "follows":
                request = self._follow_request(topic, parts[1], payload)
                if type(request) is FollowRequest:
                    follows.append(request)
                else:
                    records.append(request)  # type: ignore[arg-type]
                continue
            record = self.parse(topic, parts, payload)
            if record is not None:
                records.append(record)
        self._metrics.inc("received", len(messages))
        read = _Read(ids, connection_no, bool(records) + bool(follows))
        if not read.waiting:
            if ids:  # only messages a dialect ignores: handled, acknowledged in their turn
                self._reads.append(read)
                if self._reads[0] is read:
                    self._ack_ready()
            return
        self._reads.append(read)
        if records:
            self._sink.submit(records, lambda: self._handled(read))
        if follows:
            asyncio.ensure_future(self._write_follows(follows, read))
        if not self._sink.has_room():
            self._pause()
        elif records and not self._held and self._link is not None and self._sink.hold_reads(self._unhold):
            self._held = True
            self._link.pause_reading()

    def _unhold(self) -> None:
        self._held = False
        if not self._resuming and self._link is not None:
            self._link.resume_reading()

    def _handled(self, read: _Read) -> None:
        read.waiting -= 1
        if read.waiting == 0 and self._reads[0] is read:
            self._ack_ready()

    def _ack_ready(self) -> None:
        reads = self._reads
        link = self._link
        ids: list[int] = []
        connection_no = -1
        while reads and reads[0].waiting == 0:
            read = reads.popleft()
            if read.connection_no != connection_no and ids:
                if link is not None:
                    link.ack(ids, connection_no)
                ids = []
            connection_no = read.connection_no
            ids.extend(read.ids)
        if ids and link is not None:
            link.ack(ids, connection_no)

    def _pause(self) -> None:
        """The log holds `max_pending` records: stop reading until it has room (the broker keeps the rest)."""
        if self._link is None or self._resuming:
            return
        self._link.pause_reading()
        self._resuming = True
        asyncio.ensure_future(self._resume_when_room())

    async def _resume_when_room(self) -> None:
        try:
            await self._sink.room()
        finally:
            self._resuming = False
            if not self._held and self._link is not None:
                self._link.resume_reading()

    # --- parsing ---------------------------------------------------------------------------------------------------

    def _rate_limited(self, topic: str, payload: bytes) -> DeadLetter:
        """An event over its source's limit: dead-lettered (stored, counted, and published at most
        limits.deadletter_per_second), and acknowledged like any other handled message."""
        self._metrics.inc("rate_limited")
        return dead(topic, "rate_limited", f"the source sent more than limits.per_source_rate = "
                    f"{self._limits.per_source_rate:g} events/s", payload)

    def parse(self, topic: str, parts: list[str], payload: bytes) -> Ingested | DeadLetter | None:
        """The record of one message; None for a topic a device profile's dialect ignores (not a reading)."""
        try:
            if len(parts) == 3:
                if parts[0] == "devices" and parts[2] == "telemetry":
                    return self._telemetry(topic, parts[1], payload)
                if parts[0] == "users" and parts[2] in ("posts", "interactions"):
                    return self._user_event(topic, parts[1], parts[2], payload)
            if self._profiles.router:
                return self._foreign(topic, parts, payload)
            return dead(topic, "unknown_topic", "no handler for this topic", payload)
        except Exception as exc:  # a codec bug must cost one dead letter, not the read's acknowledgements
            log.exception("parser failed on a message from %s", topic[:120])
            return dead(topic, "unparseable", f"the gateway could not parse this ({type(exc).__name__})", payload)

    def _telemetry(self, topic: str, device_id: str, payload: bytes) -> Ingested | DeadLetter:
        if not ID.fullmatch(device_id):
            return dead(topic, "bad_device_id", f"device id {device_id[:80]!r} is not a valid id", payload)
        try:
            t = decode(payload, max_bytes=self._limits.max_payload_bytes, max_fields=self._limits.max_fields)
            if len(self._profiles):
                profile = self._profiles.get(device_id)
                if profile is not None:
                    profile.check(t)
        except TelemetryError as exc:
            return dead(topic, exc.reason, exc.message, payload)
        now_ms = int(time.time() * 1000)
        body = t.as_payload()
        # A retransmission repeats seq and ts; a rebooted device that restarts seq at 0 sends a new ts.
        dedup = None if t.seq is None else (f"{t.seq}@{t.ts_ms}" if t.ts_ms is not None else str(t.seq))
        return Ingested(f"devices/{device_id}", KIND_TELEMETRY, t.ts_ms if t.ts_ms is not None else now_ms, body,
                        compact_json(body), dedup)

    def _foreign(self, topic: str, parts: list[str], payload: bytes) -> Ingested | DeadLetter | None:
        """A device speaking another dialect on its own topics (devices/mapping.py): the same reading as if it had
        published on devices/{id}/telemetry, with no seq or ts (the arrival time is the reading's time)."""
        match = self._profiles.router.route(topic, parts)
        if match is None:
            return dead(topic, "unknown_topic", "no handler for this topic, and no device profile's topic pattern "
                        "matches it", payload)
        if match is False:
            return None
        try:
            device_id = match.device_id()
            if self._rate is not None and not self._rate["devices"].allow(device_id):
                return self._rate_limited(topic, payload)
            t = match.reading(payload, max_bytes=self._limits.max_payload_bytes, max_fields=self._limits.max_fields)
        except TelemetryError as exc:
            return dead(topic, exc.reason, exc.message, payload)
        body = t.as_payload()
        return Ingested(f"devices/{device_id}", KIND_TELEMETRY, int(time.time() * 1000), body, compact_json(body))

    def _user_event(self, topic: str, user_id: str, what: str, payload: bytes) -> Ingested | DeadLetter:
        if not ID.fullmatch(user_id):
            return dead(topic, "bad_user_id", f"user id {user_id[:80]!r} is not a valid id", payload)
        try:
            if what == "posts":
                post = decode_post(payload, max_bytes=self._social.max_post_bytes)
                body, kind, dedup = post.as_payload(), KIND_POST, post.dedup_key(payload)
            else:
                interaction = decode_interaction(payload)
                # Interactions are set changes (like, unlike, repost), idempotent by themselves; deduplicating
                # them by content would wrongly swallow a second like after an unlike.
                body, kind, dedup = interaction.as_payload(), KIND_INTERACTION, None
        except UserEventError as exc:
            return dead(topic, exc.reason, exc.message, payload)
        return Ingested(f"users/{user_id}", kind, int(time.time() * 1000), body, compact_json(body), dedup)

    def _follow_request(self, topic: str, follower: str, payload: bytes) -> FollowRequest | DeadLetter:
        problem = None
        if not ID.fullmatch(follower):
            problem = f"follower id {follower[:80]!r} is not a valid id"
        elif len(payload) > MAX_CONTROL_BYTES:
            problem = f"follow request is {len(payload)} bytes, the limit is {MAX_CONTROL_BYTES}"
        else:
            try:
                doc = orjson.loads(payload)
            except orjson.JSONDecodeError:
                doc = None
                problem = "follow request is not JSON"
            if problem is None:
                if not isinstance(doc, dict) or len(doc) != 1 or not doc.keys() <= {"follow", "unfollow"}:
                    problem = 'follow request must be {"follow": SOURCE} or {"unfollow": SOURCE}'
                else:
                    (action, source), = doc.items()
                    problem = source_problem(source)
                    if problem is None:
                        return FollowRequest(action, follower, source)
        return dead(topic, "bad_follow", problem, payload)

    async def _write_follows(self, requests: list[FollowRequest], read: _Read) -> None:
        """Made durable by the graph's writer (retried there on storage errors), then acknowledged in order."""
        try:
            await self._follow(requests)
        except Exception:  # a bug: not acknowledged (the broker sends them again after a reconnect), and the
            # reads behind this one must not wait for it
            log.exception("follow requests could not be stored")
            read.ids = []
            self._handled(read)
            return
        follows = sum(1 for r in requests if r.action == FOLLOW)
        self._metrics.inc("follows", follows)
        self._metrics.inc("unfollows", len(requests) - follows)
        self._handled(read)
