import pytest

from gateway.graph import FollowerGraph, GraphError


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
