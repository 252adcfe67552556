"""The web view's files as the health listener serves them: only the shipped files, with their types, bounded."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from gateway.ops import static
from gateway.ops.health import MAX_REQUEST_BYTES, HealthServer
from gateway.ops.static import StaticFiles


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "web"
    (root / "vendor").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>t</title>")
    (root / "app.js").write_text("'use strict';")
    (root / "vendor" / "lib.js").write_text("var lib;")
    (root / "vendor" / "LICENSE.md").write_text("MIT")
    (root / "notes.py").write_text("secret = 1")          # no known type: not served
    (tmp_path / "outside.txt").write_text("outside")
    os.symlink(tmp_path / "outside.txt", root / "link.txt")  # a symlink: not served
    return root


async def get(server: HealthServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def serve(root: Path, *requests: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    async def main() -> list[tuple[int, dict[str, str], bytes]]:
        server = HealthServer("127.0.0.1:0", lambda: {"ok": True}, lambda: None, static=StaticFiles(root))
        await server.start()
        try:
            return [await get(server, r) for r in requests]
        finally:
            await server.close()

    return asyncio.run(main())


def browser_get(path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\nAccept: */*\r\n"
            "Accept-Language: en\r\n\r\n").encode()


def test_the_shipped_files_are_served_with_their_types_and_security_headers(site):
    (index, headers, body), (js, js_headers, js_body), (lib, lib_headers, _), (lic, lic_headers, _) = serve(
        site, browser_get("/web/"), browser_get("/web/app.js?v=1"), browser_get("/web/vendor/lib.js"),
        browser_get("/web/vendor/LICENSE.md"))
    assert (index, body) == (200, b"<!doctype html><title>t</title>")
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Length"] == str(len(body))
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert (js, js_body, js_headers["Content-Type"]) == (200, b"'use strict';", "text/javascript; charset=utf-8")
    assert (lib, lib_headers["Content-Type"]) == (200, "text/javascript; charset=utf-8")
    assert (lic, lic_headers["Content-Type"]) == (200, "text/plain; charset=utf-8")


@pytest.mark.parametrize("path", [
    "/web/../outside.txt", "/web/%2e%2e/outside.txt", "/web/..%2foutside.txt", "/web/vendor/../../outside.txt",
    "/web//etc/passwd", "/web/%2fetc%2fpasswd", "/web/notes.py", "/web/link.txt", "/web/vendor", "/web/vendor/",
    "/web/index.html%00.js", "/web/INDEX.HTML", "/web/%ff",
])
def test_nothing_but_the_listed_files_is_served(site, path):
    ((code, _, body),) = serve(site, browser_get(path))
    assert code == 404, (path, code, body)
    assert b"outside" not in body and b"secret" not in body and b"root:" not in body


def test_the_folder_without_its_slash_redirects_and_other_routes_still_answer(site):
    (redirect, headers, _), (health, _, ok), (status, _, doc), (other, _, _) = serve(
        site, browser_get("/web"), browser_get("/health"), browser_get("/status"), browser_get("/webx"))
    assert (redirect, headers["Location"]) == (308, "/web/")
    assert (health, ok) == (200, b"ok\n")
    assert (status, doc) == (200, b'{"ok": true}')
    assert other == 404


def test_a_request_larger_than_the_limit_is_refused(site):
    huge = b"GET /web/ HTTP/1.1\r\n" + b"X-Filler: " + b"a" * MAX_REQUEST_BYTES + b"\r\n\r\n"
    ((code, _, _),) = serve(site, huge)
    assert code == 431


def test_files_over_the_size_limit_are_left_out(tmp_path, monkeypatch):
    monkeypatch.setattr(static, "MAX_FILE_BYTES", 10)
    (tmp_path / "small.js").write_text("var a;")
    (tmp_path / "big.js").write_text("var a = 12345678901234567890;")
    assert StaticFiles(tmp_path).paths == ["/web/small.js"]


def test_the_shipped_web_view_is_complete():
    paths = StaticFiles().paths
    for name in ("index.html", "operator.html", "view.js", "timeline.js", "operator.js", "style.css",
                 "vendor/mqtt.min.js", "vendor/mqtt.LICENSE.md"):
        assert f"/web/{name}" in paths
