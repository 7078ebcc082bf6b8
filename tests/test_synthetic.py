"""Tests for data.synthetic: determinism, VN3K layout, captions that agree with the drawing, atomic writes."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import unicodedata
from collections import defaultdict
from dataclasses import astuple, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data.synthetic.generate as generate
from data.synthetic import SyntheticSpec, all_captions, ensure_vn3k, generate_vn3k, main
from data.synthetic.attributes import COLOURS, HAIR_COLOURS, TOPS, PersonAttributes, sample_identities
from data.synthetic.backgrounds import BACKGROUNDS
from data.synthetic.captions import PLACES, make_captions
from data.synthetic.drawing import View, render_person

REPO = Path(__file__).resolve().parents[1]
SPEC = SyntheticSpec(num_identities=40, images_per_identity=(2, 3), seed=3)
TINY = SyntheticSpec(num_identities=8, images_per_identity=(1, 2), image_size=(64, 32), seed=5)
RECORD_KEYS = {"id", "file_path", "captions", "en_captions", "split"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_vn3k(tmp_path_factory.mktemp("synthetic"), SPEC)


def _records(dataset_dir: Path) -> list[dict]:
    return json.loads((dataset_dir / "data_captions.json").read_text(encoding="utf-8"))


def _identities(dataset_dir: Path) -> list[dict]:
    return json.loads((dataset_dir / "synthetic_meta.json").read_text(encoding="utf-8"))["identities"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    first = _files(generate_vn3k(tmp_path / "a", TINY))
    second = _files(generate_vn3k(tmp_path / "b", TINY))
    other = _files(generate_vn3k(tmp_path / "c", replace(TINY, seed=6)))
    assert first == second
    assert first["data_captions.json"] != other["data_captions.json"]
    shared_images = [name for name in first if name.endswith(".png") and name in other]
    assert any(first[name] != other[name] for name in shared_images)


def test_layout_and_schema(dataset):
    records = _records(dataset)
    assert all(set(record) == RECORD_KEYS for record in records)
    ids = sorted({record["id"] for record in records})
    assert ids == list(range(1, SPEC.num_identities + 1))

    split_of: dict[int, set[str]] = defaultdict(set)
    images_of: dict[int, int] = defaultdict(int)
    for record in records:
        split_of[record["id"]].add(record["split"])
        images_of[record["id"]] += 1
        assert len(record["captions"]) == 2 and len(record["en_captions"]) == 2
        assert all(isinstance(c, str) and c.strip() for c in record["captions"] + record["en_captions"])
        assert record["file_path"].startswith(f"{record['id']:04d}/")
        with Image.open(dataset / "imgs" / record["file_path"]) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 128))
    assert all(len(splits) == 1 for splits in split_of.values()), "an identity spans several splits"
    ids_by_split = defaultdict(list)
    for pid in ids:
        ids_by_split[split_of[pid].pop()].append(pid)
    sizes = SPEC.split_sizes()
    assert {split: len(pids) for split, pids in ids_by_split.items()} == sizes
    assert ids_by_split["train"] == list(range(1, sizes["train"] + 1)), "train ids must be 1..N_train (loader assert)"
    assert all(2 <= count <= 3 for count in images_of.values())
    assert len(list((dataset / "imgs").rglob("*.png"))) == len(records)


def test_captions_are_nfc_vietnamese_and_ascii_english(dataset):
    for record in _records(dataset):
        for caption in record["captions"]:
            assert unicodedata.normalize("NFC", caption) == caption
            assert any(ord(ch) > 127 for ch in caption), f"no Vietnamese diacritics in {caption!r}"
        assert record["captions"][0] != record["captions"][1]
        assert record["en_captions"][0] != record["en_captions"][1]
        assert all(caption.isascii() for caption in record["en_captions"])


def test_captions_name_exactly_the_identity_colours(dataset):
    people = {person["id"]: person for person in _identities(dataset)}
    for record in _records(dataset):
        person = people[record["id"]]
        parts = [
            (COLOURS, person[key])
            for key in ("top_colour", "bottom_colour", "shoes_colour", "bag_colour", "hat_colour")
            if person[key]
        ]
        parts.append((HAIR_COLOURS, person["hair_colour"]))
        for language in ("vi", "en"):
            captions = record["captions"] if language == "vi" else record["en_captions"]
            allowed = {word for table, key in parts for word in getattr(table[key], language)}
            forbidden = {word for colour in COLOURS.values() for word in getattr(colour, language)} - allowed
            top_nouns = getattr(TOPS[person["top"]], language)
            for caption in captions:
                for table, key in parts:
                    assert any(_has_word(caption, w) for w in getattr(table[key], language)), (key, caption)
                assert not [w for w in forbidden if _has_word(caption, w)], caption
                assert any(_has_word(caption, noun) for noun in top_nouns), caption


def test_captions_of_a_hand_written_person():
    person = PersonAttributes(
        "female", "long", "black", "shirt", "white", "jeans", "blue", "white", "backpack", "red", "conical", None
    )
    vietnamese, english = make_captions(person, "street", random.Random(0))
    for caption in vietnamese:
        for words in (
            ("phụ nữ", "cô gái"),
            ("dài",),
            ("đen",),
            ("áo sơ mi",),
            ("trắng",),
            ("quần jean", "quần bò"),
            ("xanh dương", "xanh lam", "xanh nước biển"),
            ("ba lô",),
            ("đỏ",),
            ("nón lá",),
        ):
            assert any(word in caption.lower() for word in words), (words, caption)
    for caption in english:
        for words in (
            ("woman",),
            ("long black hair",),
            ("white",),
            ("shirt",),
            ("blue jeans", "blue denim jeans"),
            ("red backpack",),
            ("conical",),
        ):
            assert any(word in caption.lower() for word in words), (words, caption)


def _colour_pixels(image: Image.Image, rgb: tuple[int, int, int], tolerance: float = 20.0) -> int:
    pixels = np.asarray(image, dtype=np.float32)
    return int((np.linalg.norm(pixels - np.array(rgb, dtype=np.float32), axis=-1) < tolerance).sum())


def test_drawing_uses_the_attribute_colours():
    person = PersonAttributes(
        "male", "short", "black", "tshirt", "red", "trousers", "blue", "white", "shoulder_bag", "yellow", "cap", "green"
    )
    view = View("front", 0.0, 0.0, 0.85, 0.0, 0.97, "wall", 1.0, 0.0, 0, 7)
    image = render_person(person, view, (128, 64))
    for part, key, least in (
        ("top", "red", 300),
        ("bottom", "blue", 300),
        ("bag", "yellow", 40),
        ("hat", "green", 30),
        ("shoes", "white", 30),
    ):
        assert _colour_pixels(image, COLOURS[key].rgb) >= least, part
    recoloured = render_person(replace(person, top_colour="pink"), view, (128, 64))
    assert _colour_pixels(recoloured, COLOURS["red"].rgb) < 20
    assert _colour_pixels(recoloured, COLOURS["pink"].rgb) >= 300


def test_hard_negatives_exist_in_train_and_test(dataset):
    by_split = defaultdict(list)
    for person in _identities(dataset):
        by_split[person["split"]].append(person)
    for split in ("train", "test"):  # 24 and 10 identities; validate (6) is too small to promise one
        people = by_split[split]
        assert any(
            a["top"] == b["top"]
            and a["top_colour"] == b["top_colour"]
            and (a["bottom"], a["bottom_colour"]) != (b["bottom"], b["bottom_colour"])
            for i, a in enumerate(people)
            for b in people[i + 1 :]
        ), f"no 'same top, different bottom' pair in {split}"


def test_attribute_tuples_are_unique_within_a_split(dataset):
    by_split = defaultdict(list)
    for person in _identities(dataset):
        by_split[person["split"]].append(tuple(v for k, v in person.items() if k not in ("id", "split")))
    assert all(len(set(people)) == len(people) for people in by_split.values())
    many = sample_identities(600, random.Random(0))
    assert len({astuple(person) for person in many}) == 600


def test_refuses_to_overwrite_unless_asked(tmp_path):
    target = generate_vn3k(tmp_path, TINY)
    before = _files(target)
    with pytest.raises(FileExistsError, match=r"VN3K already exists.*overwrite=True"):
        generate_vn3k(tmp_path, replace(TINY, seed=9))
    assert _files(target) == before
    generate_vn3k(tmp_path, replace(TINY, seed=9), overwrite=True)
    assert _files(target) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VN3K"]


@pytest.mark.parametrize("existing", [False, True])
def test_failed_run_leaves_no_partial_dataset(tmp_path, monkeypatch, existing):
    before = _files(generate_vn3k(tmp_path, TINY)) if existing else None
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return render_person(*args, **kwargs)

    monkeypatch.setattr(generate, "render_person", failing_render)
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate_vn3k(tmp_path, replace(TINY, seed=9), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["VN3K"] if existing else [])
    if existing:
        assert _files(tmp_path / "VN3K") == before


def test_ensure_generates_once_then_reuses(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="data.synthetic.generate")
    target = ensure_vn3k(tmp_path, TINY)
    assert (target / "data_captions.json").is_file()
    monkeypatch.setattr(generate, "render_person", lambda *a, **k: pytest.fail("regenerated an existing dataset"))
    caplog.clear()
    assert ensure_vn3k(tmp_path, TINY) == target
    assert "Using the existing dataset" in caplog.text and not any(r.levelname == "WARNING" for r in caplog.records)
    ensure_vn3k(tmp_path, replace(TINY, seed=1))
    assert any(r.levelname == "WARNING" and "overwrite=True" in r.getMessage() for r in caplog.records)


def test_all_captions_returns_both_languages(dataset):
    records = _records(dataset)
    captions = all_captions(dataset)
    assert len(captions) == 4 * len(records)
    assert set(captions) == {c for r in records for c in r["captions"] + r["en_captions"]}
    with pytest.raises(FileNotFoundError, match="data_captions.json"):
        all_captions(dataset.parent / "missing")


def test_spec_validation_lists_every_issue():
    with pytest.raises(ValueError) as err:
        SyntheticSpec(images_per_identity=(3, 2), split_fractions=(0.5, 0.5, 0.5), image_size=(16, 8))
    message = str(err.value)
    assert "images_per_identity" in message and "sum to 1" in message and "image_size" in message
    with pytest.raises(ValueError, match="train and test need at least one identity"):
        SyntheticSpec(num_identities=1)


def test_every_background_has_place_phrases():
    assert set(PLACES) == set(BACKGROUNDS)
    assert all(len(vi) == len(en) for vi, en in PLACES.values())


def test_cli_main_and_module_entry_point(tmp_path):
    main(
        [
            "--out",
            str(tmp_path / "a"),
            "--identities",
            "6",
            "--images-min",
            "1",
            "--images-max",
            "1",
            "--height",
            "64",
            "--width",
            "32",
            "--seed",
            "2",
        ]
    )
    assert len(_records(tmp_path / "a" / "VN3K")) == 6
    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path / "a"), "--identities", "6"])
    assert err.value.code == 2
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "data.synthetic",
            "--out",
            str(tmp_path / "b"),
            "--identities",
            "5",
            "--images-min",
            "1",
            "--images-max",
            "1",
            "--height",
            "64",
            "--width",
            "32",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert len(_records(tmp_path / "b" / "VN3K")) == 5
