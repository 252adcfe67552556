"""Posts, interactions and their counts: exactly once, across restarts.

The state lives in the ingest log's SQLite file, beside `progress`, and is changed in two places:

- `apply(events)` (processing, in log order, one transaction per batch): records posts, applies likes, unlikes
  and reposts as set changes, counts replies, and decides who gets a repost. It stores the last offset it applied,
  so after a crash the events replayed from the committed progress are not applied twice; their deliveries are
  re-planned from what was stored (`reposted_to`), so a replayed repost reaches the same followers again.
- `add_impressions(db, ...)` (the commit, in the same transaction as the progress offset): impressions and
  impression revenue. Atomic with progress, so a delivery is counted exactly when its batch is committed.

Likes and reposts are sets (event, user): sending a like twice, or the broker redelivering it, changes nothing.
Revenue is kept in integer micro-units of the advertiser's currency, so sums are exact.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Callable, Iterable

from gateway.event import Event
from gateway.user_events import KIND_INTERACTION, KIND_POST

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
CREATE TABLE IF NOT EXISTS engagement_progress (id INTEGER PRIMARY KEY CHECK (id = 1), offset INTEGER NOT NULL);
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
    """What the pipeline must deliver for a batch beyond the authors' followers."""

    reply_authors: dict[int, str] = field(default_factory=dict)  # reply offset -> original author
    reposts: dict[int, tuple[PostInfo, list[str]]] = field(default_factory=dict)  # repost offset -> (original, to)
    changed: set[str] = field(default_factory=set)  # event ids whose counts changed
    ignored: int = 0  # interactions on unknown or blocked events


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


class Engagement:
    """Runs on the ingest log's thread, with the log's connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        db.executescript(SCHEMA)

    def applied_offset(self) -> int:
        row = self._db.execute("SELECT offset FROM engagement_progress WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    def post(self, event_id: str) -> PostInfo | None:
        row = self._db.execute("SELECT event_id, author, sponsor, blocked, envelope FROM posts WHERE event_id = ?",
                               (event_id,)).fetchone()
        return None if row is None else PostInfo(row[0], row[1], row[2], bool(row[3]), bytes(row[4]))

    def apply(self, events: Iterable[Event], envelopes: dict[int, bytes], blocked: set[int],
              followers_of: FollowersOf) -> Plan:
        """Apply a batch's posts and interactions (once) and plan its extra deliveries (every time)."""
        db = self._db
        plan = Plan()
        done = self.applied_offset()
        last = done
        db.execute("BEGIN IMMEDIATE")
        try:
            for event in events:
                fresh = event.offset > done
                last = max(last, event.offset)
                author = event.source_id
                if event.kind == KIND_POST:
                    reply_to = event.payload.get("reply_to")
                    if fresh:
                        db.execute(
                            "INSERT OR IGNORE INTO posts (event_id, author, sponsor, reply_to, blocked, envelope)"
                            " VALUES (?, ?, ?, ?, ?, ?)",
                            (event.id, author, event.payload.get("sponsor"), reply_to, int(event.offset in blocked),
                             envelopes[event.offset]))
                    if reply_to is not None and event.offset not in blocked:
                        original = self.post(reply_to)
                        if original is not None and not original.blocked:
                            plan.reply_authors[event.offset] = original.author
                            if fresh:
                                self._bump(reply_to, "replies", 1)
                                plan.changed.add(reply_to)
                elif event.kind == KIND_INTERACTION:
                    self._interaction(event, author, fresh, plan, followers_of)
            if last > done:
                db.execute("INSERT INTO engagement_progress (id, offset) VALUES (1, ?)"
                           " ON CONFLICT (id) DO UPDATE SET offset = excluded.offset", (last,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (disk full)
                db.execute("ROLLBACK")
            raise
        return plan

    def _interaction(self, event: Event, user: str, fresh: bool, plan: Plan, followers_of: FollowersOf) -> None:
        kind = event.payload["type"]
        target = event.payload["event_id"]
        original = self.post(target)
        if original is None or original.blocked:
            plan.ignored += 1
            return
        db = self._db
        if kind == "repost":
            if fresh:
                changed = db.execute("INSERT OR IGNORE INTO reposts (event_id, user) VALUES (?, ?)",
                                     (target, user)).rowcount
                if changed:
                    self._bump(target, "reposts", 1)
                    plan.changed.add(target)
                # Once per follower: not the author's own followers (they had it), not anyone who already got
                # it through another repost, not the author, not the reposter.
                already = followers_of(f"users/{original.author}")
                for follower in sorted(followers_of(f"users/{user}")):
                    if follower in already or follower in (original.author, user):
                        continue
                    db.execute("INSERT OR IGNORE INTO reposted_to (event_id, follower, via) VALUES (?, ?, ?)",
                               (target, follower, event.id))
            to = [r[0] for r in db.execute("SELECT follower FROM reposted_to WHERE event_id = ? AND via = ?",
                                           (target, event.id))]
            plan.reposts[event.offset] = (original, to)
        elif fresh:
            if kind == "like":
                changed = db.execute("INSERT OR IGNORE INTO likes (event_id, user) VALUES (?, ?)",
                                     (target, user)).rowcount
                delta = 1
            else:  # unlike
                changed = db.execute("DELETE FROM likes WHERE event_id = ? AND user = ?", (target, user)).rowcount
                delta = -1
            if changed:
                self._bump(target, "likes", delta)
                plan.changed.add(target)

    def _bump(self, event_id: str, column: str, delta: int) -> None:
        self._db.execute(
            f"INSERT INTO counts (event_id, {column}) VALUES (?, ?)"
            f" ON CONFLICT (event_id) DO UPDATE SET {column} = {column} + excluded.{column}",
            (event_id, delta))

    @staticmethod
    def add_impressions(db: sqlite3.Connection, impressions: dict[str, int], revenue_micros: dict[str, int]) -> None:
        """Called inside the progress commit's transaction."""
        db.executemany(
            "INSERT INTO counts (event_id, impressions, revenue_micros) VALUES (?, ?, ?)"
            " ON CONFLICT (event_id) DO UPDATE SET impressions = impressions + excluded.impressions,"
            " revenue_micros = revenue_micros + excluded.revenue_micros",
            [(e, n, revenue_micros.get(e, 0)) for e, n in impressions.items()])

    def counts(self, event_ids: Iterable[str]) -> list[Counts]:
        ids = list(event_ids)
        out: list[Counts] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            out.extend(Counts(*row) for row in self._db.execute(
                "SELECT c.event_id, c.likes, c.reposts, c.replies, c.impressions, c.revenue_micros, p.author,"
                f" p.sponsor FROM counts c JOIN posts p ON p.event_id = c.event_id WHERE c.event_id IN ({marks})",
                chunk))
        return out


def stats_payload(c: Counts) -> bytes:
    return json.dumps(c.as_dict(), separators=(",", ":")).encode()
