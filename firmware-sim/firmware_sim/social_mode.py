"""`firmware-sim social`: simulated users who follow, post, like, repost and reply through the gateway.

1. A follower graph with a power-law shape (preferential attachment: a user is followed with probability
   proportional to 1 + its followers so far, so a few users end up with most followers) is set up through the
   gateway itself, one `users/{id}/follows` message per edge.
2. Authors post at `--rate` posts/s, texts drawn from a corpus (a CSV with a `tweet` or `comment_text` column, or
   a small built-in set of clean and offensive lines), some sponsored by an advertiser.
3. A subscriber on every user's feed reacts to each delivered post like a person might: like (sometimes twice, to
   exercise exactly-once counting; sometimes taken back), repost, reply (with clean built-in lines, since a reply
   the content policy blocks is not counted).

The summary (JSON on stdout) gives what was sent and, per post, the counts the gateway must end up with
(`--expect FILE`, one JSON line per post: distinct likers minus unlikes, distinct reposters, replies).
"""

from __future__ import annotations

import csv
import json
import random
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import click
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

BUILTIN_CLEAN = [
    "Lovely morning at the lake, the ducks are back.",
    "Anyone tried the new bakery on the corner? The rye bread is great.",
    "Finished the marathon in under four hours, so happy!",
    "The sunset tonight was unreal, orange and pink everywhere.",
    "Reading a book about the history of maps, highly recommended.",
    "Our team shipped the release today, thanks everyone.",
    "Rain all day, perfect weather for soup and a film.",
    "Does anyone know a good bike repair shop nearby?",
    "The library extended its opening hours, great news for students.",
    "Planted tomatoes and basil on the balcony this weekend.",
]
BUILTIN_OFFENSIVE = [
    "you are a stupid worthless idiot, shut up",
    "what a pathetic moron, nobody wants you here",
    "shut up you dumb loser, you are garbage",
    "go away you disgusting idiot",
]
ADVERTISERS = ("acme", "globex", "initech")


def load_corpus(path: Path | None, limit: int = 20_000) -> list[str]:
    if path is None:
        return BUILTIN_CLEAN * 3 + BUILTIN_OFFENSIVE
    texts: list[str] = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = row.get("tweet") or row.get("comment_text") or row.get("text")
            if text and text.strip():
                texts.append(text.strip()[:1000])
            if len(texts) >= limit:
                break
    if not texts:
        raise click.BadParameter(f"no texts in {path} (expected a tweet, comment_text or text column)")
    return texts


def power_law_follows(users: list[str], per_user: int, rng: random.Random) -> list[tuple[str, str]]:
    """(follower, followee) edges of a scale-free graph (Price's model): users join one by one and follow
    `per_user` earlier users on average, each picked with probability proportional to its followers + 1. The
    followers-per-user distribution is a power law with exponent about 2 + 1/per_user, so a 100,000-user graph has a
    handful of users with over 10,000 followers, as real social graphs do, and most users with a few."""
    edges: set[tuple[str, str]] = set()
    by_degree: list[str] = []  # one entry per follower gained: sampling it picks proportionally to followers
    p_popular = per_user / (per_user + 1.0)
    for joined, user in enumerate(users):
        if joined == 0:
            continue
        want = min(joined, max(1, round(rng.expovariate(1.0 / per_user))))
        tries = 0
        while want and tries < want * 10:
            tries += 1
            if by_degree and rng.random() < p_popular:
                target = rng.choice(by_degree)
            else:
                target = users[rng.randrange(joined)]
            if (user, target) in edges:
                continue
            edges.add((user, target))
            by_degree.append(target)
            want -= 1
    return sorted(edges)


class SocialSim:
    def __init__(self, host: str, port: int, users: int, posts: int, rate: float, seed: int, corpus: list[str],
                 p_like: float, p_repost: float, p_reply: float, p_dup: float, p_unlike: float,
                 p_sponsor: float, prefix: str) -> None:
        self.rng = random.Random(seed)
        self.users = [f"{prefix}{i + 1:05d}" for i in range(users)]
        self.posts, self.rate, self.corpus = posts, rate, corpus
        self.p = dict(like=p_like, repost=p_repost, reply=p_reply, dup=p_dup, unlike=p_unlike, sponsor=p_sponsor)
        self.sent: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.likes: dict[str, set[str]] = defaultdict(set)
        self.reposts: dict[str, set[str]] = defaultdict(set)
        self.replies: dict[str, int] = defaultdict(int)
        self.seen: set[tuple[str, str]] = set()  # (user, event) deliveries already reacted to
        self.posted: set[str] = set()
        self.acked = 0
        self.pub = self._client(f"social-sim-{seed}-pub")
        self.sub = self._client(f"social-sim-{seed}-sub")
        self.sub.on_message = self._on_delivery
        self.subscribed = threading.Event()
        self.prefix = prefix
        self.sub.on_connect = lambda c, *a: c.subscribe([("feeds/+/users/+/post", 1)])
        self.sub.on_subscribe = lambda *a: self.subscribed.set()
        self.pub.on_publish = self._on_publish
        self.host, self.port = host, port

    @staticmethod
    def _client(client_id: str) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        return client

    def _on_publish(self, *args: Any) -> None:
        with self.lock:
            self.acked += 1

    def _send(self, user: str, what: str, doc: dict[str, Any], count_as: str) -> None:
        self.pub.publish(f"users/{user}/{what}", json.dumps(doc), qos=1)
        with self.lock:
            self.sent[count_as] += 1

    def _on_delivery(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        user = msg.topic.split("/")[1]
        if not user.startswith(self.prefix):
            return  # someone else's feed on the same broker
        env = json.loads(msg.payload)
        event_id = env["id"]
        with self.lock:
            if (user, event_id) in self.seen:
                return
            self.seen.add((user, event_id))
        r, p = self.rng.random, self.p
        if r() < p["like"]:
            with self.lock:
                self.likes[event_id].add(user)
            self._send(user, "interactions", {"type": "like", "event_id": event_id}, "likes")
            if r() < p["dup"]:
                self._send(user, "interactions", {"type": "like", "event_id": event_id}, "duplicate_likes")
            if r() < p["unlike"]:
                with self.lock:
                    self.likes[event_id].discard(user)
                self._send(user, "interactions", {"type": "unlike", "event_id": event_id}, "unlikes")
        if r() < p["repost"]:
            with self.lock:
                self.reposts[event_id].add(user)
            self._send(user, "interactions", {"type": "repost", "event_id": event_id}, "reposts")
        if r() < p["reply"]:
            with self.lock:
                self.replies[event_id] += 1
            # Replies are friendly (the built-in clean lines): a reply the content policy blocks is not counted,
            # and the expected counts must not depend on the model's verdicts.
            self._send(user, "posts", {"text": self.rng.choice(BUILTIN_CLEAN), "reply_to": event_id,
                                       "nonce": uuid.uuid4().hex}, "replies")

    def run(self, progress: bool) -> dict[str, Any]:
        for client in (self.pub, self.sub):
            try:
                client.connect(self.host, self.port, keepalive=30)
            except OSError as exc:
                raise click.ClickException(
                    f"cannot reach the MQTT broker at {self.host}:{self.port}: {exc}") from None
            client.loop_start()
        if not self.subscribed.wait(10):
            raise click.ClickException("feed subscription was not acknowledged")
        t0 = time.monotonic()
        edges = power_law_follows(self.users, 8, self.rng)
        for follower, followee in edges:
            self._send(follower, "follows", {"follow": f"users/{followee}"}, "follows")
        self._wait_acked(60)
        follows_s = time.monotonic() - t0
        t1 = time.monotonic()
        bar = click.progressbar(length=self.posts, label="posts", file=sys.stderr) if progress else None
        for k in range(self.posts):
            due = t1 + k / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            doc: dict[str, Any] = {"text": self.rng.choice(self.corpus), "nonce": uuid.uuid4().hex}
            if self.rng.random() < self.p["sponsor"]:
                doc["sponsor"] = self.rng.choice(ADVERTISERS)
            self._send(self.rng.choice(self.users), "posts", doc, "posts")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.render_finish()
        self._wait_acked(60)
        followers_of = defaultdict(int)
        for _, followee in edges:
            followers_of[followee] += 1
        top = sorted(followers_of.values(), reverse=True)
        return {"users": len(self.users), "follow_edges": len(edges), "max_followers": top[0] if top else 0,
                "follows_setup_s": round(follows_s, 2), "sent": dict(self.sent), "acknowledged": self.acked,
                "elapsed_s": round(time.monotonic() - t0, 2)}

    def settle(self, seconds: float) -> None:
        """Let reactions to the last posts (and reactions to those) come in."""
        deadline = time.monotonic() + seconds
        last = -1
        while time.monotonic() < deadline:
            with self.lock:
                total = sum(self.sent.values())
            if total == last:
                break
            last = total
            time.sleep(1.0)
        self._wait_acked(30)

    def _wait_acked(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.acked >= sum(self.sent.values()):
                    return
            time.sleep(0.02)

    def expected(self) -> list[dict[str, Any]]:
        with self.lock:
            ids = set(self.likes) | set(self.reposts) | set(self.replies)
            return [{"event_id": e, "likes": len(self.likes.get(e, ())), "reposts": len(self.reposts.get(e, ())),
                     "replies": self.replies.get(e, 0)} for e in sorted(ids)]

    def close(self) -> None:
        for client in (self.pub, self.sub):
            client.disconnect()
            client.loop_stop()


@click.command("social")
@click.option("--broker", default="127.0.0.1:1883", show_default=True)
@click.option("--users", type=click.IntRange(min=2), default=100, show_default=True)
@click.option("--posts", type=click.IntRange(min=0), default=200, show_default=True)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="Posts per second (reactions come on top).")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV of texts (tweet / comment_text / text column); default: a small built-in set.")
@click.option("--p-like", type=click.FloatRange(0, 1), default=0.3, show_default=True)
@click.option("--p-repost", type=click.FloatRange(0, 1), default=0.05, show_default=True)
@click.option("--p-reply", type=click.FloatRange(0, 1), default=0.05, show_default=True)
@click.option("--p-duplicate", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="Chance a like is sent twice.")
@click.option("--p-unlike", type=click.FloatRange(0, 1), default=0.1, show_default=True)
@click.option("--p-sponsor", type=click.FloatRange(0, 1), default=0.1, show_default=True)
@click.option("--user-prefix", default="u", show_default=True)
@click.option("--settle", type=float, default=5.0, show_default=True, help="Seconds to wait for late reactions.")
@click.option("--expect", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the counts each post must end with (JSON lines).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def social_command(broker: str, users: int, posts: int, rate: float, seed: int, corpus: Path | None, p_like: float,
                   p_repost: float, p_reply: float, p_duplicate: float, p_unlike: float, p_sponsor: float,
                   user_prefix: str, settle: float, expect: Path | None, progress: bool) -> None:
    """Simulated users: a power-law follower graph, posts, likes, reposts and replies; JSON summary on stdout."""
    host, _, port = broker.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {broker!r}", param_hint="--broker")
    sim = SocialSim(host, int(port), users, posts, rate, seed, load_corpus(corpus), p_like, p_repost, p_reply,
                    p_duplicate, p_unlike, p_sponsor, user_prefix)
    try:
        summary = sim.run(progress)
        sim.settle(settle)
        summary["sent"] = dict(sim.sent)
        summary["acknowledged"] = sim.acked
    finally:
        sim.close()
    expected = sim.expected()
    if expect is not None:
        with open(expect, "w", encoding="utf-8") as f:
            for row in expected:
                f.write(json.dumps(row) + "\n")
    summary["posts_with_engagement"] = len(expected)
    click.echo(json.dumps(summary))
