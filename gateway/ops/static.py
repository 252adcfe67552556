"""The web view's files (gateway/web/), served by the health listener under `/web/`.

The files are listed and read once, when the gateway starts: a request names an entry of that table or gets a 404.
No part of a request ever reaches the file system, so there is no path traversal, no symlink or device file to
follow and no directory listing, whatever the request says. Only files with a known type are taken (the type is
the table below, never guessed from the content, and `nosniff` tells the browser not to guess either), each up to
MAX_FILE_BYTES, all together up to MAX_TOTAL_BYTES: the view is a few small files and one library (about 350 KB).

Every answer carries a Content-Security-Policy that allows scripts and styles from this listener only and
connections to it and to WebSocket brokers: a post's text that slipped into the page as HTML could still not run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
PREFIX = "/web/"
MAX_FILE_BYTES = 1 << 20
MAX_TOTAL_BYTES = 4 << 20

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
}

SECURITY_HEADERS = (
    # worker-src blob:: MQTT.js runs its keepalive timer in a worker it makes from a blob, so that a page in a
    # background tab, whose timers the browser slows to one a minute, still pings the broker in time.
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self' ws: wss:; worker-src blob:; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    # The files change only with the gateway; no-cache still lets the browser revalidate after an upgrade.
    ("Cache-Control", "no-cache"),
)


@dataclass(frozen=True)
class Response:
    code: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class StaticFiles:
    """The files under `root` (subfolders included), answered under PREFIX; `PREFIX` alone is index.html."""

    def __init__(self, root: Path = WEB_ROOT) -> None:
        self._files = _load(root)

    @property
    def paths(self) -> list[str]:
        return sorted(PREFIX + name for name in self._files)

    def answer(self, target: str) -> Response | None:
        """The response for a request target (path and query), or None when it is not under PREFIX."""
        path = target.split("?", 1)[0].split("#", 1)[0]
        if path == PREFIX.rstrip("/"):
            return Response(308, b"", (("Location", PREFIX),))
        if not path.startswith(PREFIX):
            return None
        try:
            name = unquote(path[len(PREFIX):], errors="strict") or "index.html"
        except UnicodeDecodeError:
            name = ""
        found = self._files.get(name)
        if found is None:
            return Response(404, b"not found\n", (("Content-Type", "text/plain; charset=utf-8"),))
        body, content_type = found
        return Response(200, body, (("Content-Type", content_type), *SECURITY_HEADERS))


def _load(root: Path) -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    total = 0
    if not root.is_dir():
        log.warning("web view not served: %s is not a folder", root)
        return files
    for path in sorted(root.rglob("*")):
        content_type = CONTENT_TYPES.get(path.suffix.lower())
        # A symlink could point anywhere; the shipped files are plain files.
        if content_type is None or path.is_symlink() or not path.is_file():
            continue
        size = path.stat().st_size
        if size > MAX_FILE_BYTES or total + size > MAX_TOTAL_BYTES:
            log.warning("web view: %s left out (%d bytes; limits %d per file, %d in all)", path, size,
                        MAX_FILE_BYTES, MAX_TOTAL_BYTES)
            continue
        with open(path, "rb") as f:
            body = f.read(MAX_FILE_BYTES + 1)  # the file may have grown since stat()
        if len(body) > MAX_FILE_BYTES:
            continue
        total += len(body)
        files[path.relative_to(root).as_posix()] = (body, content_type)
    return files
