"""The follower graph: who follows which source (`devices/{id}` or `users/{id}`).

Persisted in its own SQLite file and mirrored in memory, because the pipeline looks up followers for every event
and a dict lookup is what that hot path can afford. The CLI (`gateway follow`) writes the file directly, with or
without a running daemon; the daemon notices other writers through `PRAGMA data_version` (which changes only when
another connection commits) and reloads.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS follows (
    follower TEXT NOT NULL,
    source   TEXT NOT NULL,
    since_ms INTEGER NOT NULL,
    PRIMARY KEY (source, follower)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS follows_by_follower ON follows (follower);
"""

# An id is one MQTT topic level: no wildcards, no separators, nothing a subscriber could use to reach another feed.
ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
SOURCE_KINDS = ("devices", "users")


class GraphError(ValueError):
    pass


def check_id(value: str, what: str = "id") -> str:
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise GraphError(f"{what} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def check_source(value: str) -> str:
    """A followable source is `devices/{id}` or `users/{id}`."""
    kind, sep, ident = value.partition("/") if isinstance(value, str) else ("", "", "")
    if not sep or kind not in SOURCE_KINDS:
        raise GraphError(f"source {value!r} must be devices/ID or users/ID")
    check_id(ident, "source id")
    return value


class FollowerGraph:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._followers: dict[str, frozenset[str]] = {}
        self._version = -1
        self.reload()

    def close(self) -> None:
        self._db.close()

    def reload(self) -> None:
        grouped: dict[str, set[str]] = {}
        for source, follower in self._db.execute("SELECT source, follower FROM follows"):
            grouped.setdefault(source, set()).add(follower)
        self._followers = {s: frozenset(f) for s, f in grouped.items()}
        self._version = self._data_version()

    def refresh_if_changed(self) -> bool:
        """Reload when another process (the CLI) changed the file. Cheap: one pragma."""
        if self._data_version() != self._version:
            self.reload()
            return True
        return False

    def _data_version(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def followers(self, source: str) -> frozenset[str]:
        return self._followers.get(source, frozenset())

    def following(self, follower: str) -> list[str]:
        rows = self._db.execute("SELECT source FROM follows WHERE follower = ? ORDER BY source", (follower,))
        return [r[0] for r in rows]

    def follow(self, follower: str, source: str) -> bool:
        """Durably add an edge. Returns False when it already existed."""
        check_id(follower, "follower")
        check_source(source)
        cur = self._db.execute(
            "INSERT OR IGNORE INTO follows (follower, source, since_ms) VALUES (?, ?, ?)",
            (follower, source, int(time.time() * 1000)),
        )
        if cur.rowcount:
            self._followers[source] = self.followers(source) | {follower}
        self._version = self._data_version()
        return bool(cur.rowcount)

    def unfollow(self, follower: str, source: str) -> bool:
        check_id(follower, "follower")
        check_source(source)
        cur = self._db.execute("DELETE FROM follows WHERE follower = ? AND source = ?", (follower, source))
        if cur.rowcount:
            remaining = self.followers(source) - {follower}
            if remaining:
                self._followers[source] = remaining
            else:
                self._followers.pop(source, None)
        self._version = self._data_version()
        return bool(cur.rowcount)

    def edges(self) -> int:
        return sum(len(f) for f in self._followers.values())
