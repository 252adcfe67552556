"""A health endpoint on loopback for systemd, monitors and load balancers: `GET /health` and `GET /status`.

`/health` answers 200 with `ok` while the gateway is connected to the broker and its stages run, and 503 with the
reason otherwise; `/status` answers the same JSON as `gateway status`. A tiny HTTP/1.0 responder on asyncio streams:
two fixed routes do not need a web framework, and reading is bounded so a misbehaving client cannot hold memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096


class HealthServer:
    def __init__(self, listen: str, status: Callable[[], dict[str, object]],
                 problem: Callable[[], str | None]) -> None:
        host, _, port = listen.rpartition(":")
        self._host, self._port = host, int(port)
        self._status = status
        self._problem = problem
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
            line = await asyncio.wait_for(reader.readline(), 5)
            parts = line[:MAX_REQUEST_BYTES].decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 and parts[0] == "GET" else ""
            if path == "/health":
                problem = self._problem()
                code, body = (200, b"ok\n") if problem is None else (503, f"{problem}\n".encode())
            elif path == "/status":
                code, body = 200, json.dumps(self._status(), sort_keys=True).encode()
            else:
                code, body = 404, b"try /health or /status\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
            writer.write(f"HTTP/1.0 {code} {reason}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, UnicodeError):
            pass
        finally:
            writer.close()
