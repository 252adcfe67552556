"""`firmware-sim chaos` without a broker: the report's arithmetic, the verdict, the refusals of a command line
that lacks what its faults need, and the hostile messages against the gateway's own parsers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from firmware_sim.chaos_faults import hostile_messages
from firmware_sim.chaos_report import (Delivery, FaultRecord, HostileRecord, Report, influx_tally, must_reach_influx,
                                       percentile, tally)
from firmware_sim.cli import main
from tests.recording_sink import SourceUnderTest


def d(at: float, event_id: str = "e") -> Delivery:
    return Delivery(at, event_id)


def test_percentiles_are_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(list(reversed(values)), 1) == 1.0


def test_the_tally_counts_lost_duplicated_refused_and_unanswered_readings():
    sent_at = {("a", 1): 10.0, ("a", 2): 11.0, ("a", 3): 12.0, ("b", 1): 10.0, ("b", 2): 11.0, ("b", 3): 12.0}
    acked = {("a", 1), ("a", 2), ("a", 3), ("b", 1), ("probe", 1)}  # a probe: not a reading of the run
    refused = {("b", 2)}
    deliveries = {
        ("a", 1): [d(10.010, "x1"), d(10.500, "x1")],  # delivered twice with the same id: a redelivery
        ("a", 2): [d(11.020, "x2"), d(11.030, "y2")],  # under two ids: the reading was logged twice
        ("b", 3): [d(12.040, "x3")],  # delivered though the PUBACK never came back
        ("probe", 1): [d(9.0)],
        ("b", 1): [],
    }
    t = tally(sent_at, acked, refused, deliveries)
    assert (t.sent, t.acknowledged, t.refused, t.unacknowledged) == (6, 4, 1, 1)
    assert (t.delivered, t.delivered_unacknowledged) == (3, 1)
    assert t.lost == 2 and t.lost_examples == (("a", 3), ("b", 1))
    assert (t.duplicates, t.relogged) == (2, 1)
    # Latency from the first publish to the first delivery: 10, 20 and 40 ms.
    assert (t.latency_p50_ms, t.latency_p99_ms, t.latency_max_ms) == (20.0, 40.0, 40.0)
    assert t.as_dict()["lost_examples"] == ["a#3", "b#1"]


def test_influxdb_must_hold_every_acknowledged_or_delivered_reading_once():
    sent_at = {("a", 1): 0.0, ("a", 2): 0.0, ("a", 3): 0.0, ("a", 4): 0.0}
    must = must_reach_influx({("a", 1), ("a", 2), ("x", 9)}, {("a", 3): [d(1.0)], ("a", 4): []}, sent_at)
    assert must == {("a", 1), ("a", 2), ("a", 3)}
    record = influx_tally(must, {("a", 1): 1, ("a", 2): 3, ("z", 1): 2})
    assert (record.expected, record.present, record.missing, record.duplicated) == (3, 2, 1, 2)


def report(lost: int = 0, **kwargs: object) -> Report:
    sent_at = {("a", i): 0.0 for i in range(10)}
    deliveries = {("a", i): [d(0.005)] for i in range(10 - lost)}
    return Report("chaos-test-", "127.0.0.1:1883", 1, 100.0, 10.0, 5.0, tally(sent_at, set(sent_at), set(), deliveries),
                  **kwargs)  # type: ignore[arg-type]


def test_the_verdict_passes_only_when_nothing_acknowledged_was_lost():
    ok = report(faults=(FaultRecord("hostile", 2, 0, ("21 hostile messages published",)),),
                hostile=HostileRecord(42, 40, {"non_finite": 6}))
    assert ok.passed and ok.as_dict()["result"] == "pass"
    text = ok.text()
    assert "lost           0" in text and text.endswith("result         PASS")
    assert "40 seen of 42" in text

    bad = report(lost=3)
    assert not bad.passed
    assert bad.failures() == ["3 acknowledged readings never reached the follower within 5s after the last publish"]
    assert "FAIL: 3 acknowledged" in bad.text()
    doc = json.loads(json.dumps(bad.as_dict()))
    assert doc["result"] == "fail" and doc["lost"] == 3 and len(doc["lost_examples"]) == 3


def test_influxdb_gaps_and_duplicates_and_failed_injections_fail_the_run():
    assert not report(influx=influx_tally({("a", 1)}, {})).passed
    assert not report(influx=influx_tally({("a", 1)}, {("a", 1): 2})).passed
    assert report(influx=influx_tally({("a", 1)}, {("a", 1): 1})).passed
    assert not report(problems=("kill-gateway: 1 injection failed (see its notes)",)).passed


def test_an_empty_run_fails():
    empty = Report("p-", "b:1", 1, 1.0, 1.0, 1.0, tally({}, set(), set(), {}))
    assert empty.failures() == ["nothing was sent"]


@pytest.mark.parametrize("args, needs", [
    (["--faults", "kill-gateway"], "kill-gateway needs --gateway-data-dir"),
    (["--faults", "term-gateway", "--gateway-data-dir", "/tmp"], "term-gateway needs --gateway-data-dir"),
    (["--faults", "pause-broker"], "pause-broker needs --broker-pid"),
    (["--faults", "restart-broker"], "restart-broker needs --broker-restart"),
    (["--faults", "influx-outage", "--influx-stop", "x", "--influx-start", "y"], "influx-outage needs"),
    (["--influx-url", "http://127.0.0.1:8086"], "--influx-url and --influx-db go together"),
    (["--faults", "hostile,flood"], "unknown faults flood"),
    (["--faults", "reconnect", "--duration", "5", "--fault-interval", "10"], "no fault would be injected"),
    (["--prefix", "a/b"], "--prefix 'a/b'"),
])
def test_a_command_line_missing_what_its_faults_need_is_refused_before_anything_runs(args, needs):
    # The broker address points nowhere: a refusal must come before any connection attempt.
    result = CliRunner().invoke(main, ["chaos", "--broker", "127.0.0.1:1", *args])
    assert result.exit_code == 2, result.output
    assert needs in result.output


def test_with_credentials_every_client_of_the_run_needs_an_account_under_a_fixed_prefix(tmp_path: Path):
    creds = tmp_path / "accounts.txt"
    creds.write_text("# id password\nck-0001 pw1\nck-0002 pw2\n")

    def refusal(*args: str) -> str:
        result = CliRunner().invoke(main, ["chaos", "--broker", "127.0.0.1:1", "--credentials", str(creds), *args])
        assert result.exit_code == 2, result.output
        return " ".join(result.output.split())  # click wraps long lines

    assert "--credentials needs --prefix" in refusal("--faults", "reconnect")
    assert "no password for ck-0003, ck-fan" in refusal("--prefix", "ck-", "--devices", "3", "--faults", "reconnect")
    assert "no password for ck-fan, ck-slow" in refusal("--prefix", "ck-", "--devices", "2",
                                                        "--faults", "slow-follower")
    assert "one connection per account" in refusal("--prefix", "ck-", "--devices", "2", "--connections", "1")
    # hostile speaks as a device and a user of its own, and reads the dead letters as an operator
    assert "hostile with --credentials needs --operator" in refusal("--prefix", "ck-", "--devices", "2",
                                                                    "--faults", "hostile")
    assert "no password for ck-fan, ck-bad, ck-troll, ops" in refusal("--prefix", "ck-", "--devices", "2",
                                                                      "--faults", "hostile", "--operator", "ops")


def test_an_operator_account_means_nothing_without_credentials():
    result = CliRunner().invoke(main, ["chaos", "--broker", "127.0.0.1:1", "--operator", "ops"])
    assert result.exit_code == 2 and "--operator goes with --credentials" in result.output


def test_a_run_with_every_account_it_needs_gets_as_far_as_connecting(tmp_path: Path):
    creds = tmp_path / "accounts.txt"
    creds.write_text("".join(f"{a} pw\n" for a in ("ck-0001", "ck-fan", "ck-slow", "ck-bad", "ck-troll", "ops")))
    # The default faults (hostile, reconnect, slow-follower). Nothing listens on port 1, so the run stops as
    # "unreachable" (3), not with a usage error (2).
    result = CliRunner().invoke(main, ["chaos", "--broker", "127.0.0.1:1", "--credentials", str(creds),
                                       "--operator", "ops", "--prefix", "ck-", "--devices", "1", "--no-progress"])
    assert result.exit_code == 3, result.output


def test_every_hostile_message_is_dead_lettered_by_the_gateway_with_the_reason_it_claims(tmp_path: Path):
    source = SourceUnderTest(tmp_path)
    try:
        messages = hostile_messages("chaos-abc123-")
        for topic, payload, reason in messages:
            before = len(source.dead)
            source.handle(topic, payload)
            assert len(source.dead) == before + 1, (topic, payload)
            assert source.dead[-1].reason == reason, (topic, payload[:80], source.dead[-1].message)
        assert source.appended == [] and source.graph.edges() == 0
        assert len({reason for _, _, reason in messages}) >= 12
    finally:
        source.close()
