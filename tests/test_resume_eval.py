"""A checkpoint evaluates on another language without a training split; the experiment scripts run.

Resuming (mid-epoch, in the run folder, after a SLURM requeue) is tested in test_requeue.py, after SIGTERM and Ctrl-C
in test_faults.py.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import compose_config, demo_overrides
from trainer import evaluate, train

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.slow  # the slow run trains all five strategies through both scripts
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
