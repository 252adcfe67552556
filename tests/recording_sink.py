"""The MQTT source's hot path with a real log behind it, for the unit tests of parsers and topic routing.

`RecordingSink` stands in for the log's appender: every group the source hands over is stored in a real LogStore
(events with offsets, dead letters), and kept for the test to look at. `SourceUnderTest.handle` sends one message
through `MqttSource.take` the way the MQTT client does, follow requests included.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable, Sequence

from devices import profiles
from gateway import config
from gateway.event import DeadLetter, Event, FollowRequest, Ingested, new_event_id
from gateway.fanout.graph import Change, FollowerGraph
from gateway.log.store import LogStore
from gateway.ops.metrics import Metrics
from gateway.sources.mqtt import MqttSource


class RecordingSink:
    def __init__(self, store: LogStore | None) -> None:
        self.store = store
        self.dead: list[DeadLetter] = []
        self.appended: list[Ingested] = []
        self._next = 1

    def submit(self, records: Sequence[Ingested | DeadLetter], done: Callable[[], None] | None = None) -> None:
        events, dedups, dead = [], [], []
        for r in records:
            if isinstance(r, DeadLetter):
                dead.append(r)
            else:
                events.append(Event(self._next, new_event_id(), r.source, r.kind, r.ts_ms, r.payload, r.body, None))
                dedups.append(r.dedup)
                self._next += 1
                self.appended.append(r)
        if self.store is not None:
            self.store.append(events, dedups, dead)
        self.dead.extend(dead)
        if done is not None:
            done()

    def has_room(self) -> bool:
        return True

    async def room(self) -> None:
        return None

    def hold_reads(self, resume: Callable[[], None]) -> bool:
        return False  # records are "committed" as they arrive: nothing to wait for


class _Link:
    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, packet_ids: list[int], connection_no: int) -> None:
        self.acked.extend(packet_ids)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class SourceUnderTest:
    """An MqttSource over a real log and a real graph file; `handle` sends it one message."""

    def __init__(self, tmp: Path, profile_list: Sequence[profiles.DeviceProfile] = (),
                 limits: config.LimitsConfig | None = None) -> None:
        self.store = LogStore(tmp / "log.db", fsync="off")
        self.graph = FollowerGraph(tmp / "graph.db")
        self.sink = RecordingSink(self.store)
        self.link = _Link()
        self.metrics = Metrics()
        self.source = MqttSource(self.sink, self._follow, profiles.ProfileIndex(list(profile_list)),
                                 limits or config.LimitsConfig(), self.metrics, config.SocialConfig())
        self.source.attach(self.link)
        self._packet = 0

    async def _follow(self, requests: list[FollowRequest]) -> None:
        self.graph.apply([Change(*r) for r in requests])

    def handle(self, topic: str, payload: bytes) -> None:
        async def one() -> None:
            self._packet += 1
            self.source.take([(topic, payload, self._packet)], 1)
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if pending:
                await asyncio.gather(*pending)

        asyncio.run(one())

    @property
    def dead(self) -> list[DeadLetter]:
        return self.sink.dead

    @property
    def appended(self) -> list[Ingested]:
        return self.sink.appended

    def close(self) -> None:
        self.graph.close()
        self.store.close()


def parse_only(topic: str, payload: bytes) -> Any:
    """The record the source makes of one message, without storing it."""
    src = MqttSource(RecordingSink(None), None, profiles.ProfileIndex([]), config.LimitsConfig(),  # type: ignore[arg-type]
                     Metrics())
    return src.parse(topic, topic.split("/"), payload)
