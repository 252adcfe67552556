"""Out of disk: the log reaches `storage.max_log_bytes` with a consumer behind (InfluxDB down: nothing it has not
written may be trimmed), or the data folder's filesystem is really full (ENOSPC on a 2 MiB tmpfs). The gateway must
hold back (stop acknowledging, so the broker keeps the data), say so loudly, and deliver everything once space
returns: a bigger budget, the slow consumer catching up, or the disk."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.reliability.harness import (Fleet, account, assert_nothing_acknowledged_was_lost, follow_fleet, follower,
                                       uid, wait_until, write_config)

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def stalls(gw, metric: str, seconds: float) -> bool:
    """True when `metric` did not move for `seconds` (while the load is still running). The metrics come from the
    status file, rewritten about once a second, so `seconds` must span at least two rewrites."""
    before = gw.metric(metric)
    time.sleep(seconds)
    return gw.metric(metric) == before


def moves(gw, metric: str, within: float) -> bool:
    """True as soon as `metric` changes; False when it did not within `within` seconds. (A fixed window of one
    second could fall between two rewrites of the status file and see no change where there was one.)"""
    before = gw.metric(metric)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if gw.metric(metric) != before:
            return True
    return False


def test_the_log_budget_stops_acknowledgements_and_a_bigger_budget_delivers_everything(
        mosquitto, private_influxdb, make_gateway, tmp_path):
    influx = private_influxdb
    influx.stop()  # its consumer falls behind: the log keeps every reading for it
    fleet, db = Fleet(uid("lgb") + "-", devices=10), uid("rel_")
    small = {"storage": {"max_log_bytes": 1_500_000}, "influx": {"timeout": 2.0}}
    gw = make_gateway(mosquitto.address, influx.url, db, config=small)
    follow_fleet(gw, fleet.prefix + "fan", fleet)
    fan = follower(mosquitto.address, fleet.prefix + "fan")
    gw.start()
    load = fleet.start(mosquitto.address, rate=600, duration=14, drain_timeout=40, log=tmp_path / "sim.log")

    gw.wait_status(lambda s: s["metrics"]["backpressure_waits"] >= 1, timeout=30)
    assert stalls(gw, "appended", 2.5), "nothing may be logged (nor acknowledged) over the log's disk budget"
    assert load.running()
    assert "disk budget reached" in gw.output()
    held = gw.metric("appended")

    write_config(tmp_path / "gw.toml", {"storage": {"max_log_bytes": 256 << 20}, "influx": {"timeout": 2.0}})
    t0 = time.monotonic()
    assert gw.terminate(timeout=30) == 0
    assert time.monotonic() - t0 < 20, "SIGTERM while over budget must still meet the shutdown deadline"
    gw.start()
    summary = load.wait()
    influx.start()
    acc = account("log budget", [fleet], {"fan": fan}, (influx, db))
    assert held < summary["sent"]
    assert_nothing_acknowledged_was_lost(acc)
    fan.close()


def test_a_full_log_waiting_for_influxdb_takes_events_again_once_it_caught_up(
        mosquitto, private_influxdb, make_gateway, tmp_path):
    influx = private_influxdb
    influx.stop()
    fleet, db = Fleet(uid("obx") + "-", devices=10), uid("rel_")
    gw = make_gateway(mosquitto.address, influx.url, db, config={"storage": {"max_log_bytes": 1_500_000},
                                                                "influx": {"timeout": 2.0}})
    follow_fleet(gw, fleet.prefix + "fan", fleet)
    fan = follower(mosquitto.address, fleet.prefix + "fan")
    gw.start()
    load = fleet.start(mosquitto.address, rate=600, duration=20, drain_timeout=40, log=tmp_path / "sim.log")

    gw.wait_status(lambda s: s["metrics"]["backpressure_waits"] >= 1, timeout=30)
    assert stalls(gw, "appended", 2.5), "over the budget with InfluxDB behind, nothing is acknowledged"
    assert load.running()
    status = gw.status()
    assert status is not None and status["metrics"]["influx_lag"] > 0 and status["metrics"]["feeds_lag"] == 0
    assert "disk budget reached" in gw.output()
    assert gw.metric("write_dropped") == 0

    influx.start()  # InfluxDB catches up, the log is trimmed behind it, and events are taken again
    load.wait()
    gw.wait_status(lambda s: s["metrics"]["influx_lag"] == 0 and s["metrics"]["committed"] >= fleet.sent,
                   timeout=60)
    acc = account("log budget, InfluxDB back", [fleet], {"fan": fan}, (influx, db))
    assert gw.metric("write_dropped") == 0
    assert_nothing_acknowledged_was_lost(acc)
    fan.close()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs (root only); grown with `remount,size=` when the test gives space back; always unmounted."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_really_full_disk_stops_acknowledgements_and_space_returning_delivers_everything(
        mosquitto, influxdb, make_gateway, tiny_disk, tmp_path):
    fleet, db = Fleet(uid("nospc") + "-", devices=10), uid("rel_")
    gw = make_gateway(mosquitto.address, influxdb.url, db)
    gw.data_dir = tiny_disk / "gw"  # the gateway's files on the tiny filesystem
    gw.argv[gw.argv.index("--data-dir") + 1] = str(gw.data_dir)
    gw.log_path = tmp_path / "nospc-gateway.log"  # its own output stays off the full disk
    follow_fleet(gw, fleet.prefix + "fan", fleet)
    fan = follower(mosquitto.address, fleet.prefix + "fan")
    gw.start()
    load = fleet.start(mosquitto.address, rate=600, duration=14, drain_timeout=40, log=tmp_path / "sim.log")

    # status.json cannot be rewritten on a full disk either: read the gateway's own output.
    wait_until(lambda: "log append failed" in gw.output(), timeout=25, what="the log append to fail")
    assert gw.proc is not None and gw.proc.poll() is None, f"the gateway died on ENOSPC:\n{gw.output()[-2000:]}"
    time.sleep(2.0)

    subprocess.run(["mount", "-o", "remount,size=256m", str(tiny_disk)], check=True)
    load.wait()
    acc = account("ENOSPC on tmpfs", [fleet], {"fan": fan}, (influxdb, db), timeout=25)
    status = gw.status() or {"metrics": {}}
    print(json.dumps({k: status["metrics"].get(k) for k in (
        "received", "appended", "committed", "storage_errors", "log_pending", "mqtt_in_flight", "log_lag",
        "feeds_lag", "influx_lag", "written")}))
    assert gw.proc.poll() is None, f"the gateway died after ENOSPC:\n{gw.output()[-2000:]}"
    assert_nothing_acknowledged_was_lost(acc)
    fan.close()
