"""Writers that put an encoded line-protocol body into InfluxDB 1.x (`/write`) or the v2 API (`/api/v2/write`).

A writer does one blocking HTTP request per call and turns every failure into one of three decisions; the InfluxDB
sink's writer thread (gateway/sinks/influx.py, the only caller) acts on them:

    RetryableWriteError  keep the batch and try again later (honour retry_after when the server gave one)
    RejectedWriteError   the batch itself is bad: retrying cannot help, move it to the dead letters
    TooLargeError        the request was too big: split it and send the halves

Statuses map as in Telegraf's influxdb_v2 output (plugins/outputs/influxdb_v2/http.go): any 2xx is delivered;
413 splits; 400, 406, 422 and other 4xx drop; 429, 502, 503, 504 throttle (waiting for the larger of our own
backoff and Retry-After, which is capped at 10 minutes and taken as 10 s when unparsable); other 5xx retry.
One deliberate difference: 401, 403 and 404 are retried, not dropped. They say the token, the permissions or
the database/bucket are wrong, not the points; dropping would turn a configuration mistake into data loss, and
the points wait in the log (whose disk budget applies backpressure) until an operator fixes it.

InfluxDB 1.x answers a batch with some bad lines with `400 {"error": "partial write: ... dropped=N"}`: the good
lines ARE stored. That is still a RejectedWriteError (with partial=True), because re-sending gives the same 400.
The drainer bisects a rejected multi-batch body so only the batch holding the bad line is dead-lettered; lines
written twice along the way overwrite themselves (same series, same timestamp), so nothing is duplicated.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import logging
import time
import urllib.parse
from typing import Any, Mapping, Protocol

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 600.0     # seconds; a server asking for more is capped (Telegraf does the same)
UNPARSABLE_RETRY_AFTER = 10.0


class Writer(Protocol):
    """Writes one line-protocol body. Blocking; called from the drainer thread only, never the event loop."""

    def write(self, body: bytes) -> None: ...

    def close(self) -> None: ...


class WriteError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetryableWriteError(WriteError):
    """Nothing was (knowingly) stored; the same body may succeed later. `retry_after` is the server's wish."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class RejectedWriteError(WriteError):
    """The server refused the body for what it contains. `partial`: InfluxDB 1.x stored the lines it could."""

    def __init__(self, message: str, status: int | None = None, partial: bool = False) -> None:
        super().__init__(message, status)
        self.partial = partial


class TooLargeError(WriteError):
    """413: the body is over the server's limit; smaller bodies will go through."""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), capped; None when absent."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            seconds = when.timestamp() - time.time()
        except (TypeError, ValueError):
            seconds = UNPARSABLE_RETRY_AFTER
    if seconds != seconds:  # NaN
        seconds = UNPARSABLE_RETRY_AFTER
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def server_message(body: bytes | str | None, headers: Mapping[str, str] | None = None, limit: int = 500) -> str:
    """The server's own words: `error` (1.x) or `message` (2.x) from a JSON body, else the text, else a header."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
    text = text.strip()
    if text:
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            for key in ("error", "message"):
                if isinstance(doc.get(key), str) and doc[key]:
                    return doc[key][:limit]
        return text[:limit]
    if headers:
        for key in ("X-Influxdb-Error", "X-Influx-Error", "X-Platform-Error-Code"):
            value = headers.get(key)
            if value:
                return value[:limit]
    return ""


def error_for_status(status: int, message: str, retry_after: str | None = None) -> WriteError | None:
    """What a response status means for the batch; None for success."""
    if 200 <= status < 300:
        return None
    text = f"HTTP {status}: {message}" if message else f"HTTP {status}"
    if status == 413:
        return TooLargeError(text, status)
    if status in (401, 403, 404):
        return RetryableWriteError(text, status, parse_retry_after(retry_after))
    if status in (429, 502, 503, 504):
        wait = parse_retry_after(retry_after)
        return RetryableWriteError(text, status, wait)
    if 400 <= status < 500:
        return RejectedWriteError(text, status, partial=message.startswith("partial write"))
    # Other 5xx (and anything unexpected, like a redirect we do not follow): the server may recover.
    return RetryableWriteError(text, status, parse_retry_after(retry_after))


# A request on a kept-alive connection can fail only because the server closed it while idle; that says nothing
# about the server's health, so the writer reconnects and sends once more at once. Writes are idempotent.
_STALE_CONNECTION = (http.client.RemoteDisconnected, http.client.BadStatusLine, BrokenPipeError,
                     ConnectionResetError, ConnectionAbortedError)


class InfluxV1Writer:
    """POST /write?db=..&precision=ns to InfluxDB 1.x over one kept-alive stdlib connection.

    The database is created on first use (and again if a write says it is missing): InfluxDB 1.x answers 404 to
    writes into a database that does not exist, CREATE DATABASE is idempotent, and doing it here means a fresh
    InfluxDB needs no provisioning step before the gateway can write. Without the rights to create it (auth on,
    not an admin) the writer carries on and the 404 on write says what is wrong.

    Not thread-safe: one drainer thread owns it.
    """

    def __init__(self, url: str, database: str, timeout: float, username: str | None = None,
                 password: str | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"InfluxDB url must be http(s)://host[:port][/prefix], got {url!r}")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self.database = database
        self.timeout = timeout
        self._headers: dict[str, str] = {}
        if username is not None:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self._write_path = f"{self._prefix}/write?" + urllib.parse.urlencode({"db": database, "precision": "ns"})
        self._conn: http.client.HTTPConnection | None = None
        self._database_ready = False

    def write(self, body: bytes) -> None:
        if not self._database_ready:
            self._create_database()
        status, headers, data = self._request(self._write_path, body, "text/plain; charset=utf-8")
        message = server_message(data, headers)
        if status == 404 and "database not found" in message:
            # Dropped while we were running (or never created for lack of rights): create it and try once more.
            self._create_database()
            status, headers, data = self._request(self._write_path, body, "text/plain; charset=utf-8")
            message = server_message(data, headers)
        error = error_for_status(status, message, headers.get("Retry-After"))
        if error is not None:
            raise error

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _create_database(self) -> None:
        name = '"' + self.database.replace("\\", "\\\\").replace('"', '\\"') + '"'
        form = urllib.parse.urlencode({"q": f"CREATE DATABASE {name}"}).encode()
        status, headers, data = self._request(f"{self._prefix}/query", form, "application/x-www-form-urlencoded")
        if status in (401, 403):
            log.warning("cannot create InfluxDB database %r (HTTP %s: %s); writing anyway", self.database, status,
                        server_message(data, headers))
        else:
            error = error_for_status(status, server_message(data, headers), headers.get("Retry-After"))
            if error is not None:
                # Whatever stops CREATE DATABASE would stop the write too; report it as a write failure, but
                # never as a rejection of the batch, which was not even sent.
                raise RetryableWriteError(f"CREATE DATABASE failed: {error}", status,
                                          getattr(error, "retry_after", None))
        self._database_ready = True

    def _connect(self) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def _request(self, path: str, body: bytes, content_type: str) -> tuple[int, Mapping[str, str], bytes]:
        headers = {"Content-Type": content_type, **self._headers}
        for attempt in (1, 2):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = self._connect()
            try:
                self._conn.request("POST", path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.close()
                return resp.status, resp.headers, data
            except _STALE_CONNECTION as exc:
                self.close()
                if reused and attempt == 1:
                    continue
                raise RetryableWriteError(f"connection to InfluxDB lost: {exc!r}") from exc
            except TimeoutError as exc:
                self.close()
                raise RetryableWriteError(f"InfluxDB did not answer within {self.timeout}s") from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise RetryableWriteError(f"cannot reach InfluxDB: {exc!r}") from exc
        raise AssertionError("unreachable")


class InfluxV2Writer:
    """Writes through influxdb-client's WriteApi (SYNCHRONOUS) to `/api/v2/write` with precision ns.

    The body is already line protocol and is passed through as bytes. influxdb-client's own retrying exists only
    in its batching mode; here `retries=False` also keeps urllib3 from retrying or following redirects, so
    every failure reaches us at once and the sink decides, with its own backoff and its own record of it.
    """

    def __init__(self, url: str, org: str, bucket: str, token: str, timeout: float) -> None:
        # Imported here so the v1 path (and the tests of pure logic) never pays for influxdb-client's imports.
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self.org = org
        self.bucket = bucket
        self.timeout = timeout
        self._client = InfluxDBClient(url=url, token=token, org=org, timeout=int(timeout * 1000), retries=False)
        self._api = self._client.write_api(write_options=SYNCHRONOUS)

    def write(self, body: bytes) -> None:
        import urllib3
        from influxdb_client import WritePrecision
        from influxdb_client.rest import ApiException

        try:
            self._api.write(bucket=self.bucket, org=self.org, record=body, write_precision=WritePrecision.NS)
        except ApiException as exc:
            headers: Mapping[str, str] = exc.headers or {}
            status = int(exc.status or 0)
            if status == 0:  # the client's way of saying TLS failed before any response
                raise RetryableWriteError(f"cannot reach InfluxDB: {exc.reason}") from exc
            error = error_for_status(status, server_message(_as_bytes(exc.body), headers),
                                     headers.get("Retry-After"))
            raise (error or RetryableWriteError(f"unexpected answer {status}", status)) from exc
        except urllib3.exceptions.NewConnectionError as exc:  # checked first: urllib3 files it under timeouts
            raise RetryableWriteError(f"cannot reach InfluxDB: {exc}") from exc
        except urllib3.exceptions.TimeoutError as exc:
            raise RetryableWriteError(f"InfluxDB did not answer within {self.timeout}s: {exc}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise RetryableWriteError(f"cannot reach InfluxDB: {exc!r}") from exc

    def close(self) -> None:
        self._api.close()
        self._client.close()


def _as_bytes(body: Any) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    return str(body).encode("utf-8", "replace")
