"""The README's first command, `scripts/demo`, on a machine where its broker's port is already taken (Debian starts
the system's mosquitto on 1883 when the package is installed): it runs its own broker on a free port, says which,
and the demo's readings reach the follower's live view."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from tests.servers import REPO

pytestmark = pytest.mark.integration


def test_the_demo_moves_to_a_free_port_when_its_port_is_taken_and_says_so(tmp_path):
    holder = socket.socket()  # stands for the system's broker: the port the demo prefers is taken
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    demo_dir = tmp_path / "demo"
    env = {**os.environ, "DEMO_PORT": str(taken), "DEMO_DIR": str(demo_dir), "PYTHONUNBUFFERED": "1"}
    out = open(tmp_path / "demo.out", "wb")
    err = open(tmp_path / "demo.err", "wb")
    # As from a terminal: Ctrl-C's signal at its default. A test run started in the background (nohup ... &, as a CI
    # job may be) has SIGINT ignored, and a shell started with a signal ignored cannot trap it.
    demo = subprocess.Popen([str(REPO / "scripts" / "demo"), "--events", "200", "--devices", "2"], cwd=REPO,
                            env=env, stdout=out, stderr=err, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        summary = demo_dir / "simulator-summary.json"
        deadline = time.monotonic() + 120
        while not (summary.exists() and summary.stat().st_size and b"delivered 200" in
                   (tmp_path / "demo.out").read_bytes()):
            assert demo.poll() is None, (tmp_path / "demo.err").read_text()
            assert time.monotonic() < deadline, (tmp_path / "demo.err").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C in the demo's terminal
        try:
            demo.wait(60)
        except subprocess.TimeoutExpired:
            left = _processes_of(demo_dir)
            for pid in left:  # what the demo started and did not stop, so nothing outlives the test
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"the demo did not stop on Ctrl-C within 60 s; its processes: {left}") from None
        finally:
            out.close()
            err.close()
            holder.close()
        assert not _processes_of(demo_dir), "the demo left processes running"
    said = (tmp_path / "demo.err").read_text()
    port = json.loads(summary.read_text())["broker"].rpartition(":")[2]
    assert f"port {taken} is taken" in said and f"listens on 127.0.0.1:{port}" in said
    assert int(port) != taken
    assert json.loads(summary.read_text())["acknowledged"] == 200  # and the view showed all 200 delivered (above)


def _processes_of(demo_dir) -> dict[int, str]:
    """The processes whose command line names the demo's folder (its broker, gateway, simulator and view)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(demo_dir) in cmdline:
                found[int(entry)] = cmdline
    return found
