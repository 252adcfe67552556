"""What followers and dashboards get: envelope, topics, and the point of each reading."""

import json
from dataclasses import replace

import pytest

from gateway.event import Event, Ingested, Verdict
from gateway.ingest_log import IngestLog
from gateway.fanout import alert_topic, envelope, feed_topic
from gateway.pipeline import telemetry_point
from gateway.sinks.lineprotocol import encode

EVENT = Event(offset=1_000_042, id="019ac9e3a1f40000a1b2c3d4e5f6", source="devices/dev-0001", kind="telemetry",
              ts_ms=1_764_322_800_123, payload={"seq": 17, "ts": 1_764_322_800_123, "temperature": 21.5})
VERDICT = Verdict("sensor-anomaly", "1.0.0", 0.93, "spike", True, {"fields": {"temperature": "spike"}})


def test_each_follower_has_its_own_feed_topic_and_alerts_go_by_device():
    assert feed_topic("alice", EVENT) == "feeds/alice/devices/dev-0001/telemetry"
    assert alert_topic(EVENT) == "alerts/dev-0001"


def test_the_envelope_carries_the_original_payload_and_the_verdicts():
    doc = json.loads(envelope(EVENT, [VERDICT]))
    assert doc == {
        "id": EVENT.id, "offset": 1_000_042, "source": "devices/dev-0001", "kind": "telemetry",
        "ts": 1_764_322_800_123, "payload": {"seq": 17, "ts": 1_764_322_800_123, "temperature": 21.5},
        "verdicts": [{"model": "sensor-anomaly", "version": "1.0.0", "score": 0.93, "label": "spike",
                      "flagged": True, "detail": {"fields": {"temperature": "spike"}}}],
    }


def test_an_event_read_from_the_log_gets_the_same_envelope_with_its_stored_payload_spliced_in(tmp_path):
    log = IngestLog(tmp_path / "log.db")
    item = Ingested(EVENT.id, EVENT.source, EVENT.kind, EVENT.ts_ms, {"seq": 17, "temperature": 21.5, "note": "é\""})
    appended = log.append([item]).events[0]
    (read,) = log.read(0, 10)
    normal = Verdict("sensor-anomaly", "1.0.0", 0.0123456789, "normal", False)
    for event in (appended, read):
        assert event.payload_json
        plain = replace(event, payload_json="")
        for verdicts in ([], [VERDICT], [normal, VERDICT]):
            assert json.loads(envelope(event, verdicts)) == json.loads(envelope(plain, verdicts))
    log.close()


@pytest.mark.parametrize("verdict", [
    Verdict("sensor-anomaly", "1.0.0", 0.0123456789, "normal", False),
    Verdict("sensor-anomaly", "1.0.0", 1.0, "spike", True),
    Verdict("content \"policy\"", "2.0.0-β", 1e-9, "ok", False),
    Verdict("sensor-anomaly", "1.0.0", 0.93, "spike", True, {"fields": {"temperature": "spike"}}),
    Verdict("sensor-anomaly", "1.0.0", float("nan"), "normal", False),
])
def test_a_verdicts_json_is_what_json_dumps_makes_of_its_dict(verdict):
    assert verdict.to_json() == json.dumps(verdict.as_dict(), separators=(",", ":"))


def test_a_payload_the_log_could_not_put_into_an_envelope_is_refused_at_append(tmp_path):
    log = IngestLog(tmp_path / "log.db")
    with pytest.raises(ValueError):
        log.append([Ingested(EVENT.id, EVENT.source, EVENT.kind, EVENT.ts_ms, {"temperature": float("nan")})])
    assert log.read(0, 10) == []
    log.close()


def test_a_reading_becomes_one_point_tagged_by_device_and_anomaly():
    point = telemetry_point(EVENT, VERDICT)
    assert point.measurement == "telemetry"
    assert dict(point.tags) == {"device": "dev-0001", "anomaly": "true"}
    assert dict(point.fields) == {"temperature": 21.5, "seq": 17, "anomaly_score": 0.93}
    assert encode([point]) == (b"telemetry,anomaly=true,device=dev-0001 temperature=21.5,seq=17i,"
                               b"anomaly_score=0.93 1764322800123000042\n")


def test_two_readings_in_the_same_millisecond_get_distinct_timestamps_and_a_rewrite_the_same_one():
    other = Event(EVENT.offset + 1, "x", EVENT.source, EVENT.kind, EVENT.ts_ms, {"temperature": 1.0})
    a, b = telemetry_point(EVENT, None), telemetry_point(other, None)
    assert a.ts_ns // 1_000_000 == b.ts_ns // 1_000_000 == EVENT.ts_ms
    assert a.ts_ns != b.ts_ns
    assert telemetry_point(EVENT, None) == a
    assert dict(a.tags)["anomaly"] == "false"
