"""How `gateway watch` prints an alert: the envelopes the feeds consumer publishes to alerts/{device}."""

from __future__ import annotations

from gateway.ops.watch import alert_line


def envelope(verdict: dict) -> dict:
    return {"source": "devices/dev-0003", "kind": "telemetry", "payload": {"seq": 96, "flow_lpm": 0.0},
            "verdicts": [verdict]}


def test_an_episode_start_names_what_the_fields_did():
    doc = envelope({"model": "sensor-anomaly", "score": 0.934, "label": "dropout", "flagged": True,
                    "detail": {"fields": {"flow_lpm": "dropout"}, "episode": "start"}})
    assert alert_line(doc) == "ALERT start devices/dev-0003 seq=96 dropout score=0.93 fields={'flow_lpm': 'dropout'}"


def test_an_episode_end_is_said_as_such_not_as_a_normal_reading():
    doc = envelope({"model": "sensor-anomaly", "score": 0.14, "label": "normal", "flagged": False,
                    "detail": {"episode": "end"}})
    assert alert_line(doc) == "ALERT end   devices/dev-0003 seq=96"


def test_an_alert_without_a_verdict_still_prints():
    assert alert_line({"source": "devices/x", "payload": {"seq": 1}}) == "ALERT ?     devices/x seq=1 None score=0.00 fields=None"
