"""The local search page: a real headless Chromium renders a query's ranked gallery; only indexed files are served."""

from __future__ import annotations

import html
import http.client
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from PIL import Image

from search_app.index import build_index
from search_app.query import open_search, search
from search_app.web import make_server

QUERY = "Người phụ nữ mặc áo đỏ"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("web") / "photos"
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (90, 90, 90)]):
        folder = root / ("street" if i % 2 else "gate")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 64), colour).save(folder / f"person {i}.png")  # a space: URLs must be quoted
    (root / "notes.txt").write_text("not indexed")
    (root.parent / "secret.txt").write_text("outside the indexed folder")
    return root


@pytest.fixture(scope="module")
def server(photos, tiny_checkpoint, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("web_index")
    build_index(photos, tiny_checkpoint, index_dir, progress=False)  # an untrained model ranks just as well
    server = make_server(*open_search(index_dir), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _get(server, path: str, host: str | None = None) -> tuple[int, bytes, str]:
    """A raw GET: http.client sends `path` exactly as written, so `..` reaches the server unnormalised."""
    port = server.server_address[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.putrequest("GET", path, skip_host=True)
    connection.putheader("Host", host or f"127.0.0.1:{port}")
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body, response.getheader("Content-Type", "")


def test_binds_to_localhost_by_default(server):
    assert server.server_address[0] == "127.0.0.1"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium browser installed (apt-get install chromium)")
def test_headless_browser_shows_the_ranked_gallery(server, tmp_path):
    port = server.server_address[1]
    url = f"http://127.0.0.1:{port}/?q={quote_plus(QUERY)}&k=3"
    command = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path}",
        "--dump-dom",
        url,
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    hits = re.findall(r'<li class="hit" data-rank="(\d+)" data-score="([-\d.]+)" data-path="([^"]+)"', dom)
    expected = search(server.index, server.encoder, [QUERY], k=3)[0].hits
    assert [int(rank) for rank, _, _ in hits] == [1, 2, 3]
    assert [html.unescape(path) for _, _, path in hits] == [hit.path for hit in expected]
    assert [float(score) for _, score, _ in hits] == pytest.approx([hit.score for hit in expected], abs=1e-5)
    assert f'value="{QUERY}"' in dom and dom.count("<img ") == 3


def test_images_are_served_and_the_api_answers(server):
    hit = search(server.index, server.encoder, [QUERY], k=5)[0].hits[0]
    status, body, content_type = _get(server, "/image/" + quote(hit.path))
    assert (status, content_type) == (200, "image/png")
    assert body == (server.root / hit.path).read_bytes()
    status, body, _ = _get(server, f"/api/search?q={quote_plus(QUERY)}&k=2")
    answer = json.loads(body)
    assert status == 200 and answer["query"] == QUERY and [h["rank"] for h in answer["hits"]] == [1, 2]
    assert _get(server, "/api/search")[0] == 400


@pytest.mark.parametrize(
    "path",
    [
        "/image/../secret.txt",
        "/image/%2e%2e/secret.txt",
        "/image/..%2fsecret.txt",
        "/image/gate/../../secret.txt",
        "/image//etc/passwd",
        "/image/%2Fetc%2Fpasswd",
        "/image/gate%2Fperson%200.png",  # an indexed image, its separator encoded (the page never encodes it)
        "/image/gate%5Cperson%200.png",
        "/image/notes.txt",  # inside the folder, but not an indexed image
        "/image/",
        "/../secret.txt",
        "/manifest.json",
    ],
)
def test_path_traversal_and_unindexed_files_are_rejected(server, path):
    status, body, _ = _get(server, path)
    assert status == 404 and b"outside" not in body


def test_requests_for_another_host_are_refused(server):
    assert _get(server, "/", host="evil.example:80")[0] == 403
    assert _get(server, "/", host=f"localhost:{server.server_address[1]}")[0] == 200
