"""Per-source rate limits: the token bucket itself, and the MQTT source dead-lettering what is over the limit."""

from __future__ import annotations

import json

import pytest

from gateway import config
from gateway.ratelimit import TokenBucket, TokenBuckets
from tests.recording_sink import SourceUnderTest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_the_rate_holds() -> None:
    clock = Clock()
    limiter = TokenBuckets(rate=10, burst=5, clock=clock)
    assert [limiter.allow("a") for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 0.1  # one token back
    assert [limiter.allow("a") for _ in range(2)] == [True, False]
    clock.now += 0.25  # two and a half tokens back
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]


def test_a_steady_source_at_the_rate_is_never_refused_and_one_above_it_is_held_to_it() -> None:
    clock = Clock()
    limiter = TokenBuckets(rate=100, burst=10, clock=clock)
    allowed = 0
    for _ in range(1000):  # 10 s at exactly 100/s
        clock.now += 0.01
        allowed += limiter.allow("steady")
    assert allowed == 1000
    allowed = 0
    for _ in range(3000):  # 10 s at 300/s: the rate, plus the burst once
        clock.now += 1 / 300
        allowed += limiter.allow("flood")
    assert 1000 <= allowed <= 1000 + 10 + 1


def test_sources_are_independent_and_idle_ones_refill_only_to_the_burst() -> None:
    clock = Clock()
    limiter = TokenBuckets(rate=1, burst=2, clock=clock)
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    assert limiter.allow("b")  # a's flood costs b nothing
    clock.now += 3600  # an hour idle earns the burst, not 3,600 tokens
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]


def test_the_default_burst_is_twice_the_rate_and_at_least_one() -> None:
    assert TokenBuckets(rate=50).burst == 100
    assert TokenBuckets(rate=0.1).burst == 1
    assert TokenBuckets(rate=50, burst=7).burst == 7
    with pytest.raises(ValueError):
        TokenBuckets(rate=0)


def test_idle_sources_are_forgotten_so_memory_follows_the_active_ones() -> None:
    clock = Clock()
    limiter = TokenBuckets(rate=10, burst=10, clock=clock, max_keys=100)
    for i in range(100):
        limiter.allow(f"old{i}")
    clock.now += 1.0  # burst / rate: every old bucket is full again
    for i in range(50):
        limiter.allow(f"new{i}")
    assert len(limiter) == 50
    # Sources active at the same time are all kept (forgetting them would hand out fresh bursts).
    for i in range(300):
        limiter.allow(f"busy{i}")
    assert len(limiter) == 350


def _source(tmp_path, limits: config.LimitsConfig) -> SourceUnderTest:
    return SourceUnderTest(tmp_path, limits=limits)


def test_the_source_dead_letters_events_over_the_limit_and_still_acknowledges_them(tmp_path) -> None:
    src = _source(tmp_path, config.LimitsConfig(per_source_rate=0.001, per_source_burst=3))
    for i in range(5):
        src.handle("devices/flood/telemetry", json.dumps({"seq": i, "t": 1.0}).encode())
    src.handle("devices/calm/telemetry", b'{"t": 1.0}')
    src.handle("users/flood/posts", b'{"text": "hi"}')  # users/flood is another source
    assert [r.source for r in src.appended] == ["devices/flood"] * 3 + ["devices/calm", "users/flood"]
    assert [(d.origin, d.reason) for d in src.dead] == [("devices/flood/telemetry", "rate_limited")] * 2
    letter = src.dead[0]
    assert json.loads(letter.payload)["seq"] == 3 and "per_source_rate" in letter.message
    assert src.link.acked == [1, 2, 3, 4, 5, 6, 7], "a rate-limited message is handled: acknowledged"
    assert src.metrics.get("rate_limited") == 2 and src.metrics.get("received") == 7
    src.close()


def test_follow_requests_count_against_the_same_source(tmp_path) -> None:
    src = _source(tmp_path, config.LimitsConfig(per_source_rate=0.001, per_source_burst=1))
    src.handle("users/spam/posts", b'{"text": "hi"}')
    src.handle("users/spam/follows", b'{"follow": "devices/d1"}')
    assert [d.reason for d in src.dead] == ["rate_limited"]
    assert src.graph.edges() == 0
    assert src.metrics.get("rate_limited") == 1
    src.close()


def test_without_a_limit_every_event_goes_through(tmp_path) -> None:
    assert config.LimitsConfig().per_source_rate == 0  # off by default: tests and benchmarks flood few devices
    src = _source(tmp_path, config.LimitsConfig())
    src.source.take([("devices/one/telemetry", b'{"t": 1.0}', i + 1) for i in range(5000)], 1)
    assert len(src.appended) == 5000 and not src.dead
    assert src.metrics.get("rate_limited") == 0
    src.close()


def test_limits_are_validated() -> None:
    with pytest.raises(config.ConfigError, match="limits.per_source_burst = 10.0: needs limits.per_source_rate"):
        config.parse("[limits]\nper_source_burst = 10")
    with pytest.raises(config.ConfigError, match="limits.per_source_rate = -1: must be"):
        config.parse("[limits]\nper_source_rate = -1")
    cfg = config.parse("[limits]\nper_source_rate = 50\nper_source_burst = 200")
    assert (cfg.limits.per_source_rate, cfg.limits.per_source_burst) == (50.0, 200.0)


def test_a_single_bucket_lets_its_burst_through_then_holds_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5  # one token back
    assert [bucket.take() for _ in range(2)] == [True, False]
    clock.now += 100  # refills to the burst, no further
    assert sum(bucket.take() for _ in range(10)) == 3
