"""What a training run adds to `lightning.Trainer`: checkpoint writing and selection, the logger, the resume hint,
early stopping, and the evaluation limits that cut queries but never the gallery.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from utils.io import atomic_write

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in their own folder, fsynced, then renamed over the target.

    Lightning's fsspec transaction stages the file in $TMPDIR and, when that is another file system (node-local
    /tmp, checkpoints on shared storage), copies it over the target in place: a kill mid-copy truncates last.ckpt.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec upload
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda file: torch.save(checkpoint, file))
        return None


class ResumeHint(Callback):
    """Says how to resume when training stops early (SIGTERM from a scheduler, Ctrl-C, a crash)."""

    def __init__(self, latest: ModelCheckpoint):
        self.latest = latest

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not trainer.is_global_zero or not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return  # other errors are reported by what raised them; resuming would not fix them
        last = Path(self.latest.dirpath) / "last.ckpt"
        where = f"Training stopped at epoch {trainer.current_epoch}, step {trainer.global_step}"
        if last.is_file():
            log.error("%s. Resume from the last completed epoch with the same command plus ckpt_path=%s", where, last)
        else:
            log.error("%s, before the first epoch ended: no checkpoint to resume from; rerun the command.", where)


class QueryLimit(Callback):
    """Applies `trainer.limit_val_batches` / `limit_test_batches` (which `fast_dev_run` sets too) to the queries only.

    A limit of 0 keeps its meaning in Lightning (no validation, or no test).

    Lightning cuts every evaluation loader alike; cutting the gallery would rank the queries against part of it (and
    stop when a query's person is not in that part). The trainer's limits are read once, handed to the data module,
    which keeps only the first queries, and reset, so every gallery batch is encoded.
    """

    def __init__(self) -> None:
        self.limits: dict[str, int | float] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.limits is None:
            self.limits = {"val": trainer.limit_val_batches, "test": trainer.limit_test_batches}
        trainer.datamodule.query_limits = dict(self.limits)
        # A limit of 0 stays with Lightning: it switches that evaluation off.
        trainer.limit_val_batches = 1.0 if self.limits["val"] else 0
        trainer.limit_test_batches = 1.0 if self.limits["test"] else 0


def checkpoint_dir_of(cfg: DictConfig, run_dir: Path) -> Path:
    """Where checkpoints go: `run_dir/checkpoints`, or, when resuming, the folder of the checkpoint resumed from.

    Lightning restores a ModelCheckpoint's best score and top-k list only in the folder that wrote them; in a new
    folder the selection would restart after the resume point, and a preempted run would report another "best" epoch.
    """
    if cfg.ckpt_path:
        folder = Path(cfg.ckpt_path).resolve().parent
        log.info("Resuming: checkpoints continue in %s (best-checkpoint selection carries over)", folder)
        return folder
    return run_dir / "checkpoints"


def build_logger(cfg: DictConfig, run_dir: Path, run_name: str) -> Logger:
    """The `logger` group's logger: W&B (offline by default) or a CSV file in the run folder."""
    if cfg.logger.type == "wandb":
        return WandbLogger(
            project=cfg.logger.project,
            name=run_name,
            save_dir=str(run_dir),
            mode=cfg.logger.mode,
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    return CSVLogger(save_dir=str(run_dir), name="csv")


def training_callbacks(cfg: DictConfig, checkpoint_dir: Path) -> tuple[ModelCheckpoint, list[Callback]]:
    """The checkpoint kept as the best epoch, and every callback of a training run (that one included)."""
    # epoch03-val_score29.37.ckpt (best on validation t2i R1). No "=" in the name (Lightning's default): Hydra would
    # then need the path quoted in `ckpt_path=...`.
    best = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="epoch{epoch:02d}-val_score{val_score:.2f}",
        auto_insert_metric_name=False,
        **cfg.logger.checkpoint,
    )
    # last.ckpt, rewritten after every epoch: the resume point. Lightning's save_last only refreshes it in epochs
    # that also save a best checkpoint, so after a plateau it would hold an old epoch.
    latest = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="last",
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,
        save_on_train_epoch_end=True,  # also in epochs without validation (check_val_every_n_epoch > 1)
    )
    callbacks = [best, latest, ResumeHint(latest), LearningRateMonitor(logging_interval="step"), QueryLimit()]
    stopping = {key: value for key, value in cfg.early_stopping.items() if value is not None}
    if stopping:
        callbacks.append(EarlyStopping(monitor="val_score", mode="max", **stopping))
    return best, callbacks


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments of lightning.Trainer: the `trainer` group's set values, data sharding left to the data module.

    Lightning's own distributed sampler would split identity batches across ranks and pad evaluation sets with
    repeated items; the data module shards both correctly itself.
    """
    settings = OmegaConf.to_container(cfg.trainer, resolve=True)
    return {**{k: v for k, v in settings.items() if v is not None}, "use_distributed_sampler": False}
