"""Run the real gateway daemon as a subprocess, the way a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.servers import REPO


class GatewayProcess:
    def __init__(self, data_dir: Path, broker: str, *extra: str, client_id: str = "gw-test",
                 config: Path | None = None) -> None:
        self.data_dir = data_dir
        self.client_id = client_id
        self.argv = [sys.executable, "-m", "gateway.cli", "run", "--broker", broker, "--data-dir", str(data_dir),
                     "--client-id", client_id, "--health", "127.0.0.1:0", *extra]
        if config is not None:
            self.argv += ["--config", str(config)]
        self.log_path = data_dir.parent / f"{data_dir.name}-gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> "GatewayProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "status.json").unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.wait_status(lambda s: s["mqtt_connected"], timeout)
        return self

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.data_dir / "status.json").read_text())
        except (OSError, ValueError):
            return None

    def metric(self, name: str) -> float:
        status = self.status()
        return status["metrics"][name] if status else 0.0

    def wait_status(self, predicate: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.output()}")
            status = self.status()
            if status is not None and predicate(status):
                return status
            time.sleep(0.1)
        raise AssertionError(f"gateway status never matched; last: {self.status()}\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args, "--data-dir", str(self.data_dir)],
                              cwd=REPO, capture_output=True, text=True, timeout=30)
