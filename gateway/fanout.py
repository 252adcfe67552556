"""What a follower receives, and where: pure functions, no I/O.

Topics (one level per id, ids validated at ingest, so no id can add or wildcard a level):

    feeds/{follower_id}/{source_kind}/{source_id}/{event_kind}   e.g. feeds/alice/devices/dev-0001/telemetry,
                                                                 feeds/alice/users/bob/post
    feeds/{user_id}/notices                                      the gateway telling a user about their own posts
    alerts/{device_id}                                           anomalous telemetry, for operators
    quarantine/{user_id}                                         posts blocked by the content policy, for moderators
    events/{event_id}/stats                                      live counts of a post (retained)
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


def quarantine_topic(user_id: str) -> str:
    return f"quarantine/{user_id}"


def notice_topic(user_id: str) -> str:
    return f"feeds/{user_id}/notices"


def stats_topic(event_id: str) -> str:
    return f"events/{event_id}/stats"


def notice(event: Event, verdict: Verdict) -> bytes:
    """Tells an author that their post was not delivered, and why."""
    return json.dumps({"kind": "notice", "notice": "post_blocked", "event_id": event.id, "ts": event.ts_ms,
                       "verdicts": [verdict.as_dict()]}, separators=(",", ":")).encode()


def envelope(event: Event, verdicts: Sequence[Verdict]) -> bytes:
    if event.payload_json:
        verdicts_json = ",".join([v.to_json() for v in verdicts])
        # The hot path: the payload as the log stored it, spliced in. The other members need no escaping: the id
        # is hex (new_event_id), the source is a kind and an id checked against graph.ID at ingest, the kind is
        # one of the gateway's constants. The test of this function checks the text parses to the same document.
        return (f'{{"id":"{event.id}","offset":{event.offset},"source":"{event.source}","kind":"{event.kind}",'
                f'"ts":{event.ts_ms},"payload":{event.payload_json},"verdicts":[{verdicts_json}]}}').encode()
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
