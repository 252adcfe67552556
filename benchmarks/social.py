"""Benchmark of the users/posts/engagement path (not a test): prints JSON.

Starts the project's mosquitto and the gateway (durability on, the content model on, no InfluxDB), builds the
follower graph with the gateway's own CLI code, and measures at subscribers in a separate process:

- `one_post_to_10k_s`: one post by a user with 10,000 followers, from publish to the 10,000th feed delivery;
- `posts_per_s_100_followers`: 40 authors with 100 followers each post as fast as the broker acknowledges;
  posts/s = posts / time to the last delivery (deliveries/s alongside);
- `posts_per_s_1_follower`: 40 authors with one follower each post `--solo-posts` posts as fast as the broker
  acknowledges: what the path itself carries (the content model, the log, one delivery per post);
- `interactions_per_s`: 5,000 users like one post (20 % of the likes sent twice); interactions/s = likes sent /
  time until the retained stats show 5,000 likes.

Each phase runs `--runs` times; medians are reported, every run is kept.

    python benchmarks/social.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.fanout.graph import FollowerGraph  # noqa: E402
from tests import servers  # noqa: E402
from tests.gateway_process import GatewayProcess  # noqa: E402


def counter(address: str, topic: str, expect: int, ready: Any, out: Any, timeout: float,
            stop_when: str | None = None) -> None:
    """Counts messages on `topic`; with stop_when="likes:N" stops when a stats message shows N likes."""
    import paho.mqtt.client as mqtt

    host, _, port = address.rpartition(":")
    state = {"n": 0, "last": 0.0, "done": False}
    want_likes = int(stop_when.split(":")[1]) if stop_when else None

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        state["n"] += 1
        state["last"] = time.time()
        if want_likes is not None and json.loads(msg.payload).get("likes") == want_likes:
            state["done"] = True

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *a: ready.set()
    client.connect(host, int(port))
    client.loop_start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not state["done"] and (want_likes is not None or state["n"] < expect):
        time.sleep(0.01)
    client.disconnect()
    client.loop_stop()
    out.put({"count": state["n"], "last": state["last"], "done": state["done"]})


def publisher(address: str) -> Any:
    import paho.mqtt.client as mqtt

    host, _, port = address.rpartition(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.connect(host, int(port))
    client.loop_start()
    return client


def post(text: str) -> bytes:
    return json.dumps({"text": text, "nonce": uuid.uuid4().hex}).encode()


def run_once(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    broker = servers.mosquitto(base)
    broker.start()
    gw = GatewayProcess(base / "gw", broker.address, "--influx-api", "none", "--log-level", "WARNING",
                        client_id="bench-social")
    graph = FollowerGraph(gw.data_dir / "graph.db")
    for i in range(10_000):
        graph.follow(f"fan{i:05d}", "users/celebrity")
    for a in range(40):
        for i in range(100):
            graph.follow(f"reader{a:02d}x{i:03d}", f"users/author{a:02d}")
        graph.follow(f"soloreader{a:02d}", f"users/solo{a:02d}")
    graph.close()
    ctx = mp.get_context("spawn")
    result: dict[str, Any] = {}
    pub = None
    try:
        gw.start()
        pub = publisher(broker.address)

        # 1 post to 10,000 followers.
        ready, out = ctx.Event(), ctx.Queue()
        sub = ctx.Process(target=counter, args=(broker.address, "feeds/+/users/celebrity/post", 10_000, ready,
                                                out, 60))
        sub.start()
        ready.wait(10)
        t0 = time.time()
        pub.publish("users/celebrity/posts", post("A lovely day for a walk by the river."), qos=1)
        got = out.get(timeout=90)
        sub.join()
        result["one_post_to_10k_s"] = round(got["last"] - t0, 3) if got["count"] >= 10_000 else None
        result["one_post_delivered"] = got["count"]

        # Posts with 100 followers each.
        n_posts = args.posts
        ready, out = ctx.Event(), ctx.Queue()
        sub = ctx.Process(target=counter, args=(broker.address, "feeds/+/users/+/post", n_posts * 100, ready,
                                                out, 300))
        sub.start()
        ready.wait(10)
        t0 = time.time()
        infos = [pub.publish(f"users/author{k % 40:02d}/posts", post(f"Post number {k} about the weather."),
                             qos=1) for k in range(n_posts)]
        for info in infos:
            info.wait_for_publish(60)
        got = out.get(timeout=320)
        sub.join()
        span = got["last"] - t0
        result["posts_per_s_100_followers"] = round(n_posts / span, 1) if got["count"] >= n_posts * 100 else None
        result["deliveries_per_s"] = round(got["count"] / span, 1)
        result["posts_delivered"] = got["count"]

        # Posts with one follower each: the path's own pace.
        n_solo = args.solo_posts
        ready, out = ctx.Event(), ctx.Queue()
        sub = ctx.Process(target=counter, args=(broker.address, "feeds/+/users/+/post", n_solo, ready, out, 300))
        sub.start()
        ready.wait(10)
        t0 = time.time()
        words = "the river walk sensor today weather morning coffee meeting garden train city music".split()
        infos = [pub.publish(f"users/solo{k % 40:02d}/posts",
                             post(" ".join(words[(k * 7 + j) % len(words)] for j in range(5 + k % 20))), qos=1)
                 for k in range(n_solo)]
        for info in infos:
            info.wait_for_publish(60)
        got = out.get(timeout=320)
        sub.join()
        span = got["last"] - t0
        result["posts_per_s_1_follower"] = round(n_solo / span, 1) if got["count"] >= n_solo else None

        # Interactions counted: likes on one post until the retained stats show them all.
        status = gw.status() or {}
        target_ready, target_out = ctx.Event(), ctx.Queue()
        probe = ctx.Process(target=counter, args=(broker.address, "feeds/fan00000/users/celebrity/post", 1,
                                                  target_ready, target_out, 30))
        probe.start()
        target_ready.wait(10)
        pub.publish("users/celebrity/posts", post("Second post, please like it."), qos=1)
        target_out.get(timeout=40)
        probe.join()
        # The event id of that post: read it from the log (the feed message carried it too).
        import sqlite3

        db = sqlite3.connect(gw.data_dir / "log.db")
        event_id = db.execute("SELECT event_id FROM posts WHERE author = 'celebrity' ORDER BY rowid DESC LIMIT 1"
                              ).fetchone()[0]
        db.close()
        likers = args.likers
        ready, out = ctx.Event(), ctx.Queue()
        sub = ctx.Process(target=counter, args=(broker.address, f"events/{event_id}/stats", 0, ready, out, 120,
                                                f"likes:{likers}"))
        sub.start()
        ready.wait(10)
        t0 = time.time()
        sent = 0
        infos = []
        for i in range(likers):
            body = json.dumps({"type": "like", "event_id": event_id}).encode()
            infos.append(pub.publish(f"users/fan{i:05d}/interactions", body, qos=1))
            sent += 1
            if i % 5 == 0:
                infos.append(pub.publish(f"users/fan{i:05d}/interactions", body, qos=1))
                sent += 1
        for info in infos:
            info.wait_for_publish(60)
        got = out.get(timeout=130)
        sub.join()
        result["interactions_sent"] = sent
        result["interactions_per_s"] = round(sent / (got["last"] - t0), 1) if got["done"] else None
        result["gateway_rss_peak_mb"] = round(_rss_peak_mb(gw.proc.pid), 1) if gw.proc else None
        result["gateway_committed"] = (gw.status() or status).get("metrics", {}).get("committed")
    finally:
        if pub is not None:
            pub.disconnect()
            pub.loop_stop()
        gw.kill()
        broker.stop()
    return result


def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--posts", type=int, default=400)
    parser.add_argument("--likers", type=int, default=5000)
    parser.add_argument("--solo-posts", type=int, default=20000)
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="gw-social-bench-") as tmp:
            run = run_once(args, Path(tmp))
            run["run"] = i
            runs.append(run)
            print(json.dumps(run), file=sys.stderr)
    keys = ("one_post_to_10k_s", "posts_per_s_100_followers", "deliveries_per_s", "posts_per_s_1_follower",
            "interactions_per_s",
            "gateway_rss_peak_mb")
    median = {k: statistics.median(r[k] for r in runs if r.get(k) is not None)
              for k in keys if any(r.get(k) is not None for r in runs)}
    print(json.dumps({"params": vars(args), "median": median, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
