"""The follower graph: who follows which source (`devices/{id}` or `users/{id}`).

Persisted in its own SQLite file and mirrored in memory, because the pipeline looks up followers for every event
and a dict lookup is what that hot path can afford. Each source's followers are a frozenset: the pipeline iterates
a snapshot while follows land, and a change replaces the set instead of mutating it under the reader.

Writes come in batches (`apply`): one transaction, one fsync, and one new set per changed source, however many
edges the batch holds. Live follow requests are grouped this way by `GraphWriter`, and `gateway follow --file`
imports a whole graph in a few transactions; one transaction per edge would make a 100,000-user graph an hour's
work on an SD card.

The CLI writes the file directly, with or without a running daemon; the daemon notices other writers through
`PRAGMA data_version` (which changes only when another connection commits) and reloads.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import operator
import sqlite3
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from gateway.backoff import Backoff
from gateway.event import FOLLOW, ID, SOURCE_KINDS, UNFOLLOW  # noqa: F401  (FOLLOW, UNFOLLOW: for the CLI)

SCHEMA = """
CREATE TABLE IF NOT EXISTS follows (
    follower TEXT NOT NULL,
    source   TEXT NOT NULL,
    since_ms INTEGER NOT NULL,
    PRIMARY KEY (source, follower)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS follows_by_follower ON follows (follower);
"""
# PRAGMA user_version of the file. 0: written before versions were recorded, in the same layout as 1. A change of
# layout raises it, with its conversion in FollowerGraph.__init__, so an upgrade opens the files it finds.
SCHEMA_VERSION = 1

log = logging.getLogger(__name__)


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


@dataclass(frozen=True, slots=True)
class Change:
    """One follow or unfollow, validated on construction."""

    action: str
    follower: str
    source: str

    def __post_init__(self) -> None:
        if self.action not in (FOLLOW, UNFOLLOW):
            raise GraphError(f"action {self.action!r} must be {FOLLOW!r} or {UNFOLLOW!r}")
        check_id(self.follower, "follower")
        check_source(self.source)


class FollowerGraph:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self._db.close()
            raise GraphError(f"{path} was written by a newer gateway (schema {version}, this one knows "
                             f"{SCHEMA_VERSION}); upgrade the gateway or restore a backup")
        self._db.executescript(SCHEMA)
        if version != SCHEMA_VERSION:
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._followers: dict[str, frozenset[str]] = {}
        self._edges = 0
        self._version = -1
        self.reload()

    def close(self) -> None:
        self._db.close()

    def reload(self) -> None:
        # Rows come in primary-key order, grouped by source, so each set is built once, straight from its rows;
        # and a popular follower appears in many sets, so one shared string per id instead of one per row keeps
        # a large graph's mirror to about half the memory.
        names: dict[str, str] = {}
        followers: dict[str, frozenset[str]] = {}
        rows = self._db.execute("SELECT source, follower FROM follows ORDER BY source, follower")
        for source, group in itertools.groupby(rows, key=operator.itemgetter(0)):
            followers[source] = frozenset(names.setdefault(f, f) for _, f in group)
        self._followers = followers
        self._edges = sum(map(len, followers.values()))
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

    def edges(self) -> int:
        return self._edges

    def follow(self, follower: str, source: str) -> bool:
        """Durably add an edge. Returns False when it already existed."""
        return self.apply([Change(FOLLOW, follower, source)])[0]

    def unfollow(self, follower: str, source: str) -> bool:
        """Durably remove an edge. Returns False when there was none."""
        return self.apply([Change(UNFOLLOW, follower, source)])[0]

    def apply(self, changes: list[Change]) -> list[bool]:
        """Apply changes in order in one transaction; for each, whether it changed the graph."""
        now_ms = int(time.time() * 1000)
        done: list[bool] = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for c in changes:
                if c.action == FOLLOW:
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO follows (follower, source, since_ms) VALUES (?, ?, ?)",
                        (c.follower, c.source, now_ms))
                else:
                    cur = self._db.execute("DELETE FROM follows WHERE follower = ? AND source = ?",
                                           (c.follower, c.source))
                done.append(cur.rowcount > 0)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._mirror([c for c, changed in zip(changes, done) if changed])
        self._version = self._data_version()
        return done

    def _mirror(self, changes: list[Change]) -> None:
        by_source: dict[str, list[Change]] = {}
        for c in changes:
            by_source.setdefault(c.source, []).append(c)
        for source, group in by_source.items():
            members = set(self.followers(source))
            for c in group:
                if c.action == FOLLOW:
                    members.add(c.follower)
                    self._edges += 1
                else:
                    members.discard(c.follower)
                    self._edges -= 1
            if members:
                self._followers[source] = frozenset(members)
            else:
                self._followers.pop(source, None)

    def import_changes(self, changes: Iterable[Change], chunk: int = 20_000) -> tuple[int, int]:
        """Apply a long stream of changes, `chunk` per transaction. Returns (changed, unchanged)."""
        changed = unchanged = 0
        for batch in _chunks(changes, chunk):
            done = self.apply(batch)
            changed += sum(done)
            unchanged += len(done) - sum(done)
        return changed, unchanged


def _chunks(items: Iterable[Change], size: int) -> Iterator[list[Change]]:
    batch: list[Change] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class GraphWriter:
    """Group commit for live follow requests: whatever arrives while one batch is being written goes into the
    next, so a burst of N requests costs a few transactions instead of N fsyncs. `submit` returns once its changes
    are durable (the MQTT PUBACKs wait for it). A storage failure (disk full) keeps the batch and retries, so the
    requests stay unacknowledged instead of failing."""

    def __init__(self, graph: FollowerGraph, storage: Executor, batch_max: int = 5000) -> None:
        self._graph = graph
        self._storage = storage
        self._batch_max = batch_max
        self._queue: list[tuple[list[Change], asyncio.Future[list[bool]]]] = []
        self._writing = False
        self._task: asyncio.Future[None] | None = None

    async def submit(self, changes: list[Change]) -> list[bool]:
        """Apply `changes` in order; for each, whether it changed the graph."""
        future: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        self._queue.append((changes, future))
        if not self._writing:
            self._writing = True
            self._task = asyncio.ensure_future(self._write())
        return await future

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        retry = Backoff(0.05, 5.0)
        try:
            while self._queue:
                groups, size = [], 0
                for group in self._queue:
                    if groups and size + len(group[0]) > self._batch_max:
                        break
                    groups.append(group)
                    size += len(group[0])
                try:
                    done = await loop.run_in_executor(self._storage, self._graph.apply,
                                                      [c for changes, _ in groups for c in changes])
                except (sqlite3.OperationalError, OSError) as exc:  # disk full, locked: keep the batch, retry
                    delay = retry.next_delay()
                    log.error("follower graph write failed (%s); retrying in %.2fs", exc, delay)
                    await asyncio.sleep(delay)
                    continue
                retry.reset()
                del self._queue[:len(groups)]
                at = 0
                for changes, future in groups:
                    if not future.done():
                        future.set_result(done[at:at + len(changes)])
                    at += len(changes)
        finally:
            self._writing = False
