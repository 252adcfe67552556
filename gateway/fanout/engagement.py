"""Posts, interactions and their counts: exactly once, across restarts.

The state lives in the log's own file and moves at two moments, each inside a transaction that also moves what it
depends on, so nothing is ever applied twice or lost:

- `apply(db, events)` runs inside the append that logs the events (gateway/log/appender.py `hook`): records posts,
  applies likes, unlikes and reposts as set changes, counts replies, and decides who receives a repost
  (`reposted_to`). The events and their effects commit together; a replay reads the log and never applies again.
- `add_impressions(db, ...)` runs inside the progress commit of the feeds consumer: a delivery is an impression
  (and impression revenue) exactly when the offset that covers it is committed.

`plan(db, events)` is read-only: what the feeds consumer must deliver beyond an author's followers (a reply to the
original's author; a repost to the reposter's followers), from the stored state, the same on every replay.

Likes and reposts are sets (event, user): sending a like twice, or the broker redelivering it, changes nothing.
Revenue is kept in integer micro-units of the advertiser's currency, so sums are exact.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from gateway.envelope import envelope
from gateway.event import BLOCKED, KIND_INTERACTION, KIND_POST, Event, compact_json

FollowersOf = Callable[[str], frozenset[str]]  # the graph's in-memory index: source -> followers

SCHEMA = """
CREATE TABLE IF NOT EXISTS posts (
    event_id TEXT PRIMARY KEY,
    author   TEXT NOT NULL,
    sponsor  TEXT,
    reply_to TEXT,
    blocked  INTEGER NOT NULL,
    envelope BLOB NOT NULL       -- what followers received, re-sent as is to a reposter's followers
);
CREATE TABLE IF NOT EXISTS likes   (event_id TEXT, user TEXT, PRIMARY KEY (event_id, user)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reposts (event_id TEXT, user TEXT, PRIMARY KEY (event_id, user)) WITHOUT ROWID;
-- Who received an original through a repost, and through whose: "once per follower" across reposters.
CREATE TABLE IF NOT EXISTS reposted_to (
    event_id TEXT, follower TEXT, via TEXT, PRIMARY KEY (event_id, follower)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counts (
    event_id TEXT PRIMARY KEY,
    likes INTEGER NOT NULL DEFAULT 0,
    reposts INTEGER NOT NULL DEFAULT 0,
    replies INTEGER NOT NULL DEFAULT 0,
    impressions INTEGER NOT NULL DEFAULT 0,
    revenue_micros INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class PostInfo:
    event_id: str
    author: str
    sponsor: str | None
    blocked: bool
    envelope: bytes


@dataclass
class Plan:
    """What the feeds consumer must deliver for a batch beyond the authors' followers."""

    reply_authors: dict[int, str] = field(default_factory=dict)  # reply offset -> original author
    reposts: dict[int, tuple[PostInfo, list[str]]] = field(default_factory=dict)  # repost offset -> (original, to)
    ignored: int = 0  # interactions on unknown or blocked posts


@dataclass(frozen=True, slots=True)
class Counts:
    event_id: str
    likes: int
    reposts: int
    replies: int
    impressions: int
    revenue_micros: int
    author: str
    sponsor: str | None

    def as_dict(self) -> dict[str, object]:
        return {"event_id": self.event_id, "likes": self.likes, "reposts": self.reposts, "replies": self.replies,
                "impressions": self.impressions, "revenue": self.revenue_micros / 1e6}


def is_social(event: Event) -> bool:
    return event.kind == KIND_POST or event.kind == KIND_INTERACTION


def create(db: sqlite3.Connection) -> None:
    db.executescript(SCHEMA)


def post(db: sqlite3.Connection, event_id: str) -> PostInfo | None:
    row = db.execute("SELECT event_id, author, sponsor, blocked, envelope FROM posts WHERE event_id = ?",
                     (event_id,)).fetchone()
    return None if row is None else PostInfo(row[0], row[1], row[2], bool(row[3]), bytes(row[4]))


def blocked(event: Event) -> bool:
    return event.verdict is not None and event.verdict.label == BLOCKED


class Engagement:
    """`hook(events)` is the appender's: the in-transaction function for a batch's posts and interactions."""

    def __init__(self, followers_of: FollowersOf) -> None:
        self._followers_of = followers_of

    def hook(self, events: Sequence[Event]) -> Callable[[sqlite3.Connection], None] | None:
        social = [e for e in events if e.kind == KIND_POST or e.kind == KIND_INTERACTION]
        if not social:
            return None
        return lambda db: self.apply(db, social)

    def apply(self, db: sqlite3.Connection, events: Iterable[Event]) -> None:
        """Inside the append's transaction: the events are new (never applied before), in log order."""
        for event in events:
            author = event.source_id
            if event.kind == KIND_POST:
                reply_to = event.payload.get("reply_to")
                is_blocked = blocked(event)
                db.execute("INSERT OR IGNORE INTO posts (event_id, author, sponsor, reply_to, blocked, envelope)"
                           " VALUES (?, ?, ?, ?, ?, ?)",
                           (event.id, author, event.payload.get("sponsor"), reply_to, int(is_blocked),
                            envelope(event)))
                if reply_to is not None and not is_blocked:
                    original = post(db, reply_to)
                    if original is not None and not original.blocked:
                        _bump(db, reply_to, "replies", 1)
            elif event.kind == KIND_INTERACTION:
                self._interaction(db, event, author)

    def _interaction(self, db: sqlite3.Connection, event: Event, user: str) -> None:
        kind = event.payload["type"]
        target = event.payload["event_id"]
        original = post(db, target)
        if original is None or original.blocked:
            return
        if kind == "repost":
            if db.execute("INSERT OR IGNORE INTO reposts (event_id, user) VALUES (?, ?)", (target, user)).rowcount:
                _bump(db, target, "reposts", 1)
            # Once per follower: not the author's own followers (they had it), not anyone who already got it
            # through another repost, not the author, not the reposter.
            already = self._followers_of(f"users/{original.author}")
            db.executemany("INSERT OR IGNORE INTO reposted_to (event_id, follower, via) VALUES (?, ?, ?)",
                           [(target, f, event.id) for f in sorted(self._followers_of(f"users/{user}"))
                            if f not in already and f not in (original.author, user)])
        elif kind == "like":
            if db.execute("INSERT OR IGNORE INTO likes (event_id, user) VALUES (?, ?)", (target, user)).rowcount:
                _bump(db, target, "likes", 1)
        elif db.execute("DELETE FROM likes WHERE event_id = ? AND user = ?", (target, user)).rowcount:  # unlike
            _bump(db, target, "likes", -1)


def plan(db: sqlite3.Connection, events: Sequence[Event]) -> Plan:
    """Read-only: the extra deliveries of a batch, from what `apply` stored when the events were logged."""
    out = Plan()
    for event in events:
        if event.kind == KIND_POST:
            reply_to = event.payload.get("reply_to")
            if reply_to is not None and not blocked(event):
                original = post(db, reply_to)
                if original is not None and not original.blocked:
                    out.reply_authors[event.offset] = original.author
        elif event.kind == KIND_INTERACTION:
            original = post(db, event.payload["event_id"])
            if original is None or original.blocked:
                out.ignored += 1
            elif event.payload["type"] == "repost":
                to = [r[0] for r in db.execute("SELECT follower FROM reposted_to WHERE event_id = ? AND via = ?",
                                               (original.event_id, event.id))]
                out.reposts[event.offset] = (original, to)
    return out


def _bump(db: sqlite3.Connection, event_id: str, column: str, delta: int) -> None:
    db.execute(f"INSERT INTO counts (event_id, {column}) VALUES (?, ?)"
               f" ON CONFLICT (event_id) DO UPDATE SET {column} = {column} + excluded.{column}", (event_id, delta))


def add_impressions(db: sqlite3.Connection, impressions: dict[str, int], revenue_micros: dict[str, int]) -> None:
    """Inside the feeds consumer's progress commit."""
    db.executemany(
        "INSERT INTO counts (event_id, impressions, revenue_micros) VALUES (?, ?, ?)"
        " ON CONFLICT (event_id) DO UPDATE SET impressions = impressions + excluded.impressions,"
        " revenue_micros = revenue_micros + excluded.revenue_micros",
        [(e, n, revenue_micros.get(e, 0)) for e, n in impressions.items()])


def counts(db: sqlite3.Connection, event_ids: Iterable[str]) -> list[Counts]:
    ids = list(event_ids)
    out: list[Counts] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marks = ",".join("?" * len(chunk))
        out.extend(Counts(*row) for row in db.execute(
            "SELECT c.event_id, c.likes, c.reposts, c.replies, c.impressions, c.revenue_micros, p.author,"
            f" p.sponsor FROM counts c JOIN posts p ON p.event_id = c.event_id WHERE c.event_id IN ({marks})",
            chunk))
    return out


def stats_payload(c: Counts) -> bytes:
    return compact_json(c.as_dict())


def touched(events: Iterable[Event]) -> set[str]:
    """Posts whose counts a batch may have changed: its posts, what it replied to, what it interacted with."""
    out: set[str] = set()
    for event in events:
        if event.kind == KIND_POST:
            out.add(event.id)
            reply_to = event.payload.get("reply_to")
            if reply_to is not None:
                out.add(reply_to)
        elif event.kind == KIND_INTERACTION:
            out.add(event.payload["event_id"])
    return out
