"""A health endpoint on loopback for systemd, monitors, load balancers and Prometheus: `GET /health`, `GET /status`,
`GET /metrics` and the web view.

`/health` answers 200 with `ok` while the gateway is connected to the broker and its stages run, and 503 with the
reason otherwise; `/status` answers the same JSON as `gateway status`; `/metrics` the self-metrics in the Prometheus
text format (ops/prometheus.py); `/web/` is the web view (ops/static.py). A tiny HTTP/1.0 responder on asyncio
streams: a few fixed routes do not need a web framework, and reading is bounded so a misbehaving client cannot hold
memory: the request line and the headers together at most MAX_REQUEST_BYTES, all within REQUEST_TIMEOUT seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

from gateway.ops.static import StaticFiles

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192  # the request line and the headers together; a browser sends about 600 bytes
REQUEST_TIMEOUT = 5.0
TEXT = (("Content-Type", "text/plain; charset=utf-8"),)
REASONS = {200: "OK", 308: "Permanent Redirect", 404: "Not Found", 431: "Request Header Fields Too Large",
           503: "Service Unavailable"}


class HealthServer:
    def __init__(self, listen: str, status: Callable[[], dict[str, object]],
                 problem: Callable[[], str | None], metrics: tuple[Callable[[], bytes], str] | None = None,
                 static: StaticFiles | None = None) -> None:
        """`metrics`: what renders the `/metrics` body, and its content type; None: no `/metrics`. `static`: the
        web view's files; None: no `/web/`."""
        host, _, port = listen.rpartition(":")
        self._host, self._port = host, int(port)
        self._status = status
        self._problem = problem
        self._metrics = metrics
        self._static = static
        self._server: asyncio.base_events.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("health endpoint on http://%s:%d/health", self._host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(_read_head(reader), REQUEST_TIMEOUT)
            headers: tuple[tuple[str, str], ...] = ()
            if head is None:
                code, body, headers = 431, b"request too large\n", TEXT
            else:
                parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
                path = parts[1].partition("?")[0] if len(parts) >= 2 and parts[0] == "GET" else ""
                if path == "/health":
                    problem = self._problem()
                    code, body = (200, b"ok\n") if problem is None else (503, f"{problem}\n".encode())
                    headers = TEXT
                elif path == "/status":
                    code, body = 200, json.dumps(self._status(), sort_keys=True).encode()
                    headers = (("Content-Type", "application/json"),)
                elif path == "/metrics" and self._metrics is not None:
                    render, content_type = self._metrics
                    code, body, headers = 200, render(), (("Content-Type", content_type),)
                elif self._static is not None and (static := self._static.answer(path)) is not None:
                    code, body, headers = static.code, static.body, static.headers
                else:
                    code, body, headers = 404, b"try /health, /status, /metrics or /web/\n", TEXT
            extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
            writer.write(f"HTTP/1.0 {code} {REASONS[code]}\r\nContent-Length: {len(body)}\r\n{extra}"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, UnicodeError):
            pass
        finally:
            writer.close()


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The request line and headers, up to the blank line; None when they exceed MAX_REQUEST_BYTES.

    Read to the end, not just the first line: closing a socket with unread bytes makes the kernel answer with a
    reset, and a browser may then lose the response it was sent.
    """
    head = b""
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            return None
        head += line
        if len(head) > MAX_REQUEST_BYTES:
            return None
        if line in (b"\r\n", b"\n"):
            return head
