"""A private network namespace for a stretch of a test: only a loopback interface, invisible from outside.

mosquitto 2.0.11's websockets listener listens on every interface whatever address it is given (see
deploy/mosquitto-websockets.conf), and a browser test needs that listener. Inside a fresh network namespace "every
interface" is a private loopback, so nothing outside the test can reach it.

Linux keeps the network namespace per thread: `unshare(CLONE_NEWNET)` moves only the calling thread, and processes
and threads it starts afterwards inherit the namespace; sockets stay in the namespace they were made in. So the
test's own thread moves in, starts the broker, the gateway and the browser there and talks to them, and moves back
(`setns`) when the block ends; the rest of the session is untouched. Needs root (CAP_SYS_ADMIN), as CI runs.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from contextlib import contextmanager
from typing import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def available() -> str | None:
    """None when a private network can be made here, else why not."""
    if os.geteuid() != 0:
        return "a private network namespace needs root (CAP_SYS_ADMIN)"
    done = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    return None if done.returncode == 0 else f"unshare --net failed: {done.stderr.strip()}"


@contextmanager
def private_network() -> Iterator[None]:
    """Moves the calling (main) thread into a new network namespace with loopback up; back again on exit.

    Everything started inside must also be stopped inside: a process started here stays in the namespace, and a
    socket made here can only reach addresses in it.
    """
    assert threading.current_thread() is threading.main_thread(), "enter the private network from the main thread"
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True, timeout=10)
            yield
        finally:
            if _libc.setns(original, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back to the test session's network: {os.strerror(err)}")
    finally:
        os.close(original)
