import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.fanout.graph import FOLLOW, SCHEMA_VERSION, UNFOLLOW, Change, FollowerGraph, GraphError, GraphWriter


def test_follow_and_unfollow_persist(tmp_path):
    g = FollowerGraph(tmp_path / "graph.db")
    assert g.follow("alice", "devices/dev-1")
    assert not g.follow("alice", "devices/dev-1")
    g.follow("bob", "devices/dev-1")
    assert g.followers("devices/dev-1") == {"alice", "bob"}
    assert g.unfollow("alice", "devices/dev-1")
    assert not g.unfollow("alice", "devices/dev-1")
    g.close()
    g = FollowerGraph(tmp_path / "graph.db")
    assert g.followers("devices/dev-1") == {"bob"}
    assert g.following("bob") == ["devices/dev-1"]


def test_a_change_made_by_another_process_is_picked_up(tmp_path):
    daemon = FollowerGraph(tmp_path / "graph.db")
    assert not daemon.refresh_if_changed()
    FollowerGraph(tmp_path / "graph.db").follow("carol", "users/dave")
    assert daemon.followers("users/dave") == frozenset()
    assert daemon.refresh_if_changed()
    assert daemon.followers("users/dave") == {"carol"}


@pytest.mark.parametrize("follower, source", [
    ("al/ice", "devices/d1"), ("+", "devices/d1"), ("#", "devices/d1"), ("", "devices/d1"),
    ("alice", "devices/d1/extra"), ("alice", "devices/+"), ("alice", "things/d1"), ("alice", "devices/"),
    ("a" * 65, "devices/d1"),
])
def test_ids_that_could_escape_their_topic_level_are_refused(tmp_path, follower, source):
    g = FollowerGraph(tmp_path / "graph.db")
    with pytest.raises(GraphError):
        g.follow(follower, source)


def test_a_batch_is_applied_in_order_and_reports_what_changed(tmp_path):
    g = FollowerGraph(tmp_path / "graph.db")
    done = g.apply([Change(FOLLOW, "a", "users/x"), Change(FOLLOW, "b", "users/x"), Change(FOLLOW, "a", "users/x"),
                    Change(UNFOLLOW, "b", "users/x"), Change(UNFOLLOW, "c", "users/x")])
    assert done == [True, True, False, True, False]
    assert g.followers("users/x") == {"a"}
    assert g.edges() == 1
    g.close()
    assert FollowerGraph(tmp_path / "graph.db").followers("users/x") == {"a"}


def test_a_batch_with_a_failing_write_changes_nothing(tmp_path):
    g = FollowerGraph(tmp_path / "graph.db")
    g.follow("a", "users/x")
    g._db.execute("CREATE TRIGGER no_bob BEFORE INSERT ON follows WHEN NEW.follower = 'bob' "
                  "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(sqlite3.IntegrityError):
        g.apply([Change(FOLLOW, "carol", "users/x"), Change(FOLLOW, "bob", "users/x")])
    assert g.followers("users/x") == {"a"}
    g.reload()
    assert g.followers("users/x") == {"a"}, "the batch was not rolled back"


def test_a_change_is_validated_when_it_is_made():
    with pytest.raises(GraphError):
        Change("block", "a", "users/x")
    with pytest.raises(GraphError):
        Change(FOLLOW, "a/b", "users/x")


def test_import_applies_a_long_stream_in_chunks(tmp_path):
    g = FollowerGraph(tmp_path / "graph.db")
    stream = (Change(FOLLOW, f"f{i}", f"users/u{i % 7}") for i in range(1000))
    assert g.import_changes(stream, chunk=64) == (1000, 0)
    assert g.edges() == 1000
    assert len(g.followers("users/u3")) == len([i for i in range(1000) if i % 7 == 3])


def test_live_requests_arriving_together_share_one_transaction(tmp_path):
    g = FollowerGraph(tmp_path / "graph.db")
    calls: list[int] = []
    real_apply = g.apply
    g.apply = lambda changes: calls.append(len(changes)) or real_apply(changes)  # type: ignore[method-assign]

    async def burst() -> list[list[bool]]:
        with ThreadPoolExecutor(1) as storage:
            writer = GraphWriter(g, storage)
            return await asyncio.gather(*(writer.submit([Change(FOLLOW, f"f{i}", "users/star")]) for i in range(199)),
                                        writer.submit([Change(FOLLOW, "f199", "users/star"),
                                                       Change(FOLLOW, "f0", "users/star")]))

    results = asyncio.run(burst())
    assert results == [[True]] * 199 + [[True, False]]
    assert sum(calls) == 201
    assert len(calls) <= 3, f"{len(calls)} transactions for one burst"
    assert len(g.followers("users/star")) == 200


def test_a_storage_failure_keeps_the_requests_waiting_and_retries(tmp_path):
    g = FollowerGraph(tmp_path / "graph.db")
    failures = [sqlite3.OperationalError("database or disk is full")] * 2
    real_apply = g.apply

    def flaky(changes):
        if failures:
            raise failures.pop()
        return real_apply(changes)

    g.apply = flaky  # type: ignore[method-assign]

    async def one() -> list[bool]:
        with ThreadPoolExecutor(1) as storage:
            return await GraphWriter(g, storage).submit([Change(FOLLOW, "a", "users/x")])

    assert asyncio.run(one()) == [True]
    assert not failures
    assert g.followers("users/x") == {"a"}


def test_a_graph_written_before_schema_versions_opens_with_its_follows_and_is_stamped(tmp_path):
    path = tmp_path / "graph.db"
    db = sqlite3.connect(path)  # what the gateway before version 1 wrote: the same tables, user_version 0
    db.executescript("CREATE TABLE follows (follower TEXT NOT NULL, source TEXT NOT NULL, since_ms INTEGER NOT NULL,"
                     " PRIMARY KEY (source, follower)) WITHOUT ROWID;"
                     "CREATE INDEX follows_by_follower ON follows (follower);"
                     "INSERT INTO follows VALUES ('alice', 'devices/d-1', 1);")
    db.close()
    graph = FollowerGraph(path)
    assert graph.following("alice") == ["devices/d-1"]
    graph.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_graph_from_a_newer_gateway_is_refused(tmp_path):
    path = tmp_path / "graph.db"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(GraphError, match="newer gateway"):
        FollowerGraph(path)
