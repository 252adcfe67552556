"""The sd_notify client: what systemd receives, and silence outside systemd."""

import os
import re
import socket
import subprocess

from gateway.ops.systemd import Notifier
from tests.servers import REPO


def listen(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_readiness_and_status_reach_a_path_socket(tmp_path):
    sock = listen(str(tmp_path / "notify"))
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    n.ready("connecting to 127.0.0.1:1883")
    assert sock.recv(4096) == b"READY=1\nSTATUS=connecting to 127.0.0.1:1883"
    n.stopping()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=shutting down"
    n.close()


def test_an_abstract_socket_name_is_written_with_a_leading_nul():
    name = f"gw-test-{os.getpid()}"
    sock = listen("\0" + name)
    Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_outside_systemd_nothing_is_sent_and_nothing_fails():
    n = Notifier({})
    assert not n.enabled
    n.ready("x")
    n.watchdog()
    assert n.watchdog_seconds is None


def test_the_watchdog_period_applies_only_to_the_process_it_names(tmp_path):
    env = {"NOTIFY_SOCKET": str(tmp_path / "s"), "WATCHDOG_USEC": "4000000"}
    assert Notifier(env).watchdog_seconds == 4.0
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_seconds == 4.0
    assert Notifier({**env, "WATCHDOG_PID": "1"}).watchdog_seconds is None
    assert Notifier({**env, "WATCHDOG_USEC": "soon"}).watchdog_seconds is None


def test_a_vanished_socket_costs_a_warning_not_the_daemon(tmp_path, caplog):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    n.ready("x")
    assert "sd_notify" in caplog.text


UNIT = REPO / "deploy" / "edge-gateway.service"


def directives(path):
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_the_unit_reloads_with_sighup_keeps_the_password_out_of_the_config_and_is_sandboxed():
    unit = directives(UNIT)
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["LoadCredential"] == ["mqtt-password:/etc/edge-gateway/mqtt-password"]
    assert unit["StateDirectory"] == ["edge-gateway"]  # $STATE_DIRECTORY: the data folder by default
    assert unit["CapabilityBoundingSet"] == [""] and unit["SystemCallFilter"] == ["@system-service"]
    assert "MemoryMax" in unit and "RestrictAddressFamilies" in unit
    report = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)], capture_output=True,
                            text=True, timeout=60)
    exposure = re.search(r"Overall exposure level for edge-gateway.service: ([0-9.]+)", report.stdout)
    assert exposure is not None, report.stdout + report.stderr
    assert float(exposure.group(1)) <= 2.0, report.stdout  # systemd's scale: 0 safe ... 10 exposed; 1.7 today
