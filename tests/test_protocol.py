"""Evaluation protocol: identity folds, the CUHK + VN3K mix, validation-only selection, seed sweeps."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.readers import DatasetSplits, EvalSplit, TrainSample
from data.subsets import identity_fold, ten_percent_cuhk_vn3k_mix
from lightning_data import build_datamodule
from tests.conftest import compose_config, demo_overrides

ROOT = Path(__file__).resolve().parents[1]


def _splits(num_ids: int = 20) -> DatasetSplits:
    train = [
        TrainSample(pid=p, image_id=p * 2 + k, image_path=Path(f"{p}_{k}.png"), caption=f"c{p}{k}{c}")
        for p in range(num_ids)
        for k in range(2)
        for c in range(2)
    ]
    test = EvalSplit(image_pids=[0], image_paths=[Path("t.png")], caption_pids=[0], captions=["t"])
    return DatasetSplits(name="X", root=Path("."), train=train, val=None, test=test)


def test_identity_folds_partition_people_not_captions():
    folds = [identity_fold(_splits(), 0.25, k, seed=3).train for k in range(4)]
    images = [{s.image_path for s in fold} for fold in folds]
    for i in range(4):
        assert len({s.image_path.stem.split("_")[0] for s in folds[i]}) == 5  # 5 of 20 people
        assert sorted({s.pid for s in folds[i]}) == list(range(5))  # contiguous pids per fold
        for j in range(i + 1, 4):
            assert not images[i] & images[j]  # a person's images never appear in two folds
    assert set().union(*images) == {s.image_path for s in _splits().train}


def test_ten_folds_of_a_tenth_cover_every_person_once_when_the_count_does_not_divide():
    # 23 people in ten folds: sizes 2 or 3, no one left out (int(23 * 0.1) = 2 per fold would drop 3 people).
    people = [
        {s.image_path.stem.split("_")[0] for s in identity_fold(_splits(23), 0.1, k, seed=1).train} for k in range(10)
    ]
    assert sorted(len(fold) for fold in people) == [2] * 7 + [3] * 3
    assert len(set().union(*people)) == 23 and sum(map(len, people)) == 23


@pytest.mark.parametrize("proportion, fold", [(0.25, 4), (1.5, 0), (0.0, 0)])
def test_identity_fold_rejects_bad_arguments(proportion, fold):
    with pytest.raises((ValueError, ZeroDivisionError)):
        identity_fold(_splits(), proportion, fold, seed=0)


def _cuhk_and_vn3k(demo_root, root, images_per_person: int = 1):
    """CUHK-PEDES with people 1-20 train, 21-25 val, 26-30 test (`images_per_person` images each), plus VN3K."""
    cuhk = root / "CUHK-PEDES"
    (cuhk / "imgs").mkdir(parents=True)
    source = next((demo_root / "VN3K" / "imgs").rglob("*.png"))
    records = []
    for person in range(1, 31):
        split = "train" if person <= 20 else ("val" if person <= 25 else "test")
        for image in range(images_per_person):
            name = f"{person}_{image}.png"
            (cuhk / "imgs" / name).write_bytes(source.read_bytes())
            records.append({"id": person, "file_path": name, "captions": [f"person {person}"], "split": split})
    (cuhk / "reid_raw.json").write_text(json.dumps(records))
    (root / "VN3K").symlink_to(demo_root / "VN3K")


def test_ten_percent_mix_joins_cuhk_and_vn3k_without_shared_ids(demo_root, tmp_path):
    _cuhk_and_vn3k(demo_root, tmp_path)
    mixed = ten_percent_cuhk_vn3k_mix(tmp_path, seed=0)
    cuhk_train = [s for s in mixed.train if "CUHK" in str(s.image_path)]
    vn3k_train = [s for s in mixed.train if "VN3K" in str(s.image_path)]
    assert len({s.pid for s in cuhk_train}) == 2  # 10 % of 20 training people
    assert not {s.pid for s in cuhk_train} & {s.pid for s in vn3k_train}
    assert sorted({s.pid for s in mixed.train}) == list(range(len({s.pid for s in mixed.train})))
    assert all("VN3K" in str(p) for p in mixed.test.image_paths) and len(set(mixed.val.image_pids)) == 5


def test_the_original_mix_takes_ten_percent_of_images_and_tests_on_both(demo_root, tmp_path):
    """20 training people x 4 images = 80 CUHK training images: 10 % is 8 images (one caption each)."""
    _cuhk_and_vn3k(demo_root, tmp_path, images_per_person=4)
    mixed = ten_percent_cuhk_vn3k_mix(tmp_path, seed=0, form="images")
    cuhk_train = [s for s in mixed.train if "CUHK" in str(s.image_path)]
    assert len(cuhk_train) == 8 and len({s.image_path for s in cuhk_train}) == 8
    vn3k = json.loads((demo_root / "VN3K" / "data_captions.json").read_text(encoding="utf-8"))
    vn3k_test_images = sum(r["split"] == "test" for r in vn3k)
    # Test: CUHK's 5 test people x 4 images, then VN3K's test images; no VN3K person takes a CUHK id.
    assert len(mixed.test.image_paths) == 20 + vn3k_test_images
    cuhk_ids, vn3k_ids = set(mixed.test.image_pids[:20]), set(mixed.test.image_pids[20:])
    assert cuhk_ids == {26, 27, 28, 29, 30} and min(vn3k_ids) > 30
    parity = compose_config("demo", ["dataset=ten_percent_cuhk_vn3k_mix", "parity=seed"])
    assert parity.dataset.mix_form == "images"


def test_validation_loaders_use_the_validation_split_unless_parity_is_asked(demo_root):
    datamodule = build_datamodule(compose_config("demo", demo_overrides(demo_root)))
    splits = datamodule.splits
    gallery = datamodule.val_dataloader()[0].dataset
    assert len(gallery) == len(splits.val.image_paths) != len(splits.test.image_paths)
    assert not set(splits.val.image_paths) & set(splits.test.image_paths)
    assert not set(splits.val.image_paths) & {s.image_path for s in splits.train}
    parity = build_datamodule(compose_config("demo", demo_overrides(demo_root, "model_selection=test")))
    assert len(parity.val_dataloader()[0].dataset) == len(splits.test.image_paths)


@pytest.mark.slow  # three demo runs through the sweep launcher
def test_seed_sweep_writes_a_mean_std_table(demo_root, tmp_path):
    """`scripts/seed_sweep.py`: one multirun over the seeds, their states, then the mean +- std table."""
    command = [
        sys.executable,
        "scripts/seed_sweep.py",
        "--config",
        "demo",
        "--seeds",
        "0",
        "1",
        "--out",
        str(tmp_path),
        "--",
        *demo_overrides(demo_root),
        "+trainer.fast_dev_run=true",
        "dataset.test_batch_size=512",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "=== 2 job(s): 2 finished, 0 failed" in done.stdout
    with (tmp_path / "aggregate.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert {row["weights"] for row in rows} == {"selected", "last"} and {row["seeds"] for row in rows} == {"2"}
    jobs = [json.loads((p.parent / "sweep_job.json").read_text()) for p in tmp_path.glob("*/results.json")]
    assert sorted(o for job in jobs for o in job["overrides"] if o.startswith("seed=")) == ["seed=0", "seed=1"]
