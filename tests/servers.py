"""Start and stop the real servers the integration tests talk to.

Every server gets a free loopback port and its own data folder, and is stopped by the PID this module started, never
by name. Readiness is polled (a TCP connect or an HTTP probe) instead of sleeping a fixed time.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Server:
    """A server process this test session started: restartable, pausable, stopped by its own PID."""

    name: str
    argv: list[str]
    port: int
    data_dir: Path
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        wait_for_port(self.port, timeout, self.proc)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def mosquitto_conf_for_test(port: int, data_dir: Path) -> str:
    """The project's mosquitto.conf with only the port and the persistence folder changed."""
    text = (REPO / "mosquitto.conf").read_text()
    text, n = re.subn(r"(?m)^listener\s+\d+\s+127\.0\.0\.1\s*$", f"listener {port} 127.0.0.1", text)
    assert n == 1, "mosquitto.conf must have exactly one loopback `listener PORT 127.0.0.1` line"
    text, n = re.subn(r"(?m)^persistence_location\s+.*$", f"persistence_location {data_dir}/", text)
    assert n == 1, "mosquitto.conf must set persistence_location"
    return text


def mosquitto(base: Path) -> Server:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    data = base / "mosquitto"
    data.mkdir(parents=True, exist_ok=True)
    conf = data / "mosquitto.conf"
    conf.write_text(mosquitto_conf_for_test(port, data))
    return Server("mosquitto", [exe, "-c", str(conf)], port, data, data / "mosquitto.log", env=dict(os.environ))
