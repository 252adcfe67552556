"""Under systemd (Type=notify, WatchdogSec=): the real daemon says when it is ready, keeps the watchdog fed, and
says when it stops."""

import socket
import time

import pytest

from tests.gateway_process import GatewayProcess


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    yield sock
    sock.close()


def received(sock: socket.socket, seconds: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            lines += sock.recv(4096).decode().split("\n")
        except TimeoutError:
            pass
    return lines


def test_the_daemon_notifies_systemd_of_readiness_watchdog_and_stopping(mosquitto, tmp_path, notify_socket):
    gw = GatewayProcess(tmp_path / "gw", mosquitto.address, "--influx-api", "none").start()
    try:
        lines = received(notify_socket, 3.5)
        assert "READY=1" in lines
        assert lines.count("WATCHDOG=1") >= 2, lines
        assert any(line.startswith("STATUS=log offset") and line.endswith("healthy") for line in lines), lines
        assert gw.terminate() == 0
        assert "STOPPING=1" in received(notify_socket, 1.0)
    finally:
        gw.kill()

