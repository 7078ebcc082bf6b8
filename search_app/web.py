"""A local search page on the standard library's `http.server`: type a description, see the ranked gallery.

Routes: `/` (the page; `/?q=...&k=...` renders results server-side, so it works without JavaScript), `/api/search`
(the same as JSON) and `/image/<relative path>`. Only files listed in the index are served: the requested path
must be one of the index's relative paths, and its resolved location must still lie inside the indexed folder or,
for a link followed at indexing (`--follow-links`), be exactly the target the index recorded, so `..`, absolute
paths, encoded separators, files or links added after indexing and links retargeted since all get 404. It binds
127.0.0.1 by default, and a loopback server answers only requests addressed to a loopback name (no DNS rebinding).
"""

from __future__ import annotations

import html
import ipaddress
import json
import logging
import mimetypes
import re
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from search_app.encoder import SearchEncoder
from search_app.manifest import SearchIndex
from search_app.query import QueryResult, results_json, search

log = logging.getLogger(__name__)

DEFAULT_K = 10
MAX_K = 100
#: A percent-encoded slash or backslash in an image URL: a separator smuggled past the path's own.
ENCODED_SEPARATOR = re.compile("%(2f|5c)", re.IGNORECASE)
MAX_QUERY_CHARS = 1000  # the tokenizer truncates far earlier; this only bounds the work per request
IMAGE_PREFIX = "/image/"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")

PAGE = """<!doctype html>
<html lang="vi"><head><meta charset="utf-8"><title>Person search</title>
<style>
body {{ font-family: sans-serif; margin: 1.5rem; }}
form {{ display: flex; gap: .5rem; margin-bottom: 1rem; }}
input[name=q] {{ flex: 1; font-size: 1.1rem; padding: .4rem; }}
#results {{ display: flex; flex-wrap: wrap; gap: .75rem; list-style: none; padding: 0; }}
.hit {{ text-align: center; font-size: .85rem; }}
.hit img {{ height: 192px; border: 1px solid #999; display: block; }}
</style></head>
<body>
<h1>Person search</h1>
<p>{count} images indexed in <code>{root}</code>.</p>
<form method="get" action="/">
<input name="q" value="{query}" placeholder="Mô tả người cần tìm / describe the person" autofocus>
<input name="k" type="number" min="1" max="{max_k}" value="{k}">
<button type="submit">Search</button>
</form>
{results}
</body></html>
"""


def render_results(result: QueryResult | None) -> str:
    """The ranked gallery as an `<ol id="results">` (empty string before the first query)."""
    if result is None:
        return ""
    items = "\n".join(
        f'<li class="hit" data-rank="{hit.rank}" data-score="{hit.score:.6f}" data-path="{html.escape(hit.path)}">'
        f'<img src="{IMAGE_PREFIX}{quote(hit.path)}" alt="{html.escape(hit.path)}">'
        f'<span class="rank">#{hit.rank}</span> <span class="score">{hit.score:.3f}</span></li>'
        for hit in result.hits
    )
    return f'<p id="query">Results for: {html.escape(result.query)}</p>\n<ol id="results">\n{items}\n</ol>'


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name rather than an address
        return host == "localhost"


class SearchServer(ThreadingHTTPServer):
    """An HTTP server holding one index and its encoder; queries are encoded one at a time."""

    daemon_threads = True

    def __init__(self, index: SearchIndex, encoder: SearchEncoder, host: str, port: int):
        super().__init__((host, port), SearchHandler)
        self.index, self.encoder = index, encoder
        self.root = index.root.resolve()
        self.served = {entry.path: entry.target for entry in index.entries}  # path -> recorded link target
        self.lock = threading.Lock()
        port = self.server_address[1]
        self.allowed_hosts = {f"{name}:{port}" for name in LOOPBACK_NAMES} if is_loopback(host) else None

    def search(self, query: str, k: int) -> QueryResult:
        with self.lock:
            return search(self.index, self.encoder, [query[:MAX_QUERY_CHARS]], k)[0]

    def image_file(self, relative: str) -> Path | None:
        """The file for an indexed relative path, or None for anything else."""
        if relative not in self.served:
            return None
        path = (self.root / relative).resolve()
        target = self.served[relative]
        allowed = path == Path(target) if target is not None else path.is_relative_to(self.root)
        return path if allowed and path.is_file() else None


class SearchHandler(BaseHTTPRequestHandler):
    server: SearchServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.server.allowed_hosts is not None and self.headers.get("Host") not in self.server.allowed_hosts:
            self._send(HTTPStatus.FORBIDDEN, b"Forbidden host", "text/plain")
            return
        url = urlsplit(self.path)
        if url.path.startswith(IMAGE_PREFIX):
            raw = url.path[len(IMAGE_PREFIX) :]
            if ENCODED_SEPARATOR.search(raw):  # the page quotes names but never their separators
                self._send(HTTPStatus.NOT_FOUND, b"Not found", "text/plain")
                return
            self._image(unquote(raw))
            return
        route = ROUTES.get(url.path)
        if route is None:
            self._send(HTTPStatus.NOT_FOUND, b"Not found", "text/plain")
            return
        params = parse_qs(url.query)
        query = params.get("q", [""])[0].strip()
        try:
            k = min(max(int(params.get("k", [DEFAULT_K])[0]), 1), MAX_K)
        except ValueError:
            k = DEFAULT_K
        route(self, query, k)

    def _page(self, query: str, k: int) -> None:
        result = self.server.search(query, k) if query else None
        page = PAGE.format(
            count=len(self.server.served),
            root=html.escape(str(self.server.root)),
            query=html.escape(query),
            k=k,
            max_k=MAX_K,
            results=render_results(result),
        )
        self._send(HTTPStatus.OK, page.encode("utf-8"), "text/html; charset=utf-8")

    def _api(self, query: str, k: int) -> None:
        if not query:
            self._send(HTTPStatus.BAD_REQUEST, b'{"error": "missing q"}', "application/json")
            return
        body = json.dumps(results_json([self.server.search(query, k)])[0], ensure_ascii=False)
        self._send(HTTPStatus.OK, body.encode("utf-8"), "application/json; charset=utf-8")

    def _image(self, relative: str) -> None:
        path = self.server.image_file(relative)
        if path is None:
            self._send(HTTPStatus.NOT_FOUND, b"Not found", "text/plain")
            return
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, path.read_bytes(), content_type)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (signature of the base class)
        log.debug("%s " + format, self.address_string(), *args)


ROUTES: dict[str, Callable[[SearchHandler, str, int], None]] = {
    "/": SearchHandler._page,
    "/api/search": SearchHandler._api,
}


def make_server(index: SearchIndex, encoder: SearchEncoder, host: str = "127.0.0.1", port: int = 8765) -> SearchServer:
    """Bind a search server (port 0: any free port; read it from `server.server_address`)."""
    return SearchServer(index, encoder, host, port)
