"""What a follower receives, and where: pure functions, no I/O.

Topics (one level per id, ids validated at ingest, so no id can add or wildcard a level):

    feeds/{follower_id}/{source_kind}/{source_id}/{event_kind}   e.g. feeds/alice/devices/dev-0001/telemetry
    alerts/{device_id}                                           anomalous telemetry, for operators
    gateway/deadletter                                           rejected input, with the reason

A follower subscribes to `feeds/{own id}/#` and filters further by source if it wants. The envelope is the same for
every kind of event and every follower, so it is encoded once per event, not once per delivery.
"""

from __future__ import annotations

import json
from typing import Sequence

from gateway.event import Event, Verdict

ALERTS = "alerts/{}"
DEADLETTER_TOPIC = "gateway/deadletter"


def feed_topic(follower: str, event: Event) -> str:
    return f"feeds/{follower}/{event.source}/{event.kind}"


def alert_topic(event: Event) -> str:
    return ALERTS.format(event.source_id)


def envelope(event: Event, verdicts: Sequence[Verdict]) -> bytes:
    return json.dumps(
        {
            "id": event.id,
            "offset": event.offset,
            "source": event.source,
            "kind": event.kind,
            "ts": event.ts_ms,
            "payload": event.payload,
            "verdicts": [v.as_dict() for v in verdicts],
        },
        separators=(",", ":"),
        allow_nan=False,
    ).encode()
