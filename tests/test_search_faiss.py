"""Search backends (matmul, faiss-flat, faiss-ivf), backend refusal, incremental faiss indexes, --follow-links and
what the web server agrees to serve.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from threading import Thread

import numpy as np
import pytest
import torch
from PIL import Image

import search_app.backends as backends
from bench.search_scale import clustered_embeddings
from search import main
from search_app.backends import IVFParams, MatmulRanker, assign_lists, flat_ranker, ivf_ranker, train_ivf
from search_app.index import build_index
from search_app.manifest import SearchIndex, SearchIndexError
from search_app.query import open_search
from search_app.web import make_server


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=1)


def _exact_top_k(gallery: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k rows by cosine straight from the definition (float64 to keep near-ties honest)."""
    return (queries.double() @ gallery.double().T).topk(k, dim=1).indices


def test_exact_engines_return_the_top_k_of_the_definition(monkeypatch):
    gallery, queries = _unit(3000, 64, 0), _unit(40, 64, 1)
    expected = _exact_top_k(gallery, queries, 10).numpy()
    _, flat_rows = flat_ranker(gallery).search(queries, 10)
    monkeypatch.setattr(backends, "SCORE_ENTRIES", 3000 * 7)  # 7 queries per score matrix: several chunks
    scores, matmul_rows = MatmulRanker(gallery).search(queries, 10)
    np.testing.assert_array_equal(flat_rows, expected)
    np.testing.assert_array_equal(matmul_rows, expected)
    np.testing.assert_allclose(scores[:, 0], (queries @ gallery.T).max(dim=1).values.numpy(), atol=1e-5)


def test_ivf_with_the_chosen_parameters_reaches_its_recall_on_clustered_embeddings():
    gallery, queries = clustered_embeddings(5_000, 200, seed=3)
    params = IVFParams.for_size(len(gallery))
    trained = train_ivf(gallery, params)
    _, rows = ivf_ranker(trained, gallery, assign_lists(trained, gallery), params.nprobe).search(
        torch.from_numpy(queries), 10
    )
    exact = _exact_top_k(torch.from_numpy(gallery), torch.from_numpy(queries), 10).tolist()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact)])
    assert params.nprobe < params.nlist  # approximate: it scans only some lists
    assert recall >= 0.98, recall


def _photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` small pictures of random colour blocks."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (4, 2, 3), dtype=np.uint8).repeat(16, axis=0).repeat(16, axis=1)
        paths.append(folder / f"p{i:03d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def model(demo_root) -> Path:
    return demo_root / "tiny_siglip"


def test_an_index_is_refused_by_another_backend_with_a_clear_message(model, tmp_path):
    _photos(tmp_path / "photos", 6)
    index_dir = tmp_path / "index"
    build_index(tmp_path / "photos", model, index_dir, backend="faiss-ivf", progress=False)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["backend"]["name"] == "faiss-ivf"
    assert {"nlist", "nprobe", "train_size", "seed", "niter"} <= manifest["backend"].keys()
    message = f"index {index_dir} was built with the faiss-ivf backend, not matmul; pass --backend faiss-ivf"
    with pytest.raises(SearchIndexError, match=message):
        open_search(index_dir, backend="matmul")
    with pytest.raises(SearchIndexError, match=message):
        build_index(tmp_path / "photos", model, index_dir, backend="matmul", progress=False)
    with pytest.raises(SystemExit, match="built with the faiss-ivf backend, not faiss-flat"):
        main(["query", "a person", "--index", str(index_dir), "--backend", "faiss-flat"])
    index, _ = open_search(index_dir, backend="faiss-ivf")
    assert index.backend["name"] == "faiss-ivf"


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-ivf"])
def test_incremental_reindex_with_faiss_encodes_only_changes_and_searches_the_current_rows(model, tmp_path, backend):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    paths = _photos(photos, 100)
    build_index(photos, model, index_dir, backend=backend, progress=False)
    before = SearchIndex.load(index_dir)
    Image.open(paths[5]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(paths[4])  # changed
    paths[7].unlink()  # removed
    _photos(tmp_path / "more", 3, seed=1)
    for new in sorted((tmp_path / "more").iterdir()):
        new.rename(photos / f"new_{new.name}")
    report = build_index(photos, model, index_dir, progress=False)  # auto keeps the index's backend
    assert (report.total, report.encoded, report.removed, report.backend) == (102, 4, 1, backend)

    after = SearchIndex.load(index_dir)
    assert "p007.png" not in after.paths and len(after.paths) == len(after.embeddings) == 102
    queries = _unit(8, after.embeddings.shape[1], 2)
    ranker = after.ranker()
    if backend == "faiss-ivf":
        old_lists = dict(zip(before.paths, before.lists.tolist()))
        centroids = after.trained_ivf.quantizer.reconstruct_n(0, after.trained_ivf.nlist)
        for path, row, lst in zip(after.paths, after.embeddings, after.lists.tolist()):
            if path in old_lists and path != "p004.png":
                assert lst == old_lists[path], path  # unchanged rows keep their list
            else:
                assert lst == int(np.argmax(centroids @ row.numpy())), path  # new rows go to the nearest centroid
        ranker.index.nprobe = after.trained_ivf.nlist  # every list scanned: exactly the current rows
    _, rows = ranker.search(queries, 5)
    np.testing.assert_array_equal(rows, _exact_top_k(after.embeddings, queries, 5).numpy())


@pytest.fixture
def linked_gallery(tmp_path) -> tuple[Path, Path]:
    """A folder of four links into storage outside it: two to files, one to a folder of two."""
    storage, photos = tmp_path / "storage", tmp_path / "photos"
    _photos(storage, 2)
    _photos(storage / "album", 2, seed=1)
    photos.mkdir()
    (photos / "a.png").symlink_to(storage / "p000.png")
    (photos / "b.png").symlink_to(storage / "p001.png")
    (photos / "album").symlink_to(storage / "album")
    (photos / "loop").symlink_to(photos)  # must not be walked forever
    return photos, storage


def test_follow_links_indexes_targets_outside_the_folder_and_records_it(model, linked_gallery, tmp_path):
    photos, storage = linked_gallery
    with pytest.raises(SearchIndexError, match="no jpeg/jpg/png/webp images under"):
        build_index(photos, model, tmp_path / "index", progress=False)
    report = build_index(photos, model, tmp_path / "index", follow_links=True, progress=False)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert report.total == 4 and manifest["follow_links"] is True
    targets = {f["path"]: f.get("target") for f in manifest["files"]}
    assert targets == {
        "a.png": str((storage / "p000.png").resolve()),
        "album/p000.png": str((storage / "album" / "p000.png").resolve()),
        "album/p001.png": str((storage / "album" / "p001.png").resolve()),
        "b.png": str((storage / "p001.png").resolve()),
    }
    (photos / "c.png").symlink_to(storage / "album" / "p000.png")
    again = build_index(photos, model, tmp_path / "index", progress=False)  # the recorded choice holds
    assert (again.total, again.encoded) == (5, 1)


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def test_web_serves_only_indexed_files(model, linked_gallery, tmp_path):
    photos, storage = linked_gallery
    (photos / "inside.png").write_bytes((storage / "p000.png").read_bytes())
    build_index(photos, model, tmp_path / "index", follow_links=True, progress=False)
    server = make_server(*open_search(tmp_path / "index"), port=0)
    Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        assert _get(port, "/image/album/p001.png") == (200, (storage / "album" / "p001.png").read_bytes())
        assert _get(port, "/image/inside.png")[0] == 200
        (photos / "late.png").symlink_to(storage / "p000.png")  # a link added after indexing
        (photos / "late_file.png").write_bytes((storage / "p000.png").read_bytes())
        (photos / "b.png").unlink()
        (photos / "b.png").symlink_to(tmp_path / "index" / "manifest.json")  # an indexed link retargeted
        for path in ("/image/late.png", "/image/late_file.png", "/image/b.png", "/image/../storage/p000.png",
                     "/image/" + str(storage / "p000.png"), "/image/loop/a.png"):  # fmt: skip
            assert _get(port, path)[0] == 404, path
    finally:
        server.shutdown()
        server.server_close()
