"""Hostile input against the real gateway process and a real mosquitto.

The whole corpus (tests/corpus/) is published interleaved with good events; then a flood of 5,000 bad messages
runs beside a steady stream of good ones; then a follower that never reads sits next to one that does. Each time:
every bad input is counted with its reason (dead-letter publishing is rate-limited, so totals come from the status
file), the daemon stays up with a fresh status, and the good events reach their follower promptly.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.chaos_faults import SlowFollower
from tests.gateway_process import GatewayProcess
from tests.mqtt_helpers import Collector, publish_all
from tests.unit.test_hostile_input import CORPUS, KNOWN_BUGS, corpus_files, corpus_reason

pytestmark = pytest.mark.integration

BASE_TS = 1_764_322_800_000
CLEAN = "Lovely morning at the lake, the ducks are back and the coffee is good."
DEADLETTER_RATE = 20.0  # limits.deadletter_per_second, default


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def reading(seq: int, **extra: float) -> bytes:
    return json.dumps({"seq": seq, "ts": BASE_TS + seq, "temperature": 21.0 + seq % 5 * 0.1, **extra}).encode()


class TimedCollector(Collector):
    """A Collector that also notes when each message arrived (time.time(), comparable with a publisher's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.arrived: list[float] = []
        super().__init__(*args, **kwargs)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.arrived.append(time.time())
        super()._on_message(client, userdata, msg)


@pytest.fixture
def gateway(mosquitto: Any, tmp_path: Path) -> Any:
    gw = GatewayProcess(tmp_path / "gw", mosquitto.address, "--influx-api", "none", client_id=uid("gw"))
    yield gw
    gw.kill()


def assert_alive_and_fresh(gateway: GatewayProcess) -> dict[str, Any]:
    assert gateway.proc is not None and gateway.proc.poll() is None, gateway.output()[-3000:]
    status = gateway.wait_status(lambda s: time.time() - s["time"] < 3 and s["mqtt_connected"], timeout=10)
    return status


def corpus_messages(device: str, author: str, user: str) -> list[tuple[str, bytes, str]]:
    """(topic, payload, expected reason) for every corpus file that is not a known bug."""
    topics = {"telemetry": f"devices/{device}/telemetry", "posts": f"users/{author}/posts",
              "interactions": f"users/{user}/interactions", "follows": f"users/{user}/follows"}
    out = []
    for path in corpus_files():
        if path.relative_to(CORPUS).as_posix() in KNOWN_BUGS:
            continue
        if path.parent.name == "topics":
            doc = json.loads(path.read_text("utf-8"))
            topic, payload = doc["topic"], json.dumps(doc["payload"]).encode()
        else:
            topic, payload = topics[path.parent.name], path.read_bytes()
        out.append((topic, payload, corpus_reason(path)))
    return out


def test_the_whole_corpus_is_dead_lettered_while_good_events_around_it_arrive(mosquitto: Any,
                                                                                gateway: GatewayProcess) -> None:
    device, author, user = uid("dev"), uid("author"), uid("user")
    for source in (f"devices/{device}", f"users/{author}"):
        assert gateway.run_cli("follow", "fan", source).returncode == 0
    gateway.start()
    feed = Collector(mosquitto.address, "feeds/fan/#")
    dead = Collector(mosquitto.address, "gateway/deadletter", qos=0)
    bad = corpus_messages(device, author, user)
    assert len(bad) >= 100
    messages: list[tuple[str, bytes]] = []
    posts = 0
    for i, (topic, payload, _) in enumerate(bad):
        messages.append((topic, payload))
        messages.append((f"devices/{device}/telemetry", reading(i)))
        if i % 5 == 0:
            messages.append((f"users/{author}/posts", json.dumps({"text": CLEAN, "nonce": f"n{i}"}).encode()))
            posts += 1
    publish_all(mosquitto.address, messages)

    expected = Counter(reason for _, _, reason in bad)
    assert feed.wait_count(len(bad) + posts, timeout=60), f"fan got {len(feed.messages)} of {len(bad) + posts}"
    got = feed.json()
    assert sorted(m["payload"]["seq"] for m in got if m["kind"] == "telemetry") == list(range(len(bad)))
    assert sum(m["kind"] == "post" for m in got) == posts
    status = gateway.wait_status(lambda s: s["metrics"]["deadlettered"] >= len(bad), timeout=30)
    assert status["metrics"]["deadlettered"] == len(bad)
    assert status["deadletter_reasons"] == dict(expected)
    m = status["metrics"]
    assert m["deadletters_published"] + m["deadletters_suppressed"] == len(bad)
    assert dead.wait_count(int(m["deadletters_published"]), timeout=10)
    origins = {topic for topic, _, _ in bad}
    for letter in dead.json():
        assert letter["reason"] in expected and letter["message"] and letter["origin"] in origins
        assert letter["payload_bytes"] >= 0 and isinstance(letter["payload"], str)
    assert gateway.run_cli("following", user).stdout == ""  # no hostile follow got through
    assert_alive_and_fresh(gateway)
    feed.close()
    dead.close()


def test_a_flood_of_bad_messages_does_not_stall_good_traffic_and_dead_letters_keep_their_rate(
        mosquitto: Any, gateway: GatewayProcess) -> None:
    device = uid("dev")
    gateway.run_cli("follow", "calm", f"devices/{device}")
    gateway.start()
    feed = TimedCollector(mosquitto.address, "feeds/calm/#")
    dead = TimedCollector(mosquitto.address, "gateway/deadletter", qos=0)
    bad_pool = [(topic, payload) for topic, payload, _ in corpus_messages(uid("flood"), uid("fa"), uid("fu"))]
    flood = [bad_pool[i % len(bad_pool)] for i in range(5000)]

    good_n, good_rate = 150, 50.0
    sent: dict[int, float] = {}
    flood_window: list[float] = []

    def flood_paced() -> None:
        # 5,000 in about three seconds: ten bursts of 500, so good events are sent all through the flood.
        flood_window.append(time.time())
        for k in range(10):
            publish_all(mosquitto.address, flood[k * 500:(k + 1) * 500], timeout=60)
            time.sleep(max(0.0, flood_window[0] + 0.3 * (k + 1) - time.time()))
        flood_window.append(time.time())

    def good_stream() -> None:
        for s in range(good_n):
            stamp = time.time()
            sent[s] = stamp
            publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s, sent=stamp))])
            time.sleep(max(0.0, 1 / good_rate - (time.time() - stamp)))

    flooder = threading.Thread(target=flood_paced)
    good = threading.Thread(target=good_stream)
    started = time.time()
    flooder.start()
    good.start()
    flooder.join(130)
    flood_seconds = time.time() - started
    good.join(60)
    assert not flooder.is_alive() and not good.is_alive()

    assert feed.wait_count(good_n, timeout=30), f"calm got {len(feed.messages)} of {good_n}"
    latencies = []  # of the good events sent while the flood was running
    for (_, payload, _), at in zip(feed.messages, feed.arrived):
        stamp = json.loads(payload)["payload"]["sent"]
        if flood_window[0] <= stamp <= flood_window[1]:
            latencies.append(at - stamp)
    assert len(latencies) >= 50, "the good stream did not overlap the flood"
    p50, worst = statistics.median(latencies), max(latencies)
    print(f"flood of 5000 in {flood_seconds:.1f}s; {len(latencies)} good events during it: delivery p50 "
          f"{p50 * 1000:.0f} ms, max {worst * 1000:.0f} ms")
    assert p50 < 1.0 and worst < 5.0, (p50, worst)

    status = gateway.wait_status(lambda s: s["metrics"]["deadlettered"] >= 5000, timeout=60)
    assert status["metrics"]["deadlettered"] == 5000
    assert sum(status["deadletter_reasons"].values()) == 5000
    # The dead-letter topic: a bucket of `rate` tokens refilled at `rate`/s, so any one-second window carries at
    # most 2 * rate, and the whole flood at most rate * (duration + 1).
    time.sleep(1.5)
    arrived = sorted(dead.arrived)
    assert arrived, "no dead letter published at all"
    busiest = max(sum(1 for t in arrived if a <= t < a + 1.0) for a in arrived)
    span = arrived[-1] - arrived[0]
    print(f"dead letters published: {len(arrived)} over {span:.1f}s, busiest second {busiest}")
    assert busiest <= 2 * DEADLETTER_RATE + 2
    assert len(arrived) <= DEADLETTER_RATE * (span + 1) + 2
    assert status["metrics"]["deadletters_suppressed"] >= 5000 - len(arrived) - 5
    assert_alive_and_fresh(gateway)
    feed.close()
    dead.close()


def test_a_follower_that_never_reads_does_not_hold_up_the_others(mosquitto: Any, gateway: GatewayProcess) -> None:
    device, slow = uid("dev"), uid("slow")
    for follower in (slow, "quick"):
        gateway.run_cli("follow", follower, f"devices/{device}")
    gateway.start()
    # The simulator's chaos fault: a raw MQTT client with a persistent session that subscribes, then never reads.
    host, _, port = mosquitto.address.rpartition(":")
    stuck = SlowFollower(slow, host, int(port))
    stuck.connect()
    quick = TimedCollector(mosquitto.address, "feeds/quick/#")
    n = 3000
    started = time.time()
    publish_all(mosquitto.address, [(f"devices/{device}/telemetry", reading(s)) for s in range(n)], timeout=120)
    assert quick.wait_count(n, timeout=60), f"quick got {len(quick.messages)} of {n}"
    took = quick.arrived[-1] - started
    print(f"{n} events to the quick follower in {took:.1f}s beside a stuck one")
    assert sorted(json.loads(p)["payload"]["seq"] for _, p, _ in quick.messages) == list(range(n))
    # Everything is committed and nothing stays in flight: the stuck follower is the broker's problem, not ours.
    status = gateway.wait_status(lambda s: s["metrics"]["committed"] >= n and s["metrics"]["mqtt_in_flight"] == 0
                                 and s["metrics"]["feeds_lag"] == 0, timeout=20)
    assert status["metrics"]["delivered"] >= 2 * n
    assert_alive_and_fresh(gateway)
    stuck.close()
    quick.close()


# --- known bugs, end to end ----------------------------------------------------------------------------------


def test_a_lone_surrogate_nonce_does_not_stall_the_gateway(mosquitto: Any, gateway: GatewayProcess) -> None:
    device, author = uid("dev"), uid("author")
    gateway.run_cli("follow", "after", f"devices/{device}")
    gateway.start()
    feed = Collector(mosquitto.address, "feeds/after/#")
    publish_all(mosquitto.address, [(f"users/{author}/posts", b'{"text": "hi", "nonce": "\\ud800"}'),
                                    (f"devices/{device}/telemetry", reading(1))])
    try:
        assert feed.wait_count(1, timeout=15), "the good reading after the poison post never arrived"
        status = gateway.wait_status(lambda s: s["metrics"]["deadlettered"] >= 1, timeout=5)
        assert status["deadletter_reasons"] == {"bad_nonce": 1}
    finally:
        feed.close()


def test_a_huge_integer_ts_is_dead_lettered_and_good_events_flow(mosquitto: Any, gateway: GatewayProcess) -> None:
    device = uid("dev")
    gateway.run_cli("follow", "after", f"devices/{device}")
    gateway.start()
    feed = Collector(mosquitto.address, "feeds/after/#")
    huge = (CORPUS / "telemetry" / "bad_ts--integer-10-pow-400.json").read_bytes()
    publish_all(mosquitto.address, [(f"devices/{device}/telemetry", huge),
                                    (f"devices/{device}/telemetry", reading(1))], timeout=10)
    try:
        assert feed.wait_count(1, timeout=15)
        status = gateway.wait_status(lambda s: s["metrics"]["deadlettered"] >= 1, timeout=5)
        assert status["deadletter_reasons"] == {"bad_ts": 1}
        assert_alive_and_fresh(gateway)
    finally:
        feed.close()
