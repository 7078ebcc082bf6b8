"""Train and evaluate a TBPS model: `uv run trainer.py -cn <config> [key=value ...]`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lightning_data import build_datamodule, data_config_problems, ensure_demo_assets
from lightning_models import TBPSLitModule, model_config_problems
from utils.config import ConfigError, register_resolvers
from utils.io import atomic_write_json
from utils.metrics import chance_rank1

log = logging.getLogger(__name__)
register_resolvers()


def validate_config(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every problem of the composed config (before any download or model build)."""
    problems = []
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as error:  # noqa: BLE001 - any interpolation error is a config problem to report
        problems.append(f"cannot resolve the config: {error}")
    else:
        problems += data_config_problems(cfg) + model_config_problems(cfg)
    if problems:
        raise ConfigError(problems)


def build_logger(cfg: DictConfig, run_dir: Path, run_name: str) -> Logger:
    if cfg.logger.type == "wandb":
        return WandbLogger(
            project=cfg.logger.project,
            name=run_name,
            save_dir=str(run_dir),
            mode=cfg.logger.mode,
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    if cfg.logger.type == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv")
    raise ConfigError([f"logger.type={cfg.logger.type!r} is unknown; valid: ['csv', 'wandb']."])


def extra_callbacks(cfg: DictConfig) -> list[Callback]:
    """Early stopping on the validation score when `early_stopping` is configured (`+early_stopping.patience=10`)."""
    if not cfg.get("early_stopping"):
        return []
    settings = {"monitor": "val_score", "mode": "max", **cfg.early_stopping}
    return [EarlyStopping(**settings)]


def train(cfg: DictConfig, run_dir: Path, run_name: str = "run", callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Fit on the train split, select the best epoch on validation, test it.

    Returns (and writes to `run_dir/results.json`) the val and test tables, the chance level and the checkpoint.
    `callbacks` are added to the trainer's own (checkpointing, learning-rate monitor, early stopping).
    """
    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    ensure_demo_assets(cfg)

    datamodule = build_datamodule(cfg)
    tokenizer = datamodule.tokenizer
    module = TBPSLitModule(
        cfg,
        num_classes=datamodule.num_train_ids,
        text_vocab_size=tokenizer.vocab_size if datamodule.mlm_probability else None,
    )
    if tokenizer.vocab_size > module.text_vocab_size:
        raise ConfigError(
            [
                f"tokenizer {cfg.tokenizer.pretrained_model_name_or_path} has {tokenizer.vocab_size} tokens but the "
                f"text tower embeds {module.text_vocab_size}; use the tokenizer saved with the checkpoint."
            ]
        )
    test = datamodule.splits.test
    chance = chance_rank1(test.caption_pids, test.image_pids)
    log.info("chance t2i R1: %.2f%%", chance)

    # epoch03-val_score29.37.ckpt (best on validation t2i R1) and last.ckpt. No "=" in the name (Lightning's
    # default): Hydra would then need the path quoted in `ckpt_path=...`.
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="epoch{epoch:02d}-val_score{val_score:.2f}",
        auto_insert_metric_name=False,
        **cfg.logger.checkpoint,
    )
    trainer = L.Trainer(
        default_root_dir=run_dir,
        logger=build_logger(cfg, run_dir, run_name),
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step"), *extra_callbacks(cfg), *callbacks],
        **cfg.trainer,
    )
    if cfg.eval_before_train:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    module.eval_labels["test"] = " (last epoch)"
    trainer.test(module, datamodule=datamodule, verbose=False)
    test_last = module.eval_results["test"]
    best = checkpoint.best_model_path or None
    selection = "validation" if cfg.get("model_selection", "validation") == "validation" else "TEST (seed parity)"
    module.eval_labels["test"] = f" (checkpoint selected on {selection}: {best or 'final weights'})"
    trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    results = {
        **module.eval_results,
        "test_last": test_last,
        "chance_t2i_R1": chance,
        "best_checkpoint": best,
        "model_selection": cfg.get("model_selection", "validation"),
    }
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "results.json", results)
    return results


def evaluate(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Test the checkpoint `cfg.ckpt_path` on the dataset of `cfg` (e.g. trained on VN3K_VI, tested on VN3K_EN).

    The model, its tokenizer and image preprocessing come from the checkpoint's own config; only the dataset
    (`dataset`, `dataset_root_dir`) and the trainer settings come from the command line. The training split is not
    needed.
    """
    checkpoint = Path(cfg.ckpt_path) if cfg.ckpt_path else None
    if checkpoint is None or not checkpoint.is_file():
        raise ConfigError(
            [
                f"ckpt_path={cfg.ckpt_path!r} is not a checkpoint file; evaluation (train=false) needs "
                "ckpt_path=<run folder>/checkpoints/<name>.ckpt."
            ]
        )
    module = TBPSLitModule.load_from_checkpoint(checkpoint, map_location="cpu")
    eval_cfg = OmegaConf.merge(module.cfg, {"dataset": cfg.dataset, "dataset_root_dir": cfg.dataset_root_dir})
    datamodule = build_datamodule(eval_cfg, stage="test")
    test = datamodule.splits.test
    chance = chance_rank1(test.caption_pids, test.image_pids)
    log.info("Evaluating %s on %s; chance t2i R1: %.2f%%", checkpoint, cfg.dataset.dataset_name, chance)
    trainer = L.Trainer(default_root_dir=run_dir, logger=False, **cfg.trainer)
    trainer.test(module, datamodule=datamodule, verbose=False)
    results = {
        **module.eval_results,
        "chance_t2i_R1": chance,
        "checkpoint": str(checkpoint),
        "dataset": cfg.dataset.dataset_name,
    }
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "results.json", results)
    return results


def run_name_of(config_name: str, overrides: list[str]) -> str:
    """`<config>_<key>_<value>_...` from the command-line overrides (the seed's experiment names)."""
    parts = [config_name] + [o.lstrip("+~").replace("=", "_").replace("/", "-") for o in sorted(overrides)]
    return "_".join(parts)[:128]


@hydra.main(version_base="1.3", config_path="config", config_name=None)
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    name = cfg.logger.experiment_name or run_name_of(hydra_cfg.job.config_name or "run", hydra_cfg.overrides.task)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.get("train", True):
        train(cfg, run_dir, name)
    else:
        validate_config(cfg)
        evaluate(cfg, run_dir)


if __name__ == "__main__":
    main()
