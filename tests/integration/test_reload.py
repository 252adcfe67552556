"""SIGHUP: the running daemon takes new thresholds, limits, device profiles (and a dialect's topics) and log level
from its config file, without dropping events; says what changed and what needs a restart; and ignores a file that
does not validate."""

from __future__ import annotations

import json
import shutil
import signal
import time
import uuid

import pytest

from tests.gateway_process import GatewayProcess
from tests.servers import REPO
from tests.mqtt_helpers import Collector, publish_all

pytestmark = pytest.mark.integration

PROFILE = """name = "reload-probe"
match = ["probe-*"]
strict = true
[fields.temperature]
unit = "C"
"""


def readings(device: str, n: int, start: int = 0) -> list[tuple[str, bytes]]:
    ts = int(time.time() * 1000)
    return [(f"devices/{device}/telemetry", json.dumps({"seq": start + i, "ts": ts + i, "temperature": 21.0,
                                                        "humidity": 40.0}).encode()) for i in range(n)]


def wait_log(gw: GatewayProcess, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = gw.output()
        if text in out:
            return out
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never logged:\n{gw.output()[-3000:]}")


def test_sighup_applies_limits_profiles_and_thresholds_live_and_names_what_needs_a_restart(mosquitto, tmp_path):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'profiles_dir = "{profiles}"\n')
    device = f"probe-{uuid.uuid4().hex[:6]}"
    gw = GatewayProcess(tmp_path / "gw", mosquitto.address, "--influx-api", "none", config=cfg,
                        client_id=f"gw-{uuid.uuid4().hex[:6]}")
    assert gw.run_cli("follow", "reader", f"devices/{device}").returncode == 0
    gw.start()
    try:
        feed = Collector(mosquitto.address, "feeds/reader/#")
        publish_all(mosquitto.address, readings(device, 5))
        assert feed.wait_count(5)  # no profile, no limit: all pass

        (profiles / "probe.toml").write_text(PROFILE)  # strict: humidity is not a field of it
        cfg.write_text(f'profiles_dir = "{profiles}"\n[limits]\nper_source_rate = 0.5\nper_source_burst = 3\n'
                       '[anomaly]\nthreshold = 0.5\n[log]\nlevel = "debug"\n[mqtt]\nkeepalive = 11\n')
        gw.proc.send_signal(signal.SIGHUP)
        out = wait_log(gw, "SIGHUP: reloaded")
        line = next(x for x in out.splitlines() if "SIGHUP: reloaded" in x)
        for name in ("anomaly.threshold", "limits.per_source_rate", "limits.per_source_burst", "log.level",
                     "device profiles (reload-probe)"):
            assert name in line, line
        assert "take effect only after a restart: mqtt.keepalive" in out
        assert "--broker" not in out and "mqtt.broker" not in line  # the command line still wins, silently

        before = gw.metric("deadlettered")
        publish_all(mosquitto.address, readings(device, 6, start=5))
        status = gw.wait_status(lambda s: s["metrics"]["deadlettered"] >= before + 6)
        assert status["metrics"]["rate_limited"] >= 3  # a burst of 3, then 0.5/s
        assert status["metrics"]["appended"] >= 5  # the first readings are still there
        assert gw.proc.poll() is None
        feed.close()
    finally:
        gw.terminate()


def test_a_dialect_profile_added_or_removed_on_sighup_is_subscribed_or_dropped_live(mosquitto, tmp_path):
    """Copying devices/dialects/tasmota.toml into the profiles folder and reloading subscribes to tele/+/SENSOR on
    the running connection; removing it and reloading unsubscribes. Each Tasmota message is followed, from the same
    publisher, by a reading on the gateway's own topic: once that one is in, the Tasmota one would have been too."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'profiles_dir = "{profiles}"\n')
    plug, probe = f"p{uuid.uuid4().hex[:6]}", f"probe-{uuid.uuid4().hex[:6]}"
    gw = GatewayProcess(tmp_path / "gw", mosquitto.address, "--influx-api", "none", config=cfg,
                        client_id=f"gw-{uuid.uuid4().hex[:6]}")
    assert gw.run_cli("follow", "reader", f"devices/tasmota-{plug}").returncode == 0
    gw.start()
    sensor = json.dumps({"BME280": {"Temperature": 21.5}, "TempUnit": "C"}).encode()

    def tasmota_then_probe(seq: int) -> None:
        before = gw.metric("appended")
        publish_all(mosquitto.address, [(f"tele/{plug}/SENSOR", sensor), *readings(probe, 1, start=seq)])
        gw.wait_status(lambda s: s["metrics"]["appended"] > before)

    try:
        feed = Collector(mosquitto.address, "feeds/reader/#")
        tasmota_then_probe(0)
        assert len(feed.messages) == 0  # not subscribed yet

        shutil.copy(REPO / "devices" / "dialects" / "tasmota.toml", profiles)
        gw.proc.send_signal(signal.SIGHUP)
        out = wait_log(gw, "SIGHUP: reloaded")
        assert "subscriptions (+tele/+/SENSOR)" in out and "after a restart" not in out
        deadline = time.monotonic() + 10  # the SUBSCRIBE goes out after the log line: retry until it took effect
        while len(feed.messages) == 0 and time.monotonic() < deadline:
            tasmota_then_probe(1)
        assert feed.wait_count(1)
        assert feed.messages[0][0] == f"feeds/reader/devices/tasmota-{plug}/telemetry"

        (profiles / "tasmota.toml").unlink()
        gw.proc.send_signal(signal.SIGHUP)
        wait_log(gw, "subscriptions (-tele/+/SENSOR)")
        received = gw.metric("received")
        deadline = time.monotonic() + 10  # the UNSUBSCRIBE, likewise
        while time.monotonic() < deadline:
            tasmota_then_probe(2)
            if gw.metric("received") == received + 1:  # only the probe: tele/+/SENSOR is no longer delivered
                break
            received = gw.metric("received")
        else:
            raise AssertionError("tele/+/SENSOR was still delivered 10 s after the profile was removed")
        assert gw.proc.poll() is None
        feed.close()
    finally:
        gw.terminate()


def test_a_config_that_does_not_validate_on_sighup_changes_nothing(mosquitto, tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("[limits]\nper_source_rate = 0\n")
    device = f"dev-{uuid.uuid4().hex[:6]}"
    gw = GatewayProcess(tmp_path / "gw", mosquitto.address, "--influx-api", "none", config=cfg,
                        client_id=f"gw-{uuid.uuid4().hex[:6]}").start()
    try:
        cfg.write_text("[limits]\nper_source_rate = -1\n")
        gw.proc.send_signal(signal.SIGHUP)
        out = wait_log(gw, "not reloaded, nothing changed")
        assert "limits.per_source_rate = -1" in out
        publish_all(mosquitto.address, readings(device, 20))
        status = gw.wait_status(lambda s: s["metrics"]["appended"] >= 20)
        assert status["metrics"]["rate_limited"] == 0
    finally:
        assert gw.terminate() == 0


def test_without_a_config_file_sighup_does_not_stop_the_daemon(mosquitto, tmp_path):
    gw = GatewayProcess(tmp_path / "gw", mosquitto.address, "--influx-api", "none",
                        client_id=f"gw-{uuid.uuid4().hex[:6]}").start()
    try:
        gw.proc.send_signal(signal.SIGHUP)
        wait_log(gw, "SIGHUP: no config file to reload")
        assert gw.proc.poll() is None
    finally:
        assert gw.terminate() == 0
