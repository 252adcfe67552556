"""What followers and dashboards get: envelope, topics, and the point of each reading."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.envelope import alert_topic, envelope, feed_topic
from gateway.event import Event, Verdict, compact_json
from gateway.log.store import LogStore
from gateway.sinks.influx import telemetry_lines
from gateway.sinks.lineprotocol import encode_line

PAYLOAD = {"seq": 17, "ts": 1_764_322_800_123, "temperature": 21.5}
VERDICT = Verdict("sensor-anomaly", "1.0.0", 0.93, "spike", True, {"fields": {"temperature": "spike"}})


def event(offset: int = 1_000_042, payload: dict | None = None, verdict: Verdict | None = VERDICT) -> Event:
    payload = PAYLOAD if payload is None else payload
    return Event(offset, "019ac9e3a1f40000a1b2c3d4e5f6", "devices/dev-0001", "telemetry", 1_764_322_800_123, payload,
                 compact_json(payload), verdict, verdict.to_json() if verdict else b"")


def test_each_follower_has_its_own_feed_topic_and_alerts_go_by_device():
    assert feed_topic("alice", event()) == b"feeds/alice/devices/dev-0001/telemetry"
    assert alert_topic(event()) == b"alerts/dev-0001"


def test_the_envelope_carries_the_original_payload_and_the_verdict():
    assert json.loads(envelope(event())) == {
        "id": "019ac9e3a1f40000a1b2c3d4e5f6", "offset": 1_000_042, "source": "devices/dev-0001",
        "kind": "telemetry", "ts": 1_764_322_800_123, "payload": PAYLOAD,
        "verdicts": [{"model": "sensor-anomaly", "version": "1.0.0", "score": 0.93, "label": "spike",
                      "flagged": True, "detail": {"fields": {"temperature": "spike"}}}],
    }
    assert json.loads(envelope(event(verdict=None)))["verdicts"] == []


def test_an_event_read_back_from_the_log_gets_the_same_envelope_byte_for_byte(tmp_path):
    store = LogStore(tmp_path / "log.db")
    tricky = {"seq": 17, "temperature": 21.5, "note": "é\"\\\n"}
    live = [event(1, tricky), event(2, verdict=None), event(3, verdict=Verdict("m", "2.0.0-β", 0.25, "ok", False))]
    store.append(live, ["17@1", None, None])
    read = store.read(0, 10)
    assert [envelope(e) for e in read] == [envelope(e) for e in live]
    assert [e.verdict for e in read] == [e.verdict for e in live]
    store.close()


@pytest.mark.parametrize("verdict", [
    Verdict("sensor-anomaly", "1.0.0", 0.0123456789, "normal", False),
    Verdict("content \"policy\"", "2.0.0-β", 1e-9, "ok", False),
    Verdict("sensor-anomaly", "1.0.0", 0.93, "spike", True, {"fields": {"temperature": "spike"}}),
])
def test_a_verdict_survives_its_json_exactly(verdict):
    """Live consumers use the verdict the filter made; one reading back uses the stored JSON: the same value."""
    assert Verdict.from_json(verdict.to_json()) == verdict


def test_a_reading_becomes_one_point_tagged_by_device_and_anomaly():
    body, points = telemetry_lines([event()])
    assert points == 1
    assert body == (b"telemetry,anomaly=true,device=dev-0001 temperature=21.5,seq=17i,"
                    b"anomaly_score=0.93 1764322800123000042\n")


def test_two_readings_in_the_same_millisecond_get_distinct_timestamps_and_a_rewrite_the_same_one():
    a, b = telemetry_lines([event(5, verdict=None)])[0], telemetry_lines([event(6, verdict=None)])[0]
    ts_a, ts_b = int(a.split()[-1]), int(b.split()[-1])
    assert ts_a // 1_000_000 == ts_b // 1_000_000 == 1_764_322_800_123
    assert ts_a != ts_b
    assert telemetry_lines([event(5, verdict=None)])[0] == a
    assert b"anomaly=false" in a


def test_only_readings_become_points():
    post = Event(7, "0" * 28, "users/bob", "post", 1, {"text": "hi"}, b'{"text":"hi"}', None)
    assert telemetry_lines([post]) == (b"", 0)


def test_an_alert_reading_names_its_episode_in_its_point():
    start = Verdict("sensor-anomaly", "2.1.0", 0.97, "anomaly", True, {"episode": "start"})
    body, _ = telemetry_lines([event(verdict=start)])
    assert b'anomaly_score=0.97,anomaly_episode="start" ' in body
    assert b"anomaly_episode" not in telemetry_lines([event()])[0]  # flagged, but inside an episode


def test_fields_the_fast_path_leaves_to_the_general_encoder_are_written_as_it_writes_them():
    cases = [
        ({"temp C": 21.5}, b"temp\\ C=21.5,anomaly_score=0.93"),  # escaped
        ({"count": 3}, b"count=3i,anomaly_score=0.93"),  # an integer
        ({"t": float("nan"), "h": 1.0}, b"h=1.0,anomaly_score=0.93"),  # not storable: left out
        ({"anomaly_score": 5.0}, b"anomaly_score=0.93"),  # the gateway's own field wins
    ]
    for payload, fields in cases:
        body, points = telemetry_lines([event(payload=payload)])
        assert points == 1
        assert body == b"telemetry,anomaly=true,device=dev-0001 " + fields + b" 1764322800123000042\n", payload


_NAMES = st.sampled_from(["temp", "hum", "vib", "ts", "a b", "x,y", "anomaly_score", "anomaly_episode", "é"])
_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**64, 2**64), st.text(max_size=5),
                    st.booleans())
_VERDICTS = st.one_of(st.none(), st.builds(
    Verdict, st.just("sensor-anomaly"), st.just("2.3.1"), st.floats(allow_nan=True), st.sampled_from(["normal", "spike"]),
    st.booleans(), st.one_of(st.none(), st.just({"episode": "start"}), st.just({"fields": {"temp": "spike"}}))))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.dictionaries(_NAMES, _VALUES, max_size=5), st.one_of(st.none(), st.integers(0, 2**63 - 1)),
                          _VERDICTS), min_size=1, max_size=6))
def test_every_reading_is_the_line_the_general_encoder_makes_of_it(readings):
    """Readings are written on a fast path when plain; whatever they hold, the lines are the encoder's own."""
    events = [Event(i, "0" * 28, "devices/dev-0001", "telemetry", 1_764_322_800_123,
                    payload if seq is None else {"seq": seq, **payload}, b"{}", verdict)
              for i, (payload, seq, verdict) in enumerate(readings, start=1)]
    expected = []
    for e in events:
        fields = [(k, v) for k, v in e.payload.items() if k not in ("seq", "ts")]
        if "seq" in e.payload:
            fields.append(("seq", e.payload["seq"]))
        tags = (("anomaly", "true" if e.verdict is not None and e.verdict.flagged else "false"), ("device", "dev-0001"))
        if e.verdict is not None:
            fields.append(("anomaly_score", e.verdict.score))
            if e.verdict.detail is not None and "episode" in e.verdict.detail:
                fields.append(("anomaly_episode", e.verdict.detail["episode"]))
        line = encode_line("telemetry", tags, fields, e.ts_ms * 1_000_000 + e.offset % 1_000_000)
        if line is not None:
            expected.append(line)
    body, points = telemetry_lines(events)
    assert points == len(expected)
    assert body == "".join(line + "\n" for line in expected).encode("utf-8", "replace")


def test_a_new_post_gets_a_zero_snapshot_at_its_log_time_as_the_baseline_of_its_increases():
    from gateway.fanout.engagement import Counts
    from gateway.fanout.stats import points
    from gateway.sinks.lineprotocol import encode

    sponsored = Counts("019ac9e3a1f40000a1b2c3d4e5f6", 3, 1, 0, 40, 100_000, "alice", "acme")
    older = Counts("019ac9e3a1f00000a1b2c3d4e5f6", 5, 0, 1, 9, 0, "bob", None)
    born = {sponsored.event_id: 1_764_322_800_123_000_000}
    lines = encode(points([sponsored, older], 1_764_322_805_000_000_000, born)).decode().splitlines()
    assert lines == [
        "engagement,author=alice,event=019ac9e3a1f40000a1b2c3d4e5f6 likes=0i,reposts=0i,replies=0i,impressions=0i "
        "1764322800123000000",
        "revenue,advertiser=acme,author=alice,event=019ac9e3a1f40000a1b2c3d4e5f6 revenue=0.0,impressions=0i "
        "1764322800123000000",
        "engagement,author=alice,event=019ac9e3a1f40000a1b2c3d4e5f6 likes=3i,reposts=1i,replies=0i,impressions=40i "
        "1764322805000000000",
        "revenue,advertiser=acme,author=alice,event=019ac9e3a1f40000a1b2c3d4e5f6 revenue=0.1,impressions=40i "
        "1764322805000000000",
        "engagement,author=bob,event=019ac9e3a1f00000a1b2c3d4e5f6 likes=5i,reposts=0i,replies=1i,impressions=9i "
        "1764322805000000000",
    ]
