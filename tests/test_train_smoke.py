"""End to end: the demo config trains, selects on validation, tests, and beats chance."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from data.readers import read_dataset
from lightning_training_logs import NonFiniteLossError
from tests.conftest import compose_config, demo_overrides
from trainer import train
from utils.metrics import chance_rank1


@pytest.mark.parametrize("scoring", ["cosine", "dot"])
def test_fast_dev_run_executes_a_training_and_evaluation_step(demo_root, tmp_path, scoring):
    cfg = compose_config(
        "demo",
        demo_overrides(
            demo_root, "+trainer.fast_dev_run=true", "dataset.test_batch_size=512", f"eval_scoring={scoring}"
        ),
    )
    results = train(cfg, tmp_path)
    assert {"val", "test", "chance_t2i_R1"} <= set(results)
    assert set(results["test"]) == {"t2i", "i2t"}


def test_lora_under_bf16_mixed_keeps_frozen_linears_in_bf16_and_trains_the_adapters(demo_root, tmp_path, caplog):
    class Weights(Callback):
        def on_train_end(self, trainer, pl_module):
            self.dtypes = {name: p.dtype for name, p in pl_module.model.named_parameters()}
            self.trainable = {name for name, p in pl_module.model.named_parameters() if p.requires_grad}

    weights = Weights()
    overrides = (
        "+trainer.fast_dev_run=true",
        "++trainer.precision=bf16-mixed",
        "lora=cir",
        "dataset.test_batch_size=512",
    )
    with caplog.at_level("INFO"):
        results = train(compose_config("demo", demo_overrides(demo_root, *overrides)), tmp_path, callbacks=[weights])
    assert set(results["test"]) == {"t2i", "i2t"}
    half = {name for name, dtype in weights.dtypes.items() if dtype == torch.bfloat16}
    assert any(name.endswith("q_proj.base_layer.weight") for name in half)
    assert not half & weights.trainable and any("lora_A" in name for name in weights.trainable)
    assert all(weights.dtypes[name] == torch.float32 for name in weights.trainable)
    assert (
        f"{sum(name.endswith('.weight') for name in half)} frozen linear layers stored in torch.bfloat16" in caplog.text
    )


def test_short_demo_run_beats_chance_and_keeps_best_and_last_checkpoints(demo_root, tmp_path):
    cfg = compose_config("demo", demo_overrides(demo_root, "trainer.max_epochs=10", "dataset.batch_size=16"))
    results = train(cfg, tmp_path)
    test = read_dataset("VN3K_VI", demo_root).test
    chance = chance_rank1(test.caption_pids, test.image_pids)
    # Ten epochs on 120 identities are noisy: seeds 2307, 1, 2 gave test t2i R1 of 2.0 to 2.5 times chance (6.8 to
    # 8.6 % against 3.4 %); untrained weights give chance.
    assert results["test"]["t2i"]["R1"] > 1.5 * chance, (results, chance)
    names = {p.name for p in Path(tmp_path, "checkpoints").iterdir()}
    assert "last.ckpt" in names and any(
        name.startswith("epoch") and "-val_score" in name and "=" not in name for name in names
    )
    # last.ckpt is the final epoch even when validation stopped improving earlier (the resume point).
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 9
    assert (tmp_path / "csv").is_dir()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test"]["t2i"]["R1"] == results["test"]["t2i"]["R1"]
    # The validation table beside the selected checkpoint's test table is that checkpoint's: its epoch and t2i R1 are
    # in the file name Lightning gave it (epochNN-val_scoreS.ckpt); val_last is the last epoch's.
    best = re.fullmatch(r"epoch(\d+)-val_score([\d.]+)\.ckpt", Path(results["best_checkpoint"]).name)
    assert saved["selected_epoch"] == int(best[1])
    assert saved["val"]["t2i"]["R1"] == pytest.approx(float(best[2]), abs=0.006)
    csv_rows = _csv_rows(tmp_path, "val/t2i_R1")
    assert saved["val_last"]["t2i"]["R1"] == pytest.approx(float(csv_rows[-1]["val/t2i_R1"]), rel=1e-6)


def test_hydra_entry_point_with_offline_wandb(demo_root, tmp_path):
    """`trainer.py -cn demo` as a user runs it: Hydra run folder, W&B offline, result table on the console."""
    import os
    import subprocess
    import sys

    overrides = [o for o in demo_overrides(demo_root) if not o.startswith("logger=")]
    command = [
        sys.executable,
        "trainer.py",
        "-cn",
        "demo",
        *overrides,
        "logger=wandb",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "dataset.test_batch_size=512",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "WANDB_SILENT": "true"}
    done = subprocess.run(command, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "chance t2i R1:" in output and "| Task |" in output and "| t2i  |" in output
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert (tmp_path / ".hydra" / "config.yaml").is_file()


def test_irra_losses_with_mlm_and_id_train_through_the_full_pipeline(demo_root, tmp_path):
    """loss=irra adds a mask token (the text embedding grows by one row), an ID classifier and the MLM head."""
    cfg = compose_config(
        "demo",
        demo_overrides(
            demo_root, "loss=irra", "loss.cmt_depth=1", "+trainer.fast_dev_run=true", "dataset.test_batch_size=512"
        ),
    )
    results = train(cfg, tmp_path)
    assert set(results["test"]) == {"t2i", "i2t"}


class _PoisonLossAt(Callback):
    """From global step `step` on, the objective's N-ITC term is NaN (as after an overflow)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not hasattr(pl_module.objective, "poisoned"):
            objective = pl_module.objective

            def poisoned(feats, context):
                terms = objective(feats, context)
                terms["nitc_loss"] = terms["nitc_loss"] * float("nan")
                return terms

            poisoned.poisoned = True
            poisoned.settings = objective.settings
            poisoned.needs_aug_view, poisoned.needs_ss_views = objective.needs_aug_view, objective.needs_ss_views
            poisoned.needs_raw_features = objective.needs_raw_features
            pl_module.objective = poisoned


def test_non_finite_loss_stops_the_run_naming_the_first_step_and_terms_and_writes_no_checkpoint(demo_root, tmp_path):
    cfg = compose_config(
        "demo",
        demo_overrides(
            demo_root, "trainer.max_epochs=2", "dataset.batch_size=16", "loss.CIR=true", "loss.strategy=auxiliary_cross"
        ),
    )
    # The flag is read at the next synchronising point (a logging step, an epoch end, a checkpoint), not per step.
    expected = r"global step 3 \(detected at step \d+.*nitc_loss=nan.*circle_loss="
    with pytest.raises(NonFiniteLossError, match=expected) as error:
        train(cfg, tmp_path, callbacks=[_PoisonLossAt(3)])
    assert "loss.circle_gamma" in str(error.value)
    assert not (tmp_path / "results.json").exists()
    # The poisoned step comes before the first epoch ends, so no checkpoint may exist (none with NaN weights).
    assert not list(tmp_path.rglob("*.ckpt"))


def _csv_rows(run_dir: Path, column: str) -> list[dict[str, str]]:
    """The CSV logger's rows that hold `column`, in the order written."""
    with next(run_dir.glob("csv/version_*/metrics.csv")).open(newline="") as file:
        return [row for row in csv.DictReader(file) if row.get(column)]
