"""`preflight=true`: the report a user reads before a long run, on the tiny checkpoint and the demo data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from preflight import run_preflight
from tests.conftest import compose_config, demo_overrides

ROOT = Path(__file__).resolve().parents[1]


def _counts_from_the_file(root: Path) -> dict[str, tuple[int, int, int]]:
    """(images, identities, captions) per split, counted straight from the annotation JSON."""
    records = json.loads((root / "VN3K" / "data_captions.json").read_text(encoding="utf-8"))
    images, ids, captions = defaultdict(int), defaultdict(set), defaultdict(int)
    for record in records:
        split = {"validate": "val"}.get(record["split"], record["split"])
        images[split] += 1
        ids[split].add(record["id"])
        captions[split] += len(record["captions"])
    return {split: (images[split], len(ids[split]), captions[split]) for split in images}


def test_the_report_covers_data_checkpoint_tokens_and_geometry(demo_root, capsys):
    status = run_preflight(compose_config("demo", demo_overrides(demo_root)))
    report = capsys.readouterr().out
    assert status == 0 and "Preflight passed" in report
    for split, (images, identities, captions) in _counts_from_the_file(demo_root).items():
        line = next(row for row in report.splitlines() if row.strip().startswith(split + " "))
        assert f"{images} images" in line and f"{identities} identities" in line and f"{captions} captions" in line
        assert f"{images} images found, 0 missing" in line
    assert "temperature exp(logit_scale) =" in report and "receives gradients: True" in report
    assert report.count("last position '</s>'") == 5 and "lower-cases: True" in report
    assert "t2i R1 without the text mask" in report and "t2i R1 with the text mask" in report
    assert "s_p" in report and "1 - m = 0.75" in report
    assert "identity sampler (chunks), one epoch:" in report and "dropped" in report


def test_a_missing_image_fails_the_preflight_and_names_it(demo_root, tmp_path, capsys):
    shutil.copytree(demo_root / "VN3K", tmp_path / "VN3K")
    (tmp_path / "tiny_siglip").symlink_to(demo_root / "tiny_siglip")
    victim = sorted((tmp_path / "VN3K" / "imgs").rglob("*.png"))[0]
    victim.unlink()
    status = run_preflight(compose_config("demo", demo_overrides(tmp_path)))
    report = capsys.readouterr().out
    assert status == 2 and "FAILED" in report and str(victim) in report


@pytest.mark.slow  # a subprocess; the report itself is tested in-process above
def test_the_command_line_trains_nothing(demo_root, tmp_path):
    command = [
        sys.executable,
        "trainer.py",
        "-cn",
        "demo",
        *demo_overrides(demo_root, "preflight=true"),
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Preflight passed" in done.stdout
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "results.json").exists()
