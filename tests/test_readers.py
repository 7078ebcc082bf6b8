"""Annotation readers on tiny fixture datasets written to tmp_path."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from data.readers import READERS, DatasetFormatError, EvalSplit, read_dataset

# name -> (folder, annotation file, path key, validation split value)
LAYOUTS = {
    "CUHK-PEDES": ("CUHK-PEDES", "reid_raw.json", "file_path", "val"),
    "ICFG-PEDES": ("ICFG-PEDES", "ICFG-PEDES.json", "file_path", "val"),
    "RSTPReid": ("RSTPReid", "data_captions.json", "img_path", "val"),
    "VN3K_VI": ("VN3K", "data_captions.json", "file_path", "validate"),
    "VN3K_EN": ("VN3K", "data_captions.json", "file_path", "validate"),
    "VN3K_MIXED": ("VN3K", "data_captions.json", "file_path", "validate"),
}


def record(raw_id: int, path: str, split: str, n_captions: int = 2, path_key: str = "file_path") -> dict[str, Any]:
    """An annotation record with Vietnamese ``captions`` and English ``en_captions`` (as VN3K has)."""
    return {
        "id": raw_id,
        path_key: path,
        "captions": [f"vi {path} {i}" for i in range(n_captions)],
        "en_captions": [f"en {path} {i}" for i in range(n_captions)],
        "split": split,
        "processed_tokens": [["ignored"]],
    }


def write_dataset(root: Path, name: str, records: list[Any] | str) -> Path:
    """Writes ``records`` (or raw annotation text) and one tiny PNG per record; returns the annotation path."""
    folder, annotation, path_key, _ = LAYOUTS[name]
    (root / folder / "imgs").mkdir(parents=True, exist_ok=True)
    for i, rec in enumerate(records if isinstance(records, list) else []):
        if isinstance(rec, dict) and isinstance(rec.get(path_key), str) and rec[path_key]:
            image_path = root / folder / "imgs" / rec[path_key]
            image_path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 8), (30 * i % 256, 0, 0)).save(image_path)
    text = records if isinstance(records, str) else json.dumps(records, ensure_ascii=False, indent=1)
    (root / folder / annotation).write_text(text, encoding="utf-8")
    return root / folder / annotation


def standard_records(name: str) -> list[dict[str, Any]]:
    """Train ids 7, 3, 11 (non-contiguous, unsorted) interleaved with test and validation records."""
    _, _, path_key, val_split = LAYOUTS[name]
    rows = [
        (7, "p7/a.png", "train"),
        (50, "t50/a.png", "test"),
        (3, "p3/a.png", "train"),
        (7, "p7/b.png", "train"),
        (60, "v60/a.png", val_split),
        (11, "p11/a.png", "train"),
        (50, "t50/b.png", "test"),
        (51, "t51/a.png", "test"),
    ]
    return [record(raw_id, path, split, path_key=path_key) for raw_id, path, split in rows]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_reader_builds_splits(tmp_path: Path, name: str) -> None:
    write_dataset(tmp_path, name, standard_records(name))
    splits = read_dataset(name, tmp_path)
    folder = tmp_path / LAYOUTS[name][0]
    captions_per_image = 4 if name == "VN3K_MIXED" else 2
    assert splits.name == name and splits.root == folder
    assert splits.num_train_ids == 3
    assert len(splits.train) == 4 * captions_per_image
    assert splits.summary_rows() == [
        ("train", 3, 4, 4 * captions_per_image),
        ("val", 1, 1, captions_per_image),
        ("test", 2, 3, 3 * captions_per_image),
    ]
    # Sorted remap 3 -> 0, 7 -> 1, 11 -> 2; image_id counts train records only, in file order.
    by_image = {s.image_id: (s.pid, s.image_path) for s in splits.train}
    assert by_image == {
        0: (1, folder / "imgs/p7/a.png"),
        1: (0, folder / "imgs/p3/a.png"),
        2: (1, folder / "imgs/p7/b.png"),
        3: (2, folder / "imgs/p11/a.png"),
    }
    assert splits.test.image_pids == [50, 50, 51]
    assert splits.test.image_paths == [folder / "imgs" / p for p in ("t50/a.png", "t50/b.png", "t51/a.png")]
    assert splits.test.caption_pids == [50] * 2 * captions_per_image + [51] * captions_per_image
    assert splits.val is not None and splits.val.image_pids == [60]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("VN3K_VI", ["vi p3/a.png 0", "vi p3/a.png 1"]),
        ("VN3K_EN", ["en p3/a.png 0", "en p3/a.png 1"]),
        ("VN3K_MIXED", ["en p3/a.png 0", "en p3/a.png 1", "vi p3/a.png 0", "vi p3/a.png 1"]),
        ("CUHK-PEDES", ["vi p3/a.png 0", "vi p3/a.png 1"]),
    ],
)
def test_caption_keys(tmp_path: Path, name: str, expected: list[str]) -> None:
    write_dataset(tmp_path, name, standard_records(name))
    splits = read_dataset(name, tmp_path)
    assert [s.caption for s in splits.train if s.pid == 0] == expected


def test_vietnamese_text_round_trips(tmp_path: Path) -> None:
    records = standard_records("VN3K_VI")
    records[2]["captions"] = ["Người phụ nữ mặc áo dài màu đỏ"]
    write_dataset(tmp_path, "VN3K_VI", records)
    assert [s.caption for s in read_dataset("VN3K_VI", tmp_path).train if s.pid == 0] == records[2]["captions"]


def test_icfg_zero_based_ids_and_rstp_img_path(tmp_path: Path) -> None:
    # ICFG-PEDES ids start at 0; its test persons (here 3) are not training persons.
    icfg = [record(i, f"{i}.png", "train", n_captions=1) for i in (0, 1, 2)] + [record(3, "q.png", "test", 1)]
    write_dataset(tmp_path, "ICFG-PEDES", icfg)
    splits = read_dataset("ICFG-PEDES", tmp_path)
    assert [s.pid for s in splits.train] == [0, 1, 2] and splits.val is None
    rstp = [record(5, "a.jpg", "train", path_key="img_path"), record(9, "b.jpg", "test", path_key="img_path")]
    write_dataset(tmp_path, "RSTPReid", rstp)
    assert read_dataset("RSTPReid", tmp_path).test.image_paths == [tmp_path / "RSTPReid/imgs/b.jpg"]


def test_empty_validation_split_is_none(tmp_path: Path) -> None:
    records = [r for r in standard_records("VN3K_VI") if r["split"] != "validate"]
    write_dataset(tmp_path, "VN3K_VI", records)
    assert read_dataset("VN3K_VI", tmp_path).val is None


@pytest.mark.parametrize(("name", "foreign"), [("VN3K_EN", "dev"), ("CUHK-PEDES", "gallery")])
def test_other_split_values_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, foreign: str
) -> None:
    _, _, path_key, _ = LAYOUTS[name]
    records = standard_records(name) + [record(90 + i, f"x{i}.png", foreign, path_key=path_key) for i in range(3)]
    records.append(record(99, "y.png", "query", path_key=path_key))
    write_dataset(tmp_path, name, records)
    with caplog.at_level(logging.WARNING, logger="data.readers"):
        splits = read_dataset(name, tmp_path)
    assert splits.val is not None and splits.val.image_pids == [60]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "4 records have split values other than" in warning and f"'{foreign}': 3" in warning
    assert "'query': 1" in warning


@pytest.mark.parametrize("name", ["VN3K_VI", "CUHK-PEDES"])
def test_every_validation_spelling_the_peers_write_is_the_validation_split(tmp_path: Path, name: str) -> None:
    _, _, path_key, _ = LAYOUTS[name]
    records = [r for r in standard_records(name) if r["split"] in ("train", "test")]
    spellings = ["val", "validate", "validation", "valid"]
    records += [record(70 + i, f"v{i}.png", split, path_key=path_key) for i, split in enumerate(spellings)]
    write_dataset(tmp_path, name, records)
    assert read_dataset(name, tmp_path).val.image_pids == [70, 71, 72, 73]


def test_summary_table_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_dataset(tmp_path, "RSTPReid", standard_records("RSTPReid"))
    with caplog.at_level(logging.INFO, logger="data.readers"):
        read_dataset("RSTPReid", tmp_path)
    assert any("subset" in r.getMessage() and "captions" in r.getMessage() for r in caplog.records)


def test_unknown_dataset_lists_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid names") as info:
        read_dataset("MARKET", tmp_path)
    assert all(name in str(info.value) for name in READERS)


def test_missing_folder_imgs_and_annotation(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="CUHK-PEDES") as info:
        read_dataset("CUHK-PEDES", tmp_path)
    assert str(tmp_path / "CUHK-PEDES") in str(info.value) and "reid_raw.json" in str(info.value)
    (tmp_path / "CUHK-PEDES").mkdir()
    with pytest.raises(FileNotFoundError, match="imgs"):
        read_dataset("CUHK-PEDES", tmp_path)
    (tmp_path / "CUHK-PEDES" / "imgs").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        read_dataset("CUHK-PEDES", tmp_path)
    assert str(tmp_path / "CUHK-PEDES" / "reid_raw.json") in str(info.value)


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    annotation = write_dataset(tmp_path, "VN3K_VI", '[\n{"id": 1,\n "file_path": "a.png" "split": "train"}\n]')
    with pytest.raises(DatasetFormatError, match="line 3") as info:
        read_dataset("VN3K_VI", tmp_path)
    assert str(annotation) in str(info.value)


def test_top_level_must_be_list(tmp_path: Path) -> None:
    annotation = write_dataset(tmp_path, "VN3K_VI", '{"images": []}')
    with pytest.raises(DatasetFormatError, match="JSON list") as info:
        read_dataset("VN3K_VI", tmp_path)
    assert str(annotation) in str(info.value)


def _drop(key: str) -> Any:
    return lambda rec: {k: v for k, v in rec.items() if k != key}


def _set(key: str, value: Any) -> Any:
    return lambda rec: {**rec, key: value}


@pytest.mark.parametrize(
    ("name", "corrupt", "key", "expected"),
    [
        ("CUHK-PEDES", _drop("id"), "id", "missing"),
        ("CUHK-PEDES", _set("id", "seven"), "id", "must be a person id number"),
        ("CUHK-PEDES", _set("id", True), "id", "must be a person id number"),
        ("CUHK-PEDES", _set("id", 7.5), "id", "must be a person id number"),
        ("CUHK-PEDES", _drop("file_path"), "file_path", "missing"),
        ("RSTPReid", _drop("img_path"), "img_path", "missing"),
        ("CUHK-PEDES", _set("file_path", 12), "file_path", "must be str"),
        ("CUHK-PEDES", _set("file_path", ""), "file_path", "non-empty"),
        ("CUHK-PEDES", _drop("captions"), "captions", "missing"),
        ("VN3K_EN", _drop("en_captions"), "en_captions", "missing"),
        ("VN3K_MIXED", _drop("en_captions"), "en_captions", "missing"),
        ("CUHK-PEDES", _set("captions", "a man"), "captions", "must be list"),
        ("CUHK-PEDES", _set("captions", []), "captions", "no non-empty caption"),
        ("CUHK-PEDES", _set("captions", ["ok", "   "]), "captions", "item 1 must be a non-empty caption"),
        ("CUHK-PEDES", _set("captions", ["ok", None]), "captions", "item 1 must be a non-empty caption"),
        ("CUHK-PEDES", _set("captions", [""]), "captions", "item 0"),
        ("CUHK-PEDES", _drop("split"), "split", "missing"),
        ("CUHK-PEDES", _set("split", 1), "split", "must be str"),
    ],
)
def test_bad_record_names_file_record_and_key(tmp_path: Path, name: str, corrupt: Any, key: str, expected: str) -> None:
    records = standard_records(name)
    records[3] = corrupt(records[3])
    annotation = write_dataset(tmp_path, name, records)
    with pytest.raises(DatasetFormatError, match=expected) as info:
        read_dataset(name, tmp_path)
    message = str(info.value)
    assert str(annotation) in message and "record 3" in message and f"'{key}'" in message
    assert "dataset.bad_records=skip" in message


def test_record_must_be_object(tmp_path: Path) -> None:
    annotation = write_dataset(tmp_path, "CUHK-PEDES", [*standard_records("CUHK-PEDES"), ["not", "a", "dict"]])
    with pytest.raises(DatasetFormatError, match="record 8: must be a JSON object") as info:
        read_dataset("CUHK-PEDES", tmp_path)
    assert str(annotation) in str(info.value)


@pytest.mark.parametrize("missing", ["train", "test"])
def test_train_and_test_are_required(tmp_path: Path, missing: str) -> None:
    annotation = write_dataset(tmp_path, "VN3K_VI", [r for r in standard_records("VN3K_VI") if r["split"] != missing])
    with pytest.raises(DatasetFormatError, match=f"'split' == '{missing}'") as info:
        read_dataset("VN3K_VI", tmp_path)
    assert str(annotation) in str(info.value)


def test_query_pid_without_gallery_image() -> None:
    with pytest.raises(ValueError, match=r"query pids \[4\]"):
        EvalSplit(image_pids=[1, 2], image_paths=[Path("a"), Path("b")], caption_pids=[1, 4], captions=["x", "y"])
    with pytest.raises(ValueError, match="parallel"):
        EvalSplit(image_pids=[1], image_paths=[], caption_pids=[], captions=[])


# ---------------------------------------------------------------- protocol: identity-disjoint splits, unique gallery
def test_a_person_in_two_splits_is_refused_under_either_policy(tmp_path: Path) -> None:
    # CUHK-PEDES (11,003 / 1,000 / 1,000 ids), ICFG-PEDES and RSTPReid are identity-disjoint: test persons are unseen.
    records = standard_records("CUHK-PEDES")
    records[1]["id"] = 7  # a test image of training person 7
    annotation = write_dataset(tmp_path, "CUHK-PEDES", records)
    for policy in ("fail", "skip"):
        with pytest.raises(DatasetFormatError) as info:
            read_dataset("CUHK-PEDES", tmp_path, bad_records=policy)
        message = str(info.value)
        assert str(annotation) in message and "train and test share 1 ids, first [7]" in message
        assert "each person one split" in message and "\n" not in message


def test_shared_ids_are_counted_and_the_first_few_quoted_per_pair_of_splits(tmp_path: Path) -> None:
    # Train persons 1..7; test repeats 1..6 (6 shared) and validation repeats 7 (1 shared with train, none with test).
    records = [record(pid, f"train/{pid}.png", "train") for pid in range(1, 8)]
    records += [record(pid, f"test/{pid}.png", "test") for pid in range(1, 7)]
    records += [record(7, "val/7.png", "val")]
    write_dataset(tmp_path, "ICFG-PEDES", records)
    with pytest.raises(DatasetFormatError) as info:
        read_dataset("ICFG-PEDES", tmp_path)
    message = str(info.value)
    assert "train and val share 1 ids, first [7]" in message
    assert "train and test share 6 ids, first [1, 2, 3, 4, 5]" in message and "val and test" not in message


@pytest.mark.parametrize("split", ["test", "val"])
def test_an_evaluation_split_listing_an_image_twice_is_refused(tmp_path: Path, split: str) -> None:
    # Every real annotation file lists each image once; a second gallery entry would count twice in recall and mAP.
    records = standard_records("RSTPReid")
    original = next(r for r in records if r["split"] == split)
    records.append({**original, "captions": ["another description of the same image"]})
    annotation = write_dataset(tmp_path, "RSTPReid", records)
    with pytest.raises(DatasetFormatError) as info:
        read_dataset("RSTPReid", tmp_path)
    message = str(info.value)
    assert str(annotation) in message and f"the {split} split lists 1 images more than once" in message
    assert "'img_path'" in message and str(tmp_path / "RSTPReid" / "imgs" / original["img_path"]) in message


# ---------------------------------------------------------------- skip: the gallery keeps every evaluation image
# How test image t50/a.png loses every caption, and how many dropped captions that counts (one per unusable item; a
# missing caption list counts as one); training image p3/a.png adds one more (its single null caption).
UNUSABLE_CAPTIONS = [(["", "   "], 2), ([], 0), (None, 1)]


@pytest.mark.parametrize(("unusable", "dropped"), UNUSABLE_CAPTIONS, ids=["blank", "empty-list", "missing-key"])
def test_skip_keeps_an_evaluation_image_without_usable_captions_in_the_gallery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, unusable: list[str] | None, dropped: int
) -> None:
    records = standard_records("CUHK-PEDES")
    records[1] = _drop("captions")(records[1]) if unusable is None else _set("captions", unusable)(records[1])
    records[2]["captions"] = [None]  # training image p3/a.png: nothing to train on, dropped
    write_dataset(tmp_path, "CUHK-PEDES", records)
    with caplog.at_level(logging.WARNING, logger="data.readers"):
        splits = read_dataset("CUHK-PEDES", tmp_path, bad_records="skip")
    folder = tmp_path / "CUHK-PEDES" / "imgs"
    # The gallery is every test image of the file; t50/a.png yields no query, t50/b.png and t51/a.png two each.
    assert splits.test.image_paths == [folder / p for p in ("t50/a.png", "t50/b.png", "t51/a.png")]
    assert splits.test.caption_pids == [50, 50, 51, 51]
    assert splits.num_train_ids == 2 and folder / "p3/a.png" not in {s.image_path for s in splits.train}
    assert (splits.skipped_records, splits.skipped_captions) == (1, dropped + 1)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"dropped 1 records and {dropped + 1} captions (1 validation/test images stay in the gallery" in warning


def test_skip_refuses_an_evaluation_person_left_without_any_caption(tmp_path: Path) -> None:
    # Image-to-text retrieval ranks each gallery image against the captions: person 51's only image has none left.
    records = standard_records("CUHK-PEDES")
    records[7]["captions"] = [""]
    annotation = write_dataset(tmp_path, "CUHK-PEDES", records)
    with pytest.raises(DatasetFormatError) as info:
        read_dataset("CUHK-PEDES", tmp_path, bad_records="skip")
    message = str(info.value)
    assert str(annotation) in message and "test persons (key 'id') [51] (1 in all)" in message


def test_fail_still_stops_at_a_blank_test_caption(tmp_path: Path) -> None:
    records = standard_records("CUHK-PEDES")
    records[1]["captions"] = [""]
    write_dataset(tmp_path, "CUHK-PEDES", records)
    with pytest.raises(DatasetFormatError, match=r"record 1 \(id=50\): key 'captions' item 0"):
        read_dataset("CUHK-PEDES", tmp_path)


# ---------------------------------------------------------------- split values and the dataset root
def test_split_values_ignore_case_and_surrounding_spaces(tmp_path: Path) -> None:
    spelled = {"train": "Train", "test": "TEST ", "validate": " Validate"}
    records = [{**r, "split": spelled[r["split"]]} for r in standard_records("VN3K_VI")]
    write_dataset(tmp_path, "VN3K_VI", records)
    splits = read_dataset("VN3K_VI", tmp_path)
    # The same splits as the lower-case file: train ids 3, 7, 11 (4 images), validation id 60, test 50 (2) and 51.
    assert splits.summary_rows() == [("train", 3, 4, 8), ("val", 1, 1, 2), ("test", 2, 3, 6)]


def test_a_missing_split_names_the_values_the_file_has(tmp_path: Path) -> None:
    records = [
        {**r, "split": "training" if r["split"] == "train" else r["split"]} for r in standard_records("RSTPReid")
    ]
    annotation = write_dataset(tmp_path, "RSTPReid", records)
    with pytest.raises(DatasetFormatError) as info:
        read_dataset("RSTPReid", tmp_path)
    message = str(info.value)
    assert str(annotation) in message and "'split' == 'train'" in message
    assert "'training': 4" in message and "'test': 3" in message and "set each record's 'split' to train" in message


def test_a_root_that_is_the_dataset_folder_names_dataset_root_dir_and_its_parent(tmp_path: Path) -> None:
    write_dataset(tmp_path, "CUHK-PEDES", standard_records("CUHK-PEDES"))
    folder = tmp_path / "CUHK-PEDES"
    for name in ("CUHK-PEDES", "RSTPReid"):  # a sibling dataset is looked for next to it, under the parent too
        with pytest.raises(FileNotFoundError) as info:
            read_dataset(name, folder)
        message = str(info.value)
        assert f"dataset_root_dir={folder} is the CUHK-PEDES dataset folder itself" in message
        assert f"set dataset_root_dir={tmp_path}," in message


# ---------------------------------------------------------------- a caption key that no record has
@pytest.mark.parametrize(("name", "key"), [("VN3K_EN", "en_captions"), ("VN3K_MIXED", "en_captions")])
def test_a_caption_key_absent_from_every_record_names_the_variant_to_use(tmp_path: Path, name: str, key: str) -> None:
    records = [{k: v for k, v in r.items() if k != key} for r in standard_records(name)]
    annotation = write_dataset(tmp_path, name, records)
    for policy in ("fail", "skip"):  # skip would drop every record: the fix is the VN3K_VI variant instead
        with pytest.raises(DatasetFormatError) as info:
            read_dataset(name, tmp_path, bad_records=policy)
        message = str(info.value)
        assert str(annotation) in message and f"no record has key '{key}'" in message
        assert "use dataset=vn3k_vi" in message and "bad_records=skip" not in message
    # The suggestion is the config group that selects VN3K_VI, and that file reads these records.
    assert "dataset_name: VN3K_VI" in (Path(__file__).parents[1] / "config/dataset/vn3k_vi.yaml").read_text()
    assert read_dataset("VN3K_VI", tmp_path).num_train_ids == 3


def test_a_renamed_caption_key_is_named_with_the_keys_the_records_have(tmp_path: Path) -> None:
    records = [{("caption" if k == "captions" else k): v for k, v in r.items()} for r in standard_records("CUHK-PEDES")]
    annotation = write_dataset(tmp_path, "CUHK-PEDES", records)
    with pytest.raises(DatasetFormatError) as info:
        read_dataset("CUHK-PEDES", tmp_path, bad_records="skip")
    message = str(info.value)
    assert str(annotation) in message and "no record has key 'captions'" in message
    assert "name each record's caption list 'captions'" in message and "'caption'" in message
