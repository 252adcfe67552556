"""The upstream link's parts without a broker: topics, the rate cap, the sink's batches and their PUBACKs, config."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway import config
from gateway.event import Event, Verdict
from gateway.mqtt import packets as pk
from gateway.ops.metrics import Metrics
from gateway.ratelimit import TokenBucket
from gateway.sinks.upstream import Pacer, Topics, UpstreamSink


class FakeLink:
    """Takes publishes while `connected` is set; `ack_all()` plays the central broker's PUBACKs."""

    def __init__(self, window: int = 1_000_000) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.sent: list[tuple[bytes, bytes, bytes]] = []
        self.unacked: list[Any] = []
        self.window = window

    def publish(self, topic: bytes, payload: bytes, qos: int = 1, retain: bool = False, tracker: Any = None,
                properties: bytes = b"") -> bool:
        if len(self.unacked) >= self.window:
            return False
        self.sent.append((topic, payload, properties))
        self.unacked.append(tracker)
        return True

    async def room(self) -> None:
        await asyncio.sleep(0)

    def ack_all(self) -> None:
        unacked, self.unacked = self.unacked, []
        for tracker in unacked:
            tracker.acked()


def reading(offset: int, device: str = "d1", episode: str | None = None) -> Event:
    verdict = Verdict("sensor-anomaly", "2.2.0", 0.9 if episode else 0.01, "anomaly" if episode else "normal",
                      bool(episode), {"episode": episode} if episode else None)
    body = b'{"seq":%d,"t":1.5}' % offset
    return Event(offset, f"019ac9e3a1f4{offset:016x}", f"devices/{device}", "telemetry", 1764322800000 + offset,
                 {"seq": offset, "t": 1.5}, body, verdict, verdict.to_json())


def test_topics_fill_the_template_per_source_and_kind() -> None:
    topics = Topics("sites/{site}/{source}/{kind}", "plant-7")
    assert topics("devices/d1", "telemetry") == b"sites/plant-7/devices/d1/telemetry"
    assert topics.stats("019a") == b"sites/plant-7/events/019a/stats"
    other = Topics("{site}/{source_kind}/{source_id}/{kind}", "s")
    assert other("devices/d1", "alert") == b"s/devices/d1/alert"


@pytest.mark.parametrize("template, why", [
    ("sites/{site}/{kind}", "{source}"),
    ("sites/{site}/{source_kind}/{kind}", "{source}"),
    ("sites/{site}/{source}", "{kind}"),
    ("sites/{site}/{source}/{kind}/{nope}", "may only use"),
    ("sites/+/{source}/{kind}", "wildcards"),
    ("sites//{source}/{kind}", "empty levels"),
])
def test_a_topic_template_that_cannot_work_is_refused_naming_the_field(template: str, why: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse(f'[upstream]\ntopic_template = "{template}"\n')
    assert "upstream.topic_template" in str(err.value) and why in str(err.value)


def test_upstream_config_is_off_by_default_and_checked_together() -> None:
    assert config.Config().upstream.enabled is False
    with pytest.raises(config.ConfigError, match="upstream.brokers"):
        config.parse("[upstream]\nenabled = true\n")
    with pytest.raises(config.ConfigError, match="upstream.ca_file"):
        config.parse('[upstream]\nca_file = "ca.crt"\n')
    with pytest.raises(config.ConfigError, match="unknown kind"):
        config.parse('[upstream]\nkinds = ["telemetry", "posts"]\n')
    with pytest.raises(config.ConfigError, match="upstream.brokers"):
        config.parse('[upstream]\nbrokers = ["central"]\n')
    cfg = config.parse('[upstream]\nenabled = true\nbrokers = ["a:1883", "b:1883"]\nsite = "plant-7"\n')
    assert cfg.upstream.brokers == ["a:1883", "b:1883"]


def test_the_upstream_password_file_is_read_like_the_brokers(tmp_path: Any) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    cfg = config.parse(f'[upstream]\npassword_file = "{secret}"\n')
    assert config.with_secrets(cfg).upstream.password == "s3cret"


def test_pacing_keeps_the_average_rate_and_never_refuses() -> None:
    now = [0.0]
    bucket = TokenBucket(100.0, clock=lambda: now[0])  # burst: one second's worth
    waits = [bucket.delay() for _ in range(300)]
    assert waits[:100] == [0.0] * 100  # the burst
    assert waits[-1] == pytest.approx(2.0)  # 200 beyond it, at 100/s
    now[0] = 10.0
    assert bucket.delay() == 0.0  # refilled (to the burst, not beyond)


def test_a_pacer_takes_the_slower_of_events_and_bytes() -> None:
    pacer = Pacer(0, 1000.0)
    assert pacer.delay(1000) == 0.0
    assert pacer.delay(500) == pytest.approx(0.5, abs=0.01)


def test_user_properties_ride_on_a_v5_publish_and_are_left_out_on_311() -> None:
    props = pk.user_properties([("event-id", "abc")])
    v5 = pk.publish(b"t", b"p", 1, properties=props)
    assert props in v5 and v5.endswith(b"p")
    assert v5[1] == len(v5) - 2  # the remaining length counts the properties
    v311 = pk.publish(b"t", b"p", 1, version=pk.V311, properties=props)
    assert props not in v311 and v311 == pk.publish(b"t", b"p", 1, version=pk.V311)


def test_the_batch_is_done_only_on_every_puback() -> None:
    async def run() -> None:
        link, metrics = FakeLink(), Metrics()
        sink = UpstreamSink(link, Topics("sites/{site}/{source}/{kind}", "s"), ["telemetry", "alerts"], metrics)
        future = await sink.deliver([reading(1), reading(2, "d2", episode="start"), reading(3)])
        assert future is not None and not future.done()
        topics = [t for t, _, _ in link.sent]
        assert topics == [b"sites/s/devices/d1/telemetry", b"sites/s/devices/d2/telemetry",
                          b"sites/s/devices/d2/alert", b"sites/s/devices/d1/telemetry"]
        assert all(pk.user_properties([("event-id", reading(o).id)]) == link.sent[i][2]
                   for i, o in ((0, 1), (1, 2), (3, 3)))
        assert b'"id":"%s"' % reading(2).id.encode() in link.sent[2][1]  # the id is in the payload too
        link.ack_all()
        await asyncio.sleep(0)
        assert future.done() and metrics.get("upstream_forwarded") == 4

    asyncio.run(run())


def test_kinds_choose_what_is_forwarded() -> None:
    async def run() -> None:
        link = FakeLink()
        sink = UpstreamSink(link, Topics("{site}/{source}/{kind}", "s"), ["alerts"], Metrics())
        assert await sink.deliver([reading(1), reading(2)]) is None  # no alert: nothing to wait for
        await sink.deliver([reading(3, episode="end")])
        assert [t for t, _, _ in link.sent] == [b"s/devices/d1/alert"]

    asyncio.run(run())


def test_nothing_is_published_while_the_link_is_down() -> None:
    async def run() -> None:
        link = FakeLink()
        link.connected.clear()
        sink = UpstreamSink(link, Topics("{site}/{source}/{kind}", "s"), ["telemetry"], Metrics())
        task = asyncio.ensure_future(sink.deliver([reading(1)]))
        await asyncio.sleep(0.01)
        assert not task.done() and link.sent == []
        link.connected.set()
        future = await asyncio.wait_for(task, 1)
        assert len(link.sent) == 1 and future is not None and not future.done()

    asyncio.run(run())
