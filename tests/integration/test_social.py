"""Users, posts and engagement end to end: real mosquitto, the real gateway, the real content model, InfluxDB."""

from __future__ import annotations

import json
import uuid

import pytest

from tests import servers
from tests.gateway_process import GatewayProcess
from tests.mqtt_helpers import Collector, publish_all

pytestmark = pytest.mark.integration

CLEAN = "Lovely morning at the lake, the ducks are back and the coffee is good."
OFFENSIVE = "you are a stupid worthless idiot, shut up you pathetic moron"


def uid(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def post(text: str, **extra: str) -> bytes:
    return json.dumps({"text": text, "nonce": uuid.uuid4().hex, **extra}).encode()


def interact(kind: str, event_id: str) -> bytes:
    return json.dumps({"type": kind, "event_id": event_id}).encode()


@pytest.fixture
def social(mosquitto, influxdb, tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text("[social]\nstats_interval_ms = 50\n[social.cpm]\nacme = 2.5\n")
    db = uid("db_")
    gw = GatewayProcess(tmp_path / "gw", mosquitto.address, "--influx-api", "v1", "--influx-url", influxdb.url,
                        "--influx-db", db, client_id=uid("gw-"), config=config)
    gw.db = db  # type: ignore[attr-defined]
    yield gw
    gw.kill()


def first_post_id(feed: Collector) -> str:
    assert feed.wait_count(1)
    return feed.json()[0]["id"]


def test_a_post_reaches_every_follower_and_its_stats_count_likes_once(mosquitto, influxdb, social):
    author, fans = uid("author"), [uid("fan") for _ in range(3)]
    for fan in fans:
        social.run_cli("follow", fan, f"users/{author}")
    social.start()
    feeds = {fan: Collector(mosquitto.address, f"feeds/{fan}/#") for fan in fans}
    publish_all(mosquitto.address, [(f"users/{author}/posts", post(CLEAN, sponsor="acme"))])
    for fan, feed in feeds.items():
        assert feed.wait_count(1)
        topic, payload, _ = feed.messages[0]
        env = json.loads(payload)
        assert topic == f"feeds/{fan}/users/{author}/post"
        assert env["kind"] == "post" and env["source"] == f"users/{author}"
        assert env["payload"] == {"text": CLEAN, "sponsor": "acme"}
        assert env["verdicts"][0]["model"] == "sensitive-content" and env["verdicts"][0]["label"] == "clean"
    event_id = feeds[fans[0]].json()[0]["id"]
    stats = Collector(mosquitto.address, f"events/{event_id}/stats")

    # Likes sent twice and a like taken back: 2 distinct likers remain.
    publish_all(mosquitto.address, [
        (f"users/{fans[0]}/interactions", interact("like", event_id)),
        (f"users/{fans[0]}/interactions", interact("like", event_id)),
        (f"users/{fans[1]}/interactions", interact("like", event_id)),
        (f"users/{fans[2]}/interactions", interact("like", event_id)),
        (f"users/{fans[2]}/interactions", interact("unlike", event_id)),
        (f"users/{fans[2]}/interactions", interact("like", event_id)),
        (f"users/{fans[2]}/interactions", interact("unlike", event_id)),
    ])
    assert stats.wait_for(lambda m: m and json.loads(m[-1][1])["likes"] == 2 and
                          json.loads(m[-1][1])["impressions"] == 3)
    last = json.loads(stats.messages[-1][1])
    assert last["revenue"] == pytest.approx(3 * 2.5 / 1000)  # CPM 2.5 per 1,000 impressions
    late = Collector(mosquitto.address, f"events/{event_id}/stats")
    assert late.wait_for(lambda m: m and m[-1][2])  # retained for subscribers who come later

    # Counts survive a restart, and nothing is counted twice when the log is replayed.
    social.kill()
    social.start()
    publish_all(mosquitto.address, [(f"users/{fans[1]}/interactions", interact("repost", event_id))])
    assert stats.wait_for(lambda m: json.loads(m[-1][1])["reposts"] == 1)
    final = json.loads(stats.messages[-1][1])
    assert final["likes"] == 2 and final["impressions"] == 3

    rows = servers.influx_rows(influxdb, social.db, "engagement", f"event = '{event_id}'")
    assert rows and rows[-1]["author"] == author
    revenue = servers.influx_rows(influxdb, social.db, "revenue", f"event = '{event_id}'")
    assert revenue and revenue[-1]["advertiser"] == "acme"
    for feed in (*feeds.values(), stats, late):
        feed.close()


def test_offensive_posts_are_quarantined_and_the_author_is_told(mosquitto, social):
    author, fan = uid("author"), uid("fan")
    social.run_cli("follow", fan, f"users/{author}")
    social.start()
    feed = Collector(mosquitto.address, f"feeds/{fan}/#")
    quarantine = Collector(mosquitto.address, f"quarantine/{author}")
    notices = Collector(mosquitto.address, f"feeds/{author}/notices")
    publish_all(mosquitto.address, [(f"users/{author}/posts", post(OFFENSIVE)),
                                    (f"users/{author}/posts", post(CLEAN))])
    assert quarantine.wait_count(1)
    blocked = json.loads(quarantine.messages[0][1])
    assert blocked["payload"]["text"] == OFFENSIVE
    verdict = blocked["verdicts"][0]
    assert verdict["label"] == "blocked" and verdict["flagged"] and verdict["version"]
    assert notices.wait_count(1)
    assert json.loads(notices.messages[0][1])["event_id"] == blocked["id"]
    assert feed.wait_count(1)
    social.wait_status(lambda s: s["metrics"]["committed"] >= 2)
    assert [m["payload"]["text"] for m in feed.json()] == [CLEAN]  # the blocked post never reached the follower
    for c in (feed, quarantine, notices):
        c.close()


def test_a_reply_reaches_the_original_author_and_a_repost_reaches_each_follower_once(mosquitto, social):
    alice, bob, carol, dan, erin = (uid(n) for n in ("alice", "bob", "carol", "dan", "erin"))
    social.run_cli("follow", bob, f"users/{alice}")      # bob follows alice
    social.run_cli("follow", dan, f"users/{bob}")        # dan follows bob and carol
    social.run_cli("follow", dan, f"users/{carol}")
    social.run_cli("follow", erin, f"users/{carol}")     # erin follows carol only
    social.run_cli("follow", erin, f"users/{alice}")     # ... and alice: she has the original already
    social.start()
    feeds = {u: Collector(mosquitto.address, f"feeds/{u}/#") for u in (alice, bob, dan, erin)}
    publish_all(mosquitto.address, [(f"users/{alice}/posts", post(CLEAN))])
    original = first_post_id(feeds[bob])

    # carol replies without following alice: the reply still reaches alice.
    publish_all(mosquitto.address, [(f"users/{carol}/posts", post("Agreed, lovely.", reply_to=original))])
    assert feeds[alice].wait_count(1)
    assert json.loads(feeds[alice].messages[0][1])["payload"]["reply_to"] == original

    # bob and carol both repost: dan follows both and gets the original once; erin already had it from alice.
    publish_all(mosquitto.address, [(f"users/{bob}/interactions", interact("repost", original)),
                                    (f"users/{carol}/interactions", interact("repost", original))])
    social.wait_status(lambda s: s["metrics"]["committed"] >= 4)
    assert feeds[dan].wait_for(lambda m: any(json.loads(p)["id"] == original for _, p, _ in m))
    feeds[dan].wait_for(lambda m: False, timeout=1.0)  # give a duplicate the chance to show up
    copies = [m for m in feeds[dan].json() if m["id"] == original]
    assert len(copies) == 1
    assert [m["id"] for m in feeds[erin].json()].count(original) == 1
    for c in feeds.values():
        c.close()


def test_bad_user_events_are_dead_lettered_with_reasons(mosquitto, social):
    social.start()
    dead = Collector(mosquitto.address, "gateway/deadletter")
    user = uid("user")
    publish_all(mosquitto.address, [
        (f"users/{user}/posts", b'{"text": 42}'),
        (f"users/{user}/posts", b'{"text": "hi", "author": "someone-else"}'),
        (f"users/{user}/posts", b'{"text": "   "}'),
        (f"users/{user}/interactions", b'{"type": "love", "event_id": "0"}'),
        (f"users/{user}/interactions", b'{"type": "like", "event_id": "../../x"}'),
        (f"users/{user}/posts", b"\xc3\x28"),
    ])
    assert dead.wait_count(6)
    assert sorted(m["reason"] for m in dead.json()) == sorted(
        ["wrong_type", "unknown_field", "empty_text", "bad_interaction", "bad_event_id", "invalid_utf8"])
    dead.close()


def test_the_social_simulator_drives_the_gateway_to_exact_counts(mosquitto, social, tmp_path):
    """Power-law graph set up through the gateway, posts, likes (some sent twice, some taken back), reposts and
    replies: the gateway's retained stats match what the simulated users did, post by post."""
    import subprocess
    import sys

    social.start()
    prefix = uid("s")
    expect = tmp_path / "expect.jsonl"
    sim = subprocess.run(
        [sys.executable, "-m", "firmware_sim.cli", "social", "--broker", mosquitto.address, "--users", "40",
         "--posts", "30", "--rate", "50", "--user-prefix", prefix, "--expect", str(expect), "--no-progress",
         "--p-like", "0.5", "--p-duplicate", "0.5", "--p-unlike", "0.2", "--settle", "3"],
        capture_output=True, text=True, timeout=120)
    assert sim.returncode == 0, sim.stderr
    summary = json.loads(sim.stdout)
    assert summary["sent"]["posts"] == 30 and summary["follow_edges"] >= 40
    assert summary["sent"].get("duplicate_likes", 0) > 0
    expected = [json.loads(line) for line in expect.read_text().splitlines()]
    assert expected
    stats = Collector(mosquitto.address, "events/+/stats")
    wanted = {e["event_id"]: e for e in expected}

    def matches(messages):
        latest = {json.loads(p)["event_id"]: json.loads(p) for _, p, _ in messages}
        return all(e in latest and all(latest[e][k] == want[k] for k in ("likes", "reposts", "replies"))
                   for e, want in wanted.items())

    if not stats.wait_for(matches, timeout=30):
        latest = {json.loads(p)["event_id"]: json.loads(p) for _, p, _ in stats.messages}
        diff = [(want, latest.get(e)) for e, want in wanted.items()
                if e not in latest or any(latest[e][k] != want[k] for k in ("likes", "reposts", "replies"))]
        raise AssertionError(f"{len(diff)} of {len(wanted)} posts differ, e.g. {diff[:3]}")
    stats.close()


def test_a_post_to_thousands_of_followers_with_live_stats_keeps_the_window_bounded(mosquitto, social):
    """Stats, quarantine and alerts publish while fan-out fills the broker's in-flight window: every QoS 1
    publish must wait for room (gmqtt raises when it runs out of packet ids)."""
    from gateway.fanout.graph import FollowerGraph

    star = uid("star")
    graph = FollowerGraph(social.data_dir / "graph.db")
    for i in range(3000):
        graph.follow(f"{star}f{i}", f"users/{star}")
    graph.close()
    social.start()
    feeds = Collector(mosquitto.address, f"feeds/+/users/{star}/post")
    publish_all(mosquitto.address, [(f"users/{star}/posts", post(CLEAN)) for _ in range(3)])
    assert feeds.wait_count(9000, timeout=60)
    event_ids = {json.loads(p)["id"] for _, p, _ in feeds.messages}
    stats = Collector(mosquitto.address, "events/+/stats")
    likes = [(f"users/{star}f{i}/interactions", interact("like", e)) for i in range(300) for e in event_ids]
    publish_all(mosquitto.address, likes)
    assert stats.wait_for(lambda m: {json.loads(p)["event_id"]: json.loads(p)["likes"] for _, p, _ in m
                                     if json.loads(p)["event_id"] in event_ids} == {e: 300 for e in event_ids},
                          timeout=60)
    assert social.proc is not None and social.proc.poll() is None
    feeds.close()
    stats.close()
