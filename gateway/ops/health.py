"""A health endpoint on loopback for systemd, monitors, load balancers and Prometheus: `GET /health`, `GET /status`
and `GET /metrics`.

`/health` answers 200 with `ok` while the gateway is connected to the broker and its stages run, and 503 with the
reason otherwise; `/status` answers the same JSON as `gateway status`; `/metrics` the self-metrics in the Prometheus
text format (gateway/ops/prometheus.py). A tiny HTTP/1.0 responder on asyncio streams: three fixed routes do not
need a web framework, and reading is bounded so a misbehaving client cannot hold memory: the request line and the
headers together at most MAX_REQUEST_BYTES, all within READ_TIMEOUT seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096
READ_TIMEOUT = 5.0


class HealthServer:
    def __init__(self, listen: str, status: Callable[[], dict[str, object]],
                 problem: Callable[[], str | None],
                 metrics: tuple[Callable[[], bytes], str] | None = None) -> None:
        """`metrics`: what renders the `/metrics` body, and its content type; None: no `/metrics`."""
        host, _, port = listen.rpartition(":")
        self._host, self._port = host, int(port)
        self._status = status
        self._problem = problem
        self._metrics = metrics
        self._server: asyncio.base_events.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        # The stream's limit bounds one line; _read_request bounds the lines together.
        self._server = await asyncio.start_server(self._serve, self._host, self._port, limit=MAX_REQUEST_BYTES)
        log.info("health endpoint on http://%s:%d/health", self._host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            path = await asyncio.wait_for(self._read_request(reader), READ_TIMEOUT)
            content_type = "text/plain; charset=utf-8"
            if path == "/health":
                problem = self._problem()
                code, body = (200, b"ok\n") if problem is None else (503, f"{problem}\n".encode())
            elif path == "/status":
                code, body = 200, json.dumps(self._status(), sort_keys=True).encode()
                content_type = "application/json"
            elif path == "/metrics" and self._metrics is not None:
                render, content_type = self._metrics
                code, body = 200, render()
            elif path is None:
                code, body = 431, b"request too large\n"
            else:
                code, body = 404, b"try /health, /status or /metrics\n"
            reason = {200: "OK", 404: "Not Found", 431: "Request Header Fields Too Large",
                      503: "Service Unavailable"}[code]
            writer.write(f"HTTP/1.0 {code} {reason}\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, UnicodeError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> str | None:
        """The path of a GET ("" for anything else), after reading the headers up to their blank line, so that the
        answer does not race unread request bytes (closing a socket with unread input resets the connection).
        None when the request is larger than MAX_REQUEST_BYTES."""
        total = 0
        first: bytes | None = None
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # a line longer than the stream's limit
                return None
            total += len(line)
            if total > MAX_REQUEST_BYTES:
                return None
            if first is None:
                first = line
            if line in (b"\r\n", b"\n", b""):
                break
        assert first is not None
        parts = first.decode("latin-1").split()
        return parts[1].partition("?")[0] if len(parts) >= 2 and parts[0] == "GET" else ""
