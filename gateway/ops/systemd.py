"""systemd's notify protocol (sd_notify): readiness, status text, stopping, and watchdog keep-alives.

Under a `Type=notify` unit systemd passes a datagram socket in $NOTIFY_SOCKET and, with `WatchdogSec=`, the
expected keep-alive period in $WATCHDOG_USEC. The protocol is one `KEY=value` line per datagram (see
sd_notify(3)); it is small enough that a dependency for it would be more code to trust than these lines.
Outside systemd (no $NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # A leading '@' names a socket in the abstract namespace, written with a leading NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID, when set, names the process the watchdog is for; a child must not ping for its parent.
        mine = not pid or (pid.isdecimal() and int(pid) == os.getpid())
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdecimal() and int(usec) > 0 and mine else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, *lines: str) -> None:
        if not self._address:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # systemd gone or the socket full: the daemon's work matters more than this
            log.warning("sd_notify to %r failed: %s", self._address, exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=shutting down")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
