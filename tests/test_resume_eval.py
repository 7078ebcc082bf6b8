"""Resuming reproduces an uninterrupted run; a checkpoint evaluates on another language without a training split."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from tests.conftest import compose_config, demo_overrides
from trainer import evaluate, train

ROOT = Path(__file__).resolve().parents[1]


def _losses(run_dir: Path) -> dict[int, float]:
    """train/total_loss per global step from the CSV logger."""
    losses = {}
    for path in (run_dir / "csv").rglob("metrics.csv"):
        with path.open() as file:
            for row in csv.DictReader(file):
                if row.get("train/total_loss"):
                    losses[int(row["step"])] = float(row["train/total_loss"])
    return losses


class _StopAfterFirstEpoch(Callback):
    """Interrupt a run after its first epoch, as a crash would (its last.ckpt is then the resume point)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_resume_from_a_mid_run_checkpoint_continues_the_same_run(demo_root, tmp_path):
    overrides = demo_overrides(
        demo_root, "trainer.max_epochs=2", "dataset.batch_size=16", "trainer.log_every_n_steps=1"
    )
    full = train(compose_config("demo", overrides), tmp_path / "a")
    train(compose_config("demo", overrides), tmp_path / "b", callbacks=[_StopAfterFirstEpoch()])
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    resumed = train(compose_config("demo", [*overrides, f"ckpt_path={last}"]), tmp_path / "c")
    uninterrupted, continued = _losses(tmp_path / "a"), _losses(tmp_path / "c")
    later_steps = sorted(step for step in continued if step in uninterrupted)
    assert len(later_steps) > 5 and min(later_steps) > 0
    for step in later_steps:
        assert continued[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), step
    # The last validation (same final weights) is identical; the "best" checkpoint each run tests may differ because
    # a resumed run in a new folder starts best-tracking afresh (Lightning reloads it only in the same dirpath).
    assert resumed["val"] == full["val"]


def test_checkpoint_evaluates_on_another_language_without_the_training_split(demo_root, tmp_path):
    trained = train(
        compose_config("demo", demo_overrides(demo_root, "+trainer.fast_dev_run=false", "trainer.max_epochs=1")),
        tmp_path / "run",
    )
    # A test-only copy of the dataset, read through its English captions.
    test_only = tmp_path / "test_only"
    shutil.copytree(demo_root / "VN3K", test_only / "VN3K")
    annotation = test_only / "VN3K" / "data_captions.json"
    records = [r for r in json.loads(annotation.read_text()) if r["split"] == "test"]
    annotation.write_text(json.dumps(records, ensure_ascii=False))
    cfg = compose_config(
        "demo",
        demo_overrides(
            test_only,
            "dataset.dataset_name=VN3K_EN",
            "train=false",
            f"ckpt_path={trained['best_checkpoint']}",
        ),
    )
    results = evaluate(cfg, tmp_path / "eval")
    assert results["dataset"] == "VN3K_EN" and set(results["test"]) == {"t2i", "i2t"}
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["test"] == results["test"]


def test_evaluation_needs_an_existing_checkpoint(demo_root, tmp_path):
    from utils.config import ConfigError

    with pytest.raises(ConfigError, match="ckpt_path"):
        evaluate(compose_config("demo", demo_overrides(demo_root, "train=false", "ckpt_path=nope.ckpt")), tmp_path)


def _script(name: str, strategy: str, demo_root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    overrides = demo_overrides(demo_root)
    command = [
        "bash",
        name,
        strategy,
        "--config",
        "demo",
        *overrides,
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        f"hydra.sweep.dir={tmp_path}",
    ]
    return subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "UV_NO_SYNC": "1"},
    )


def test_run_cir_loss_trains_one_strategy_with_lora_on_the_demo(demo_root, tmp_path):
    done = _script("run_cir_loss.sh", "auxiliary_cross", demo_root, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "=== 1 job(s): 1 finished, 0 failed" in done.stdout
    assert len(list(tmp_path.glob("*/results.json"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("script", ["run_cir_loss.sh", "run_cir_full.sh"])
def test_scripts_run_all_five_strategies_on_the_demo(script, demo_root, tmp_path):
    done = _script(script, "all", demo_root, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "=== 5 job(s): 5 finished, 0 failed" in done.stdout
