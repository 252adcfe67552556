"""`gateway watch`: how it prints an alert (the envelopes the feeds consumer publishes to alerts/{device}), and what
it says when it cannot watch."""

from __future__ import annotations

import socket

from click.testing import CliRunner

from gateway.cli import main
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


def test_a_broker_that_is_down_is_one_clear_line_not_a_traceback(tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    result = CliRunner().invoke(main, ["watch", "--broker", f"127.0.0.1:{port}", "--follower", "alice",
                                       "--data-dir", str(tmp_path), "--seconds", "1"])
    assert result.exit_code == 1
    assert f"Error: cannot connect to the broker at 127.0.0.1:{port}: [Errno 111] Connection refused" in result.output
    assert "Traceback" not in result.output


def test_watch_never_logs_in_as_the_gateway_itself(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[mqtt]\nusername = "gateway"\n')
    result = CliRunner().invoke(main, ["watch", "--config", str(cfg), "--username", "gateway", "--follower", "x"])
    assert result.exit_code == 2 and "the gateway's own account" in result.output
