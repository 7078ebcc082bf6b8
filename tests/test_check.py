"""`python -m data.check` (run by setup.sh): an absent dataset folder is missing and not fatal; a folder that is there
but laid out wrongly is malformed and makes the exit status non-zero, as setup.sh's header promises. Every reader is
reported, so each VN3K variant gets its own line.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data.check import check_dataset, main
from tests.test_readers import standard_records, write_dataset

#: The readers data.check reports, one line each (README "Real datasets": the VN3K folder serves three variants).
READERS = ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid", "VN3K_VI", "VN3K_EN", "VN3K_MIXED")


def report(root: Path, capsys: pytest.CaptureFixture) -> tuple[int, dict[str, tuple[str, str]]]:
    """The exit status and `{dataset: (status, detail)}` of `python -m data.check --root root`."""
    status = main(["--root", str(root)])
    rows = [line.split(maxsplit=2) for line in capsys.readouterr().out.splitlines()]
    return status, {name: (state, detail) for name, state, detail in rows}


def test_no_dataset_folder_is_missing_for_every_reader_and_not_fatal(tmp_path: Path, capsys) -> None:
    status, rows = report(tmp_path, capsys)
    assert status == 0 and list(rows) == list(READERS)
    assert {state for state, _ in rows.values()} == {"missing"}


def test_a_misnamed_image_folder_is_malformed_and_fails_the_check(tmp_path: Path, capsys) -> None:
    write_dataset(tmp_path, "CUHK-PEDES", standard_records("CUHK-PEDES"))
    folder = tmp_path / "CUHK-PEDES"
    (folder / "imgs").rename(folder / "images")
    status, rows = report(tmp_path, capsys)
    state, detail = rows["CUHK-PEDES"]
    assert status == 1 and state == "malformed"
    assert f"image folder {folder / 'imgs'} not found" in detail and "'images/'" in detail
    assert rows["ICFG-PEDES"][0] == "missing"


def test_a_misnamed_annotation_file_is_malformed_and_names_the_expected_one(tmp_path: Path) -> None:
    annotation = write_dataset(tmp_path, "ICFG-PEDES", standard_records("ICFG-PEDES"))
    annotation.rename(annotation.with_name("ICFG_PEDES.json"))
    state, detail = check_dataset("ICFG-PEDES", tmp_path)
    assert state == "malformed"
    assert f"annotation file {annotation} not found" in detail and "'ICFG_PEDES.json'" in detail


def test_each_vn3k_variant_is_checked_on_its_own_caption_key(tmp_path: Path, capsys) -> None:
    records = [{k: v for k, v in r.items() if k != "en_captions"} for r in standard_records("VN3K_VI")]
    write_dataset(tmp_path, "VN3K_VI", records)
    status, rows = report(tmp_path, capsys)
    assert status == 1 and rows["VN3K_VI"][0] == "ok"
    for variant in ("VN3K_EN", "VN3K_MIXED"):
        state, detail = rows[variant]
        assert state == "malformed" and "no record has key 'en_captions'" in detail
        assert "use dataset=vn3k_vi" in detail


def test_a_complete_vn3k_is_ok_for_every_variant(tmp_path: Path, capsys) -> None:
    write_dataset(tmp_path, "VN3K_VI", standard_records("VN3K_VI"))
    status, rows = report(tmp_path, capsys)
    assert status == 0
    assert [rows[variant][0] for variant in ("VN3K_VI", "VN3K_EN", "VN3K_MIXED")] == ["ok", "ok", "ok"]
    shutil.rmtree(tmp_path / "VN3K" / "imgs")  # the folder is there, its images are not: malformed, not missing
    assert check_dataset("VN3K_EN", tmp_path)[0] == "malformed"


def test_a_test_only_annotation_serves_evaluation_and_is_not_malformed(tmp_path: Path, capsys) -> None:
    # Evaluating a checkpoint (train=false) reads only test records: such a folder is usable, for that only.
    write_dataset(tmp_path, "RSTPReid", [r for r in standard_records("RSTPReid") if r["split"] == "test"])
    status, rows = report(tmp_path, capsys)
    state, detail = rows["RSTPReid"]
    assert status == 0 and state == "test-only"
    assert "no training records" in detail and "train=false" in detail
