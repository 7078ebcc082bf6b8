"""Annotation files as the peers write them: blank captions, ids as strings or floats, other validation spellings,
a test-only image folder, and training on every identity under the peers' protocol.

Expected counts are worked out by hand from the records written here (each record's comment says what a reader must
do with it), not from the reader under test.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.readers import DatasetFormatError, read_dataset
from tests.conftest import compose_config, demo_overrides

#: The peers' file layouts: dataset -> (folder, annotation file, image-path key).
LAYOUTS = {
    "CUHK-PEDES": ("CUHK-PEDES", "reid_raw.json", "file_path"),
    "ICFG-PEDES": ("ICFG-PEDES", "ICFG-PEDES.json", "file_path"),
    "RSTPReid": ("RSTPReid", "data_captions.json", "img_path"),
    "VN3K_VI": ("VN3K", "data_captions.json", "file_path"),
}

#: Written with `file_path` (renamed to the layout's key). One line per record: what it must become.
MESSY_RECORDS = [
    {"id": 1, "file_path": "p1/a.jpg", "split": "train", "captions": ["a man in red", "red jacket"]},  # 2 captions
    {"id": "2", "file_path": "p2/a.jpg", "split": "train", "captions": ["a woman", "   "]},  # id 2; 1 caption kept
    {"id": 3.0, "file_path": "p3/a.jpg", "split": "train", "captions": [None]},  # no caption left: record dropped
    {"id": "x7", "file_path": "p7/a.jpg", "split": "train", "captions": ["a child"]},  # not an id: record dropped
    {"id": 4, "file_path": "p4/a.jpg", "split": "test", "captions": ["grey coat"]},  # test query + image
    {"id": 4, "file_path": "p4/b.jpg", "split": "test", "captions": ["grey coat, bag", ""]},  # 1 caption kept
    {"id": 5, "file_path": "p5/a.jpg", "split": "validation", "captions": ["blue shirt"]},  # validation
    {"id": 5, "file_path": "p5/b.jpg", "split": "valid", "captions": ["blue shirt, cap"]},  # validation
    {"id": 6, "file_path": "p6/a.jpg", "split": "dev", "captions": ["white shoes"]},  # unknown split: reported
]


def _write(root: Path, records: list[dict], *, images: str = "all", name: str = "CUHK-PEDES") -> Path:
    """The annotation file of `name` plus a small JPEG per record (`images="test"`: only the test records' images)."""
    folder_name, annotation_name, path_key = LAYOUTS[name]
    records = [{(path_key if k == "file_path" else k): v for k, v in raw.items()} for raw in records]
    folder = root / folder_name
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    annotation = folder / annotation_name
    annotation.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    rng = np.random.default_rng(0)
    for raw in records:
        if images == "test" and raw["split"] != "test":
            continue
        path = folder / "imgs" / raw[path_key]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 16, 3), dtype=np.uint8)).save(path)
    return annotation


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_fail_names_the_file_the_record_and_the_field(tmp_path, name):
    annotation = _write(tmp_path, MESSY_RECORDS, name=name)
    with pytest.raises(DatasetFormatError) as error:
        read_dataset(name, tmp_path)
    message = str(error.value)  # the first malformed item is record 1's blank second caption
    assert str(annotation) in message and "record 1 (id=2)" in message and "'captions' item 1" in message
    assert "dataset.bad_records=skip" in message


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_skip_drops_blank_captions_and_unusable_records_and_counts_them(tmp_path, caplog, name):
    _write(tmp_path, MESSY_RECORDS, name=name)
    with caplog.at_level(logging.WARNING, logger="data.readers"):
        splits = read_dataset(name, tmp_path, bad_records="skip")
    # Train: ids 1 ("a man in red", "red jacket") and 2 ("a woman"); records 2 and 3 dropped.
    assert sorted(s.caption for s in splits.train) == ["a man in red", "a woman", "red jacket"]
    assert splits.num_train_ids == 2
    # Test: 2 images of id 4, 2 queries; validation: both spellings, 2 images of id 5.
    assert splits.test.image_pids == [4, 4] and splits.test.captions == ["grey coat", "grey coat, bag"]
    assert splits.val.image_pids == [5, 5]
    assert (splits.skipped_records, splits.skipped_captions) == (2, 3)
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # Dropped: records 2 and 3; captions: record 1 item 1, record 2 item 0, record 5 item 1.
    assert "dropped 2 records and 3 captions" in warnings
    assert "1 records have split values other than" in warnings and "'dev': 1" in warnings


def test_an_id_written_as_a_numeric_string_or_float_is_that_number(tmp_path):
    records = [
        {"id": "12", "file_path": "a.jpg", "split": "train", "captions": ["x"]},
        {"id": 12.0, "file_path": "b.jpg", "split": "train", "captions": ["y"]},
        {"id": " 13 ", "file_path": "c.jpg", "split": "test", "captions": ["z"]},  # test persons are not train ones
        {"id": 13.0, "file_path": "d.jpg", "split": "test", "captions": ["w"]},
    ]
    _write(tmp_path, records)
    splits = read_dataset("CUHK-PEDES", tmp_path)
    assert splits.num_train_ids == 1 and splits.test.image_pids == [13, 13]


def test_evaluation_needs_only_the_test_images(tmp_path, demo_root):
    """`train=false` on a copy with the training and validation images absent: nothing else is looked at."""
    from lightning_data import build_datamodule

    # Ten more test people, one image each: R@10 needs ten images and ten captions.
    more = [{"id": 10 + n, "file_path": f"t{n}.jpg", "split": "test", "captions": [f"person {n}"]} for n in range(10)]
    _write(tmp_path, [r for r in MESSY_RECORDS if r["id"] in (1, 4, 5)] + more, images="test")
    shutil.copytree(demo_root / "tiny_siglip", tmp_path / "tiny_siglip")
    for policy in ("fail", "skip"):
        overrides = demo_overrides(
            tmp_path, "dataset.dataset_name=CUHK-PEDES", f"dataset.bad_images={policy}", "dataset.bad_records=skip"
        )
        datamodule = build_datamodule(compose_config("demo", overrides), stage="test")
        assert datamodule.splits.test.image_pids == [4, 4, *range(10, 20)] and not datamodule.splits.train


def _vn3k_without_validation(demo_root, root) -> set[int]:
    """A VN3K copy without validation records (as the real file is); returns its training person ids."""
    records = json.loads((demo_root / "VN3K" / "data_captions.json").read_text(encoding="utf-8"))
    records = [r for r in records if r["split"] in ("train", "test")]
    (root / "VN3K").mkdir()
    (root / "VN3K" / "data_captions.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    (root / "VN3K" / "imgs").symlink_to(demo_root / "VN3K" / "imgs")
    (root / "tiny_siglip").symlink_to(demo_root / "tiny_siglip")
    return {r["id"] for r in records if r["split"] == "train"}


def test_a_fold_is_its_share_of_the_people_left_after_the_validation_hold_out(demo_root, tmp_path):
    """ICFG-PEDES and VN3K hold validation people out of training: the fold is then `proportion` of the people who
    train (3,102 - 200 for ICFG), and every fold selects its epochs on the same validation people.
    """
    from lightning_data import build_datamodule

    all_train_ids = _vn3k_without_validation(demo_root, tmp_path)
    trains, validations = [], []
    for fold in range(4):
        overrides = ("dataset.val_identities=10", "dataset.proportion=0.25", f"dataset.fold_id={fold}")
        splits = build_datamodule(compose_config("demo", demo_overrides(tmp_path, *overrides))).splits
        trains.append({s.image_path for s in splits.train})
        validations.append(sorted(map(str, splits.val.image_paths)))
        assert splits.num_train_ids in {(len(all_train_ids) - 10) // 4, (len(all_train_ids) - 10 + 3) // 4}
    assert all(validation == validations[0] for validation in validations)
    held_out = {p for p in validations[0]}
    for index, fold in enumerate(trains):
        assert not {str(p) for p in fold} & held_out
        assert all(not fold & other for other in trains[index + 1 :])  # no person in two folds
    # four folds of a quarter cover every person left after the hold-out
    everyone = build_datamodule(compose_config("demo", demo_overrides(tmp_path, "dataset.val_identities=10"))).splits
    assert set().union(*trains) == {s.image_path for s in everyone.train}


def test_selecting_on_test_trains_every_identity_and_says_so(demo_root, tmp_path):
    """VN3K without validation records (as the real file is): the honest default holds identities out, the peers'
    protocol trains on all of them.
    """
    from lightning_data import build_datamodule
    from trainer import protocol_of

    all_train_ids = _vn3k_without_validation(demo_root, tmp_path)

    held_out = compose_config("demo", demo_overrides(tmp_path, "dataset.val_identities=10"))
    assert build_datamodule(held_out).splits.num_train_ids == len(all_train_ids) - 10
    peers = compose_config("demo", demo_overrides(tmp_path, "model_selection=test", "dataset.val_identities=0"))
    assert build_datamodule(peers).splits.num_train_ids == len(all_train_ids)
    assert "every training identity" in protocol_of(peers) and "held out" in protocol_of(held_out)
    with pytest.raises(Exception, match="model_selection=test"):  # the default without a hold-out names both fixes
        build_datamodule(compose_config("demo", demo_overrides(tmp_path, "dataset.val_identities=0")))


def test_an_evaluation_split_smaller_than_r10_is_refused_before_training(demo_root, tmp_path):
    """R@10 ranks ten images (text-to-image) and ten captions (image-to-text): a gallery of fewer stops the run at the
    first evaluation, after a whole epoch; the data module refuses it at set-up, naming the split and the fix.
    """
    from lightning_data import build_datamodule
    from utils.errors import InputError

    _vn3k_without_validation(demo_root, tmp_path)
    with pytest.raises(InputError, match=r"validation split of VN3K_VI .* has \d images.*dataset.val_identities"):
        build_datamodule(compose_config("demo", demo_overrides(tmp_path, "dataset.val_identities=1")))
    records = json.loads((tmp_path / "VN3K" / "data_captions.json").read_text(encoding="utf-8"))
    test_people = sorted({r["id"] for r in records if r["split"] == "test"})
    kept = [r for r in records if r["split"] == "train" or r["id"] == test_people[0]]
    (tmp_path / "VN3K" / "data_captions.json").write_text(json.dumps(kept, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(InputError, match=r"test split of VN3K_VI .* has \d images.*give the test split"):
        build_datamodule(compose_config("demo", demo_overrides(tmp_path, "dataset.val_identities=10")), stage="test")
