"""MQTT source: turns received messages into log appends, graph changes or dead letters.

Events (telemetry, posts, interactions) take the hot path, `take`: parsed and joined to the ingestor's open batch
without a task or coroutine per message; their PUBACKs are sent by the link when the batch is committed. Follow
requests take the general path, `handle`, an async handler that returns only when the message is durably handled;
gmqtt (made with `optimistic_acknowledgement=False`) sends the PUBACK only then. Handled means one of: the event is in the ingest log,
the follow/unfollow is in the graph file, or the bad input is in the dead-letter table. Nothing raises out of
here: a failure to store keeps the handler waiting (the ingestor retries), so the message stays unacknowledged.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Executor
from typing import Any

from devices.profiles import ProfileIndex
from devices.telemetry import TelemetryError, decode
from gateway.config import LimitsConfig, SocialConfig
from gateway.event import KIND_TELEMETRY, Ingested, new_event_id
from gateway.graph import FOLLOW, ID, Change, FollowerGraph, GraphError, GraphWriter, check_source
from gateway.ingest import Ingestor
from gateway.ingest_log import DeadLetter
from gateway.metrics import Metrics
from gateway.ratelimit import TokenBuckets
from gateway.user_events import (KIND_INTERACTION, KIND_POST, Interaction, Post, UserEventError, decode_interaction,
                                 decode_post)

log = logging.getLogger(__name__)

MAX_CONTROL_BYTES = 1024


class MqttSource:
    def __init__(self, ingestor: Ingestor, graph: FollowerGraph, storage: Executor, profiles: ProfileIndex,
                 limits: LimitsConfig, metrics: Metrics, social: SocialConfig | None = None) -> None:
        self._ingestor = ingestor
        self._graph_writer = GraphWriter(graph, storage)
        self._profiles = profiles
        self._limits = limits
        self._social = social or SocialConfig()
        self._metrics = metrics
        # One token bucket table per source kind (devices/ID and users/ID), keyed by the id: no key is built per
        # message. None when limits.per_source_rate is 0, so the hot path pays one attribute test.
        self._rate: dict[str, TokenBuckets] | None = None
        if limits.per_source_rate > 0:
            self._rate = {kind: TokenBuckets(limits.per_source_rate, limits.per_source_burst)
                          for kind in ("devices", "users")}

    async def handle(self, topic: str, payload: bytes, properties: dict[str, Any]) -> int:
        """The general path (one coroutine per message): follow requests, and anything `take` left alone."""
        self._metrics.inc("received")
        parts = topic.split("/") if isinstance(topic, str) else []
        if self._rate is not None and len(parts) == 3 and parts[0] in self._rate \
                and not self._rate[parts[0]].allow(parts[1]):
            await self._ingestor.dead_letter(self._rate_limited(topic, payload))
            return 0
        if len(parts) == 3 and parts[0] == "users" and parts[2] == "follows":
            await self._follows(topic, parts[1], payload)
            return 0
        record = self.parse(str(topic), parts, payload)
        if isinstance(record, DeadLetter):
            await self._ingestor.dead_letter(record)
        else:
            await self._ingestor.append(record)
        return 0  # PUBACK reason code: success (the message is handled, even when it was dead-lettered)

    def take(self, topic: str, payload: bytes, token: object) -> bool:
        """The hot path for events (no task, no coroutine per message): parse, join the open batch, and leave the
        acknowledgement to the ingestor, which hands `token` back once the batch is committed. False: not an
        event topic, use `handle`."""
        parts = topic.split("/")
        if len(parts) != 3 or parts[2] not in _EVENT_TOPICS or parts[0] != _EVENT_TOPICS[parts[2]]:
            return False
        self._metrics.inc("received")
        if self._rate is not None and not self._rate[parts[0]].allow(parts[1]):
            self._ingestor.submit(self._rate_limited(topic, payload), token)
            return True
        self._ingestor.submit(self.parse(topic, parts, payload), token)
        return True

    def _rate_limited(self, topic: str, payload: bytes) -> DeadLetter:
        """An event over its source's limit: dead-lettered (stored, counted, and published at most
        limits.deadletter_per_second), and acknowledged like any other handled message."""
        self._metrics.inc("rate_limited")
        return _dead(topic, "rate_limited", f"the source sent more than limits.per_source_rate = "
                     f"{self._limits.per_source_rate:g} events/s", payload)

    def parse(self, topic: str, parts: list[str], payload: bytes) -> Ingested | DeadLetter:
        try:
            if len(parts) == 3 and parts[0] == "devices" and parts[2] == "telemetry":
                return self._telemetry(topic, parts[1], payload)
            if len(parts) == 3 and parts[0] == "users" and parts[2] in ("posts", "interactions"):
                return self._user_event(topic, parts[1], parts[2], payload)
            return _dead(topic, "unknown_topic", "no handler for this topic", payload)
        except Exception as exc:  # a codec bug must cost one dead letter, not the message's acknowledgement
            log.exception("parser failed on a message from %s", topic[:120])
            return _dead(topic, "unparseable", f"the gateway could not parse this ({type(exc).__name__})",
                         payload)

    def _telemetry(self, topic: str, device_id: str, payload: bytes) -> Ingested | DeadLetter:
        if not ID.fullmatch(device_id):
            return _dead(topic, "bad_device_id", f"device id {device_id[:80]!r} is not a valid id", payload)
        try:
            t = decode(payload, max_bytes=self._limits.max_payload_bytes, max_fields=self._limits.max_fields)
            profile = self._profiles.get(device_id) if len(self._profiles) else None
            if profile is not None:
                profile.check(t)
        except TelemetryError as exc:
            return _dead(topic, exc.reason, exc.message, payload)
        now_ms = int(time.time() * 1000)
        # A retransmission repeats seq and ts; a rebooted device that restarts seq at 0 sends a new ts.
        dedup = None if t.seq is None else (f"{t.seq}@{t.ts_ms}" if t.ts_ms is not None else str(t.seq))
        return Ingested(
            id=new_event_id(now_ms),
            source=f"devices/{device_id}",
            kind=KIND_TELEMETRY,
            ts_ms=t.ts_ms if t.ts_ms is not None else now_ms,
            payload=t.as_payload(),
            dedup_key=dedup,
        )

    def _user_event(self, topic: str, user_id: str, what: str, payload: bytes) -> Ingested | DeadLetter:
        if not ID.fullmatch(user_id):
            return _dead(topic, "bad_user_id", f"user id {user_id[:80]!r} is not a valid id", payload)
        item: Post | Interaction
        try:
            if what == "posts":
                item = decode_post(payload, max_bytes=self._social.max_post_bytes)
                kind, dedup = KIND_POST, item.dedup_key(payload)
            else:
                item = decode_interaction(payload)
                # Interactions are set changes (like, unlike, repost), idempotent by themselves; deduplicating
                # them by content would wrongly swallow a second like after an unlike.
                kind, dedup = KIND_INTERACTION, None
        except UserEventError as exc:
            return _dead(topic, exc.reason, exc.message, payload)
        now_ms = int(time.time() * 1000)
        return Ingested(new_event_id(now_ms), f"users/{user_id}", kind, now_ms, item.as_payload(), dedup)

    async def _follows(self, topic: str, follower: str, payload: bytes) -> None:
        try:
            if not ID.fullmatch(follower):
                raise GraphError(f"follower id {follower[:80]!r} is not a valid id")
            if len(payload) > MAX_CONTROL_BYTES:
                raise GraphError(f"follow request is {len(payload)} bytes, the limit is {MAX_CONTROL_BYTES}")
            try:
                doc = json.loads(payload)
            except (ValueError, RecursionError):
                raise GraphError("follow request is not JSON") from None
            if not isinstance(doc, dict) or len(doc) != 1 or not doc.keys() <= {"follow", "unfollow"}:
                raise GraphError('follow request must be {"follow": SOURCE} or {"unfollow": SOURCE}')
            (action, source), = doc.items()
            check_source(source)
        except GraphError as exc:
            await self._reject(topic, "bad_follow", str(exc), payload)
            return
        await self._graph_writer.submit(Change(action, follower, source))
        self._metrics.inc("follows" if action == FOLLOW else "unfollows")

    async def _reject(self, origin: str, reason: str, message: str, payload: bytes) -> None:
        await self._ingestor.dead_letter(_dead(origin, reason, message, payload))


_EVENT_TOPICS = {"telemetry": "devices", "posts": "users", "interactions": "users"}


def _dead(origin: str, reason: str, message: str, payload: bytes) -> DeadLetter:
    return DeadLetter(origin, reason, message, bytes(payload), int(time.time() * 1000))
