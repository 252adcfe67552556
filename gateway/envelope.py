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
every kind of event and every follower, so it is encoded once per event, not once per delivery:

    {"id": EVENT_ID, "offset": N, "source": "devices/dev-0001", "kind": "telemetry", "ts": MS,
     "payload": {...as the device sent it...}, "verdicts": [{"model", "version", "score", "label", "flagged"}]}
"""

from __future__ import annotations

from gateway.event import Event, Verdict, compact_json

DEADLETTER_TOPIC = "gateway/deadletter"

# The payload and the verdict are spliced in as the log stores them (compact JSON). The other members need no
# escaping: the id is hex (new_event_id), the source a kind and an id checked against event.ID at ingest, the kind
# one of the gateway's constants; the test of this function checks the text parses to the same document.
_ENVELOPE = b'{"id":"%s","offset":%d,"source":"%s","kind":"%s","ts":%d,"payload":%s,"verdicts":[%s]}'


def envelope(event: Event) -> bytes:
    return _ENVELOPE % (event.id.encode(), event.offset, event.source.encode(), event.kind.encode(), event.ts_ms,
                        event.body, event.verdict_json)


def feed_topic(follower: str, event: Event) -> bytes:
    return f"feeds/{follower}/{event.source}/{event.kind}".encode()


def alert_topic(event: Event) -> bytes:
    return f"alerts/{event.source_id}".encode()


def quarantine_topic(user_id: str) -> bytes:
    return f"quarantine/{user_id}".encode()


def notice_topic(user_id: str) -> bytes:
    return f"feeds/{user_id}/notices".encode()


def stats_topic(event_id: str) -> bytes:
    return f"events/{event_id}/stats".encode()


def notice(event: Event, verdict: Verdict) -> bytes:
    """Tells an author that their post was not delivered, and why."""
    return compact_json({"kind": "notice", "notice": "post_blocked", "event_id": event.id, "ts": event.ts_ms,
                         "verdicts": [verdict.as_dict()]})
