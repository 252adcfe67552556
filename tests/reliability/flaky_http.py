"""A misbehaving InfluxDB in front of a real one: a stdlib HTTP server on loopback, run in a thread.

Writes (`POST /write`) go through scripted phases, each lasting its time and at least one write (a client backing off
for longer than a phase must still meet every phase), from the first write it sees: answer 500; answer 429 with a
Retry-After; answer slowly (longer than the client's timeout, and the write is then stored anyway, as when a reply
is lost on the way back); then forward every write to the real database. Every other request is always forwarded.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float  # how long it lasts at least (and at least one write); the last phase lasts for ever


class FlakyInflux:
    def __init__(self, upstream: str, phases: list[Phase], slow_seconds: float = 2.0,
                 retry_after: int = 1) -> None:
        self.upstream = upstream  # HOST:PORT of the real InfluxDB
        self.phases = phases
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.answers: dict[str, int] = {p.name: 0 for p in phases}
        self._first_write: float | None = None
        self._index = 0
        self._since = 0.0
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner._forward(self, b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/write"):
                    owner._write(self, body)
                else:
                    owner._forward(self, body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FlakyInflux":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def phase(self) -> str:
        with self._lock:
            if self._first_write is None:
                return self.phases[0].name
            now = time.monotonic()
            while self._index < len(self.phases) - 1:
                current = self.phases[self._index]
                if now - self._since < current.seconds or self.answers[current.name] == 0:
                    break
                self._index += 1
                self._since = now
            return self.phases[self._index].name

    def _write(self, req: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        with self._lock:
            if self._first_write is None:
                self._first_write = self._since = time.monotonic()
        name = self.phase()
        with self._lock:
            self.answers[name] += 1
        if name == "error":
            self._answer(req, 500, b'{"error":"engine: cache maximum memory size exceeded"}')
        elif name == "throttle":
            self._answer(req, 429, b'{"error":"too many requests"}', {"Retry-After": str(self.retry_after)})
        elif name == "slow":
            time.sleep(self.slow_seconds)
            self._forward(req, body)
        else:
            self._forward(req, body)

    def _answer(self, req: http.server.BaseHTTPRequestHandler, status: int, body: bytes,
                headers: dict[str, str] | None = None) -> None:
        try:
            req.send_response(status)
            for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                req.send_header(k, v)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body)
        except OSError:
            pass  # the client gave up waiting (the slow phase): that is the point

    def _forward(self, req: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        host, _, port = self.upstream.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            headers = {k: v for k, v in req.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(req.command, req.path, body=body if req.command == "POST" else None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self._answer(req, resp.status, data, {k: v for k, v in resp.getheaders()
                                                 if k.lower() in ("content-type", "x-influxdb-error")})
        finally:
            conn.close()
