"""search.py: index -> query on the demo dataset with a trained model, incremental re-index, exported models,
the grid picture, JSON output and clear errors for bad inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from search import main
from search_app.encoder import ModelSourceError, load_encoder
from search_app.grid import grid_size
from search_app.index import build_index
from search_app.manifest import SearchIndex, SearchIndexError
from search_app.query import open_search, read_queries, search
from tests.conftest import compose_config, demo_overrides

NUM_IDENTITIES = 20


@pytest.fixture(scope="session")
def trained_checkpoint(demo_root, tmp_path_factory) -> Path:
    from trainer import train

    cfg = compose_config("demo", demo_overrides(demo_root, "trainer.max_epochs=8", "dataset.batch_size=16"))
    return Path(train(cfg, tmp_path_factory.mktemp("search_run"))["best_checkpoint"])


@pytest.fixture(scope="session")
def gallery(demo_root, tmp_path_factory) -> tuple[Path, list[tuple[str, int]]]:
    """Training images of the first identities copied to a photo folder, and one Vietnamese caption per image."""
    records = json.loads((demo_root / "VN3K" / "data_captions.json").read_text(encoding="utf-8"))
    train = [r for r in records if r["split"] == "train"]
    keep = sorted({r["id"] for r in train})[:NUM_IDENTITIES]
    folder = tmp_path_factory.mktemp("photos")
    queries = []
    for record in (r for r in train if r["id"] in keep):
        target = folder / record["file_path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_root / "VN3K" / "imgs" / record["file_path"], target)
        queries.append((record["captions"][0], record["id"]))
    return folder, queries


@pytest.fixture(scope="session")
def built_index(trained_checkpoint, gallery, tmp_path_factory) -> Path:
    index_dir = tmp_path_factory.mktemp("index")
    build_index(gallery[0], trained_checkpoint, index_dir, batch_size=16, progress=False)
    return index_dir


def _pid(path: str) -> int:
    return int(path.split("/")[0])


def test_query_finds_the_right_identity_in_the_top_10_for_most_captions(built_index, gallery):
    index, encoder = open_search(built_index)
    queries = gallery[1]
    results = search(index, encoder, [caption for caption, _ in queries], k=10)
    found = [any(_pid(hit.path) == pid for hit in result.hits) for result, (_, pid) in zip(results, queries)]
    # Chance: an identity's ~2.5 images among ~50 land in a random top 10 for about 43 % of captions.
    assert sum(found) / len(found) >= 0.7, sum(found) / len(found)


def test_search_matches_a_loop_over_every_image(built_index):
    index, encoder = open_search(built_index)
    query = "Người đàn ông mặc áo khoác đen, quần dài màu xám và giày trắng."
    text = encoder.encode_texts([query])[0]
    scores = [(float(torch.dot(text, row)), path) for row, path in zip(index.embeddings, index.paths)]
    expected = sorted(scores, key=lambda pair: -pair[0])[:7]
    hits = search(index, encoder, [query], k=7)[0].hits
    assert [h.path for h in hits] == [path for _, path in expected]
    assert [h.rank for h in hits] == list(range(1, 8))
    torch.testing.assert_close(torch.tensor([h.score for h in hits]), torch.tensor([s for s, _ in expected]))


def test_reindex_encodes_only_new_or_changed_files(trained_checkpoint, gallery, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(gallery[0], photos)
    index_dir = tmp_path / "index"
    first = build_index(photos, trained_checkpoint, index_dir, progress=False)
    before = SearchIndex.load(index_dir)
    again = build_index(photos, trained_checkpoint, index_dir, progress=False)
    assert (again.encoded, again.reused, again.removed) == (0, first.total, 0)

    names = sorted(p for p in photos.rglob("*.png"))
    changed, removed = names[0], names[1]
    Image.open(names[2]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed)
    removed.unlink()
    shutil.copy(names[3], photos / "new.webp")  # any supported suffix, decoded by content
    report = build_index(photos, trained_checkpoint, index_dir, progress=False)
    assert (report.total, report.encoded, report.removed) == (first.total, 2, 1)
    after = SearchIndex.load(index_dir)
    assert len(list(index_dir.glob("embeddings.*.safetensors"))) == 1
    old_rows = dict(zip(before.paths, before.embeddings))
    relative = {p.relative_to(photos).as_posix() for p in (changed, removed)}
    for path, row in zip(after.paths, after.embeddings):
        if path in old_rows and path not in relative:
            assert torch.equal(row, old_rows[path]), path
    assert not torch.allclose(after.embeddings[after.paths.index(sorted(relative)[0])], old_rows[sorted(relative)[0]])
    new = after.embeddings[after.paths.index("new.webp")]
    torch.testing.assert_close(new, old_rows[names[3].relative_to(photos).as_posix()], atol=1e-5, rtol=0)

    # An index built before photos were turned upright by their EXIF orientation holds sideways phone photos: all of
    # it is encoded again.
    manifest = json.loads((index_dir / "manifest.json").read_text())
    del manifest["exif_upright"]
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    report = build_index(photos, trained_checkpoint, index_dir, progress=False)
    assert (report.encoded, report.reused) == (report.total, 0)
    assert json.loads((index_dir / "manifest.json").read_text())["exif_upright"] is True


def test_exported_folder_gives_the_checkpoint_embeddings(trained_checkpoint, built_index, gallery, tmp_path):
    from prepare_checkpoints import export

    exported = export(trained_checkpoint, tmp_path / "exported")
    from_ckpt = load_encoder(trained_checkpoint)
    from_export = load_encoder(exported)  # the export records that the demo trained with a text attention mask
    assert from_export.tokenizer.return_attention_mask
    assert (from_export.image_size, from_export.mean) == (from_ckpt.image_size, from_ckpt.mean)
    captions = [caption for caption, _ in gallery[1][:4]]
    torch.testing.assert_close(from_export.encode_texts(captions), from_ckpt.encode_texts(captions), atol=1e-5, rtol=0)
    build_index(gallery[0], exported, tmp_path / "index", progress=False)
    torch.testing.assert_close(
        SearchIndex.load(tmp_path / "index").embeddings, SearchIndex.load(built_index).embeddings, atol=1e-5, rtol=0
    )
    with pytest.raises(SearchIndexError, match="other weights"):
        open_search(built_index, exported)


def test_cli_query_prints_writes_json_and_a_grid_of_the_expected_size(built_index, tmp_path, capsys):
    queries = tmp_path / "queries.txt"
    queries.write_text("A man in a black jacket\n\nNgười phụ nữ mặc váy đỏ\n", encoding="utf-8")
    out_json, grid = tmp_path / "out.json", tmp_path / "grid.png"
    main(["query", "Cô gái mặc áo cam", "--index", str(built_index), "--file", str(queries), "-k", "4",
          "--json", str(out_json), "--grid", str(grid), "--thumb", "96", "48"])  # fmt: skip
    printed = capsys.readouterr().out
    results = json.loads(out_json.read_text(encoding="utf-8"))
    assert [r["query"] for r in results] == ["Cô gái mặc áo cam", "A man in a black jacket", "Người phụ nữ mặc váy đỏ"]
    assert all([h["rank"] for h in r["hits"]] == [1, 2, 3, 4] for r in results)
    assert results[0]["hits"][0]["path"] in printed and "query: Người phụ nữ mặc váy đỏ" in printed
    with Image.open(grid) as picture:
        picture.verify()
    with Image.open(grid) as picture:
        assert picture.format == "PNG" and picture.size == grid_size(3, 4, (96, 48))


def test_bad_inputs_give_clear_errors(demo_root, tmp_path):
    model = demo_root / "tiny_siglip"  # any model folder works for input validation
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(SearchIndexError, match="no jpeg/jpg/png/webp images under .*empty"):
        build_index(tmp_path / "empty", model, tmp_path / "index", progress=False)

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 64), (200, 30, 30)).save(photos / "good.png")
    (photos / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(SearchIndexError, match=r"cannot read image .*broken\.jpg: .*--skip-unreadable"):
        build_index(photos, model, tmp_path / "index", progress=False)
    assert not (tmp_path / "index" / "manifest.json").exists()
    report = build_index(photos, model, tmp_path / "index", skip_unreadable=True, progress=False)
    assert (report.total, report.skipped) == (1, ["broken.jpg"])

    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(ModelSourceError, match="not_a_model is neither a .ckpt file nor a folder with config.json"):
        load_encoder(tmp_path / "not_a_model")
    with pytest.raises(SystemExit, match="error: --model .*missing_dir does not exist"):
        main(["index", str(photos), "--model", str(tmp_path / "missing_dir"), "--index", str(tmp_path / "i2")])
    with pytest.raises(SearchIndexError, match="holds no manifest.json"):
        SearchIndex.load(tmp_path / "not_a_model")
    with pytest.raises(SearchIndexError, match="built for images in"):
        build_index(tmp_path / "empty" / "..", model, tmp_path / "index", progress=False)
    with pytest.raises(SearchIndexError, match="no query"):
        read_queries(["  "], None)


def test_a_checkpoint_naming_its_model_relative_to_the_repository_loads_from_any_folder(
    trained_checkpoint, tmp_path, monkeypatch
):
    """Runs start in the repository, so a checkpoint's config may name its model folder relative to it (the demo's
    `demo_assets/tiny_siglip`); search and export load it from another working directory too.
    """
    import lightning_models

    saved = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    cfg = saved["hyper_parameters"]["cfg"]
    model_folder = Path(cfg["backbone"]["path"])
    repository = model_folder.parent.parent  # stands in for the repository: the model folder is two levels below it
    for group, key in lightning_models.MODEL_FOLDER_KEYS:
        cfg[group][key] = str(Path(cfg[group][key]).relative_to(repository))
    relative = tmp_path / "relative.ckpt"
    torch.save(saved, relative)
    monkeypatch.setattr(lightning_models, "PROJECT_ROOT", repository)
    monkeypatch.chdir(tmp_path)  # where the relative folder does not exist
    assert not Path(cfg["backbone"]["path"]).exists()
    encoder = load_encoder(relative, device=torch.device("cpu"))
    reference = load_encoder(trained_checkpoint, device=torch.device("cpu"))
    texts = ["một người phụ nữ mặc áo trắng"]
    torch.testing.assert_close(encoder.encode_texts(texts), reference.encode_texts(texts))
