"""Benchmark of the follower graph at social-network scale (not a test): prints JSON.

The graph: 100,000 users (`--users`) following each other by the simulator's scale-free model
(`firmware_sim.social_mode.power_law_follows`: about 760,000 edges, a dozen users with over 10,000 followers).

Graph layer, in this process, on a fresh file per run:
- `import_edges_per_s`: `gateway import-follows`'s path (`FollowerGraph.import_changes`, 20,000 per transaction);
- `single_follows_per_s`: the same code with one transaction (one fsync) per edge, on a 2,000-edge sample: the
  variant the batching replaced, measured in the same run;
- `load_s`, `mirror_mb`: the daemon's start-up load of the whole graph and the memory its mirror takes (RSS growth,
  in a fresh process);
- `lookup_ns_p50/p99`: `followers(source)` for random sources, the pipeline's per-event lookup;
- `live_follows_per_s`: 20,000 concurrent follow requests through `GraphWriter` (the MQTT path's group commit).

End to end (`--e2e`, the default): the real gateway with that graph on a real mosquitto; `mqtt_follows_per_s` is
5,000 `users/{id}/follows` messages acknowledged by the gateway (PUBACK after the graph commit) per second; then a
post by the most-followed user, timed to its last feed delivery, and the gateway's RSS with the graph loaded.

    python benchmarks/graph.py --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "firmware-sim"))
sys.path.insert(0, str(REPO / "benchmarks"))

from firmware_sim.social_mode import power_law_follows  # noqa: E402
from gateway.fanout.graph import FOLLOW, Change, FollowerGraph, GraphWriter  # noqa: E402
from social import _rss_peak_mb, counter, post, publisher  # noqa: E402
from tests import servers  # noqa: E402
from tests.gateway_process import GatewayProcess  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_in_fresh_process(path: str, out: Any) -> None:
    before = rss_mb()
    t0 = time.perf_counter()
    g = FollowerGraph(Path(path))
    load_s = time.perf_counter() - t0
    out.put({"load_s": round(load_s, 3), "mirror_mb": round(rss_mb() - before, 1)})
    g.close()


def graph_layer(edges: list[tuple[str, str]], users: list[str], base: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    sample = edges[:: max(1, len(edges) // 2000)][:2000]
    g = FollowerGraph(base / "single.db")
    t0 = time.perf_counter()
    for follower, followee in sample:
        g.follow(follower, f"users/{followee}")
    result["single_follows_per_s"] = round(len(sample) / (time.perf_counter() - t0), 1)
    g.close()

    g = FollowerGraph(base / "graph.db")
    t0 = time.perf_counter()
    added, _ = g.import_changes(Change(FOLLOW, f, f"users/{t}") for f, t in edges)
    result["import_edges_per_s"] = round(added / (time.perf_counter() - t0), 1)
    g.close()

    # Measured in a fresh process: in this one, memory freed by earlier phases would hide the mirror's size.
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    loader = ctx.Process(target=load_in_fresh_process, args=(str(base / "graph.db"), out))
    loader.start()
    result.update(out.get(timeout=300))
    loader.join()
    g = FollowerGraph(base / "graph.db")
    result["edges"] = g.edges()
    sizes = sorted((len(g.followers(f"users/{u}")) for u in users), reverse=True)
    result["max_followers"] = sizes[0]
    result["users_with_10k_followers"] = sum(1 for n in sizes if n >= 10_000)

    rng = random.Random(7)
    sources = [f"users/{rng.choice(users)}" for _ in range(200_000)]
    samples = []
    followers = g.followers
    for i in range(0, len(sources), 1000):
        chunk = sources[i:i + 1000]
        t0 = time.perf_counter_ns()
        for s in chunk:
            followers(s)
        samples.append((time.perf_counter_ns() - t0) / len(chunk))
    samples.sort()
    result["lookup_ns_p50"] = round(samples[len(samples) // 2])
    result["lookup_ns_p99"] = round(samples[int(len(samples) * 0.99)])

    async def live() -> float:
        with ThreadPoolExecutor(1) as storage:
            writer = GraphWriter(g, storage)
            t0 = time.perf_counter()
            await asyncio.gather(*(writer.submit([Change(FOLLOW, f"newcomer{i}", f"users/{users[i % 5000]}")])
                                   for i in range(20_000)))
            return 20_000 / (time.perf_counter() - t0)

    result["live_follows_per_s"] = round(asyncio.run(live()), 1)
    g.close()
    return result


def end_to_end(base: Path, top_user: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    broker = servers.mosquitto(base)
    broker.start()
    gw = GatewayProcess(base / "gw", broker.address, "--influx-api", "none", "--log-level", "WARNING",
                        client_id="bench-graph")
    (base / "gw").mkdir(parents=True, exist_ok=True)
    (base / "graph.db").rename(base / "gw" / "graph.db")
    g = FollowerGraph(base / "gw" / "graph.db")
    top_followers = len(g.followers(f"users/{top_user}"))
    g.close()
    ctx = mp.get_context("spawn")
    pub = None
    try:
        t0 = time.perf_counter()
        gw.start(timeout=120)
        result["gateway_start_s"] = round(time.perf_counter() - t0, 2)
        pub = publisher(broker.address)
        t0 = time.perf_counter()
        infos = [pub.publish(f"users/joiner{i:05d}/follows",
                             json.dumps({"follow": f"users/{top_user}"}).encode(), qos=1) for i in range(5000)]
        for info in infos:
            info.wait_for_publish(120)
        result["mqtt_follows_per_s"] = round(5000 / (time.perf_counter() - t0), 1)

        expect = top_followers + 5000
        ready, out = ctx.Event(), ctx.Queue()
        sub = ctx.Process(target=counter, args=(broker.address, f"feeds/+/users/{top_user}/post", expect, ready,
                                                out, 90))
        sub.start()
        ready.wait(10)
        t0 = time.time()
        pub.publish(f"users/{top_user}/posts", post("Thank you all for following!"), qos=1)
        got = out.get(timeout=120)
        sub.join()
        result["top_post_followers"] = expect
        result["top_post_delivered"] = got["count"]
        result["top_post_s"] = round(got["last"] - t0, 3) if got["count"] >= expect else None
        result["gateway_rss_peak_mb"] = round(_rss_peak_mb(gw.proc.pid), 1) if gw.proc else None
    finally:
        if pub is not None:
            pub.disconnect()
            pub.loop_stop()
        gw.kill()
        broker.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--no-e2e", dest="e2e", action="store_false")
    args = parser.parse_args()
    users = [f"u{i:06d}" for i in range(args.users)]
    edges = power_law_follows(users, 8, random.Random(1))
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="gw-graph-bench-") as tmp:
            run = graph_layer(edges, users, Path(tmp))
            if args.e2e:
                counts: dict[str, int] = {}
                for _, t in edges:
                    counts[t] = counts.get(t, 0) + 1
                top = max(counts, key=counts.__getitem__)
                run.update(end_to_end(Path(tmp), top))
            run["run"] = i
            runs.append(run)
            print(json.dumps(run), file=sys.stderr)
    keys = [k for k in runs[0] if k != "run" and isinstance(runs[0][k], (int, float))]
    median = {k: statistics.median(r[k] for r in runs if r.get(k) is not None)
              for k in keys if any(r.get(k) is not None for r in runs)}
    print(json.dumps({"params": vars(args), "median": median, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
