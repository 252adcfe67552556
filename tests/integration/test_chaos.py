"""`firmware-sim chaos` against a real mosquitto and the real gateway, run the way a user runs it (a subprocess).

It must pass an installation that keeps its promises while faults are injected (hostile input, dropped
connections, a follower that never reads, kill -9 of the gateway with a restart command), and it must fail, with
exit status 1 and the loss in its report, when the installation really loses readings: a gateway that is killed
and never comes back.

Every process a test starts is stopped by its PID at the end: the gateway the test started, and every gateway the
restart script started (the script appends each PID to a file).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from firmware_sim.chaos_faults import cmdline, process_state
from tests import servers
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.integration


def uid(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def chaos(*args: str, timeout: float = 120.0) -> tuple[int, dict[str, Any], str]:
    """Run `firmware-sim chaos ... --json`; (exit status, the JSON report or {}, stderr)."""
    run = subprocess.run([sys.executable, "-m", "firmware_sim.cli", "chaos", *args, "--json"], cwd=servers.REPO,
                         capture_output=True, text=True, timeout=timeout)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {}
    print(json.dumps({k: report.get(k) for k in ("result", "failures", "sent", "acknowledged", "delivered", "lost",
                                                 "duplicates", "latency_p50_ms", "latency_p99_ms", "faults",
                                                 "hostile", "influx")}))
    return run.returncode, report, run.stderr


@pytest.fixture
def gateway(private_mosquitto: servers.Server, tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """`gateway(*extra)` -> a started gateway on the test's own broker; killed by its PID at the end."""
    made: list[GatewayProcess] = []

    def make(*extra: str, config: str | None = None) -> GatewayProcess:
        path = None
        if config is not None:
            path = tmp_path / "gateway.toml"
            path.write_text(config)
        gw = GatewayProcess(tmp_path / "gw", private_mosquitto.address, *extra, client_id=uid("gw-"), config=path)
        made.append(gw)
        return gw.start()

    yield make
    for gw in made:
        gw.kill()


@pytest.fixture
def restart_script(tmp_path: Path) -> Iterator[Callable[[GatewayProcess], str]]:
    """`restart_script(gw)` -> a shell command that starts the same gateway again in the background, the way
    `systemctl restart` would, and appends its PID to a file; every PID in that file is killed at the end."""
    pids = tmp_path / "restarted.pids"

    def make(gw: GatewayProcess) -> str:
        script = tmp_path / "restart-gateway.sh"
        script.write_text(f"#!/bin/sh\ncd {shlex.quote(str(servers.REPO))}\n"
                          f"PYTHONUNBUFFERED=1 {shlex.join(gw.argv)} >> {shlex.quote(str(gw.log_path))} 2>&1 &\n"
                          f"echo $! >> {shlex.quote(str(pids))}\n")
        script.chmod(0o755)
        return str(script)

    yield make
    for pid in (int(p) for p in pids.read_text().split()) if pids.exists() else ():
        line = cmdline(pid)
        if process_state(pid) == "running" and line is not None and "gateway.cli" in line:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while process_state(pid) == "running" and time.monotonic() < deadline:
                time.sleep(0.05)


def test_hostile_input_dropped_connections_and_a_follower_that_never_reads_lose_nothing(
        private_mosquitto: servers.Server, gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway("--influx-api", "none")
    prefix = uid("chaos-") + "-"
    rc, report, err = chaos("--broker", private_mosquitto.address, "--devices", "5", "--rate", "200",
                            "--duration", "8", "--faults", "hostile,reconnect,slow-follower", "--fault-interval", "2",
                            "--drain-timeout", "20", "--prefix", prefix)
    assert rc == 0, (report, err[-2000:])
    assert report["result"] == "pass" and report["failures"] == []
    assert report["sent"] >= 1500
    assert report["acknowledged"] == report["delivered"] == report["sent"]
    assert report["lost"] == 0
    faults = report["faults"]
    assert faults["hostile"]["injected"] >= 1 and faults["reconnect"]["injected"] >= 1
    assert faults["slow-follower"]["injected"] == 1
    assert all(f["failed"] == 0 for f in faults.values()), faults
    hostile = report["hostile"]
    # Dead letters are QoS 0 and rate-limited (20/s): some may be missing, none may be invented.
    assert 1 <= hostile["deadletters_seen"] <= hostile["sent"]
    status = gw.wait_status(lambda s: s["metrics"]["deadlettered"] >= hostile["sent"], timeout=10)
    assert status["metrics"]["deadlettered"] == hostile["sent"]
    # The run removes its follows when it ends.
    deadline = time.monotonic() + 10
    while gw.run_cli("following", f"{prefix}fan").stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gw.run_cli("following", f"{prefix}fan").stdout.strip() == ""
    assert gw.run_cli("following", f"{prefix}slow").stdout.strip() == ""


def test_kill_9_of_the_gateway_with_a_restart_command_loses_nothing_and_influxdb_has_every_reading_once(
        private_mosquitto: servers.Server, influxdb: servers.HttpServer, gateway: Callable[..., GatewayProcess],
        restart_script: Callable[[GatewayProcess], str]) -> None:
    db = uid("chaos_")
    gw = gateway("--influx-api", "v1", "--influx-url", influxdb.url, "--influx-db", db)
    rc, report, err = chaos("--broker", private_mosquitto.address, "--devices", "5", "--rate", "200",
                            "--duration", "10", "--faults", "kill-gateway", "--fault-interval", "3", "--seed", "4",
                            "--gateway-data-dir", str(gw.data_dir), "--gateway-restart", restart_script(gw),
                            "--drain-timeout", "30", "--influx-url", influxdb.url, "--influx-db", db)
    assert rc == 0, (report, err[-2000:])
    kills = report["faults"]["kill-gateway"]
    assert kills["injected"] >= 2 and kills["failed"] == 0, kills
    assert report["lost"] == 0 and report["acknowledged"] == report["delivered"] == report["sent"] > 0
    influx = report["influx"]
    assert influx["expected"] == report["sent"]
    assert influx["missing"] == 0 and influx["duplicated"] == 0 and influx["error"] is None


def test_a_gateway_that_never_comes_back_fails_the_run_with_the_loss_in_the_report(
        private_mosquitto: servers.Server, gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway("--influx-api", "none")
    rc, report, err = chaos("--broker", private_mosquitto.address, "--devices", "5", "--rate", "200",
                            "--duration", "5", "--faults", "kill-gateway", "--fault-interval", "2",
                            "--gateway-data-dir", str(gw.data_dir), "--gateway-restart", "true",
                            "--gateway-timeout", "3", "--drain-timeout", "3")
    assert rc == 1, (report, err[-2000:])
    assert report["result"] == "fail"
    assert report["acknowledged"] == report["sent"] > 0
    assert report["lost"] > 0 and report["delivered"] + report["lost"] == report["sent"]
    assert report["faults"]["kill-gateway"]["failed"] >= 1
    assert any("never reached the follower" in f for f in report["failures"]), report["failures"]
    assert any("did not come back" in n for n in report["faults"]["kill-gateway"]["notes"])


def test_with_no_gateway_on_the_broker_the_run_stops_at_setup_and_says_why(
        private_mosquitto: servers.Server) -> None:
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "firmware_sim.cli", "chaos", "--broker", private_mosquitto.address,
                          "--devices", "3", "--duration", "5", "--setup-timeout", "2"], cwd=servers.REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 3, run.stderr
    assert "no probe reading" in run.stderr and "is the gateway running" in run.stderr
    assert time.monotonic() - t0 < 20


@pytest.fixture
def broker_restart_script(private_mosquitto: servers.Server, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(a shell command that restarts the test's broker with SIGTERM, waiting for it to exit, and starts it again
    in the background, the pid file it keeps). Every broker it started is killed by its PID at the end."""
    assert private_mosquitto.proc is not None
    pids = tmp_path / "broker.pids"
    pids.write_text(f"{private_mosquitto.proc.pid}\n")
    script = tmp_path / "restart-broker.sh"
    script.write_text(f"""#!/bin/sh
pid=$(tail -n 1 {shlex.quote(str(pids))})
kill -TERM "$pid"
i=0
while [ $i -lt 200 ]; do
    state=$(cut -d' ' -f3 /proc/$pid/stat 2>/dev/null)
    if [ -z "$state" ] || [ "$state" = Z ]; then break; fi
    sleep 0.05
    i=$((i + 1))
done
{shlex.join(private_mosquitto.argv)} >> {shlex.quote(str(private_mosquitto.log_path))} 2>&1 &
echo $! >> {shlex.quote(str(pids))}
""")
    script.chmod(0o755)
    yield str(script), pids
    for pid in [int(p) for p in pids.read_text().split()][1:]:  # the first is the fixture's own, killed by it
        line = cmdline(pid)
        if process_state(pid) == "running" and line is not None and "mosquitto" in line:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while process_state(pid) == "running" and time.monotonic() < deadline:
                time.sleep(0.05)


@pytest.mark.reliability
def test_the_broker_paused_past_the_keepalive_and_restarted_loses_nothing(
        private_mosquitto: servers.Server, gateway: Callable[..., GatewayProcess],
        broker_restart_script: tuple[str, Path]) -> None:
    command, pid_file = broker_restart_script
    gateway("--influx-api", "none", config="[mqtt]\nkeepalive = 2\nreconnect_max = 1.0\n")
    rc, report, err = chaos("--broker", private_mosquitto.address, "--devices", "5", "--rate", "200",
                            "--duration", "12", "--faults", "pause-broker,restart-broker", "--fault-interval", "3",
                            "--broker-pid", str(pid_file), "--pause-seconds", "4", "--broker-restart", command,
                            "--drain-timeout", "30")
    assert rc == 0, (report, err[-2000:])
    faults = report["faults"]
    assert faults["pause-broker"]["injected"] >= 1 and faults["restart-broker"]["injected"] >= 1, faults
    assert all(f["failed"] == 0 for f in faults.values()), faults
    assert report["lost"] == 0 and report["acknowledged"] == report["delivered"] == report["sent"] > 0
