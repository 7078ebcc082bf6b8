"""What a training run adds to `lightning.Trainer`: checkpoint writing and selection, resuming (the SLURM requeue
itself is `lightning_slurm`), the logger, the resume hint, early stopping, a progress bar that reads the GPU only
when Lightning logs, and the evaluation limits that cut queries but never the gallery.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from config_schema import checkpoint_problems
from lightning_slurm import SlurmRequeue, ends_epoch
from utils.config import ConfigError
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
        if not last.is_file():
            log.error("%s, before a checkpoint was written: nothing to resume from; rerun the command.", where)
            return
        again = ""
        if last.parent == Path(trainer.default_root_dir).resolve() / "checkpoints":
            again = f", or rerun it with hydra.run.dir={trainer.default_root_dir} (a run folder resumes by itself)"
        log.error("%s. Resume from the last checkpoint with the same command plus ckpt_path=%s%s", where, last, again)


class StepCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` optimizer steps, except after an epoch's last batch (`ends_epoch`): the
    epoch-end checkpoint follows it.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not ends_epoch(trainer, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class LoggedStepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, showing the training losses the module has written to its loggers.

    Lightning's own bar reads progress-bar metrics from the GPU after every batch: each read waits for the GPU to
    finish the batch, so the host could never queue the next batch meanwhile. This bar shows the floats of the last
    logged step the module has read (`logged_training_metrics`, a few logged steps behind the batch count; see
    `lightning_training_logs.LOG_LAG`), which cost no read.
    """

    def __init__(self, refresh_rate: int = 1, shown: dict[str, str] | None = None) -> None:
        """Args:
        refresh_rate: Batches between updates of the bar.
        shown: Logged training metric -> its label on the bar (default: the total loss as `loss`).
        """
        super().__init__(refresh_rate=refresh_rate)
        self.shown = shown or {"train/total_loss": "loss"}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar, done = self.train_progress_bar, batch_idx + 1
        if bar is None or bar.disable:
            return
        if done % self.refresh_rate == 0 or done == bar.total:
            bar.n = done
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The last steps' losses are written at the epoch's end, after this bar's own epoch-end update.
        if self.train_progress_bar is not None and not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)
        super().on_train_end(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        logged = getattr(pl_module, "logged_training_metrics", {})
        shown = {label: logged[name] for name, label in self.shown.items() if name in logged}
        return {**super().get_metrics(trainer, pl_module), **shown}


class WritePendingLogs(Callback):
    """When training stops on an exception, still write the training logs the module holds back (`write_training_logs`:
    the last logged steps before a crash).
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        write = getattr(pl_module, "write_training_logs", None)
        if write is None:
            return
        try:
            write(everything=True)
        except Exception as error:  # the GPU failed, or the held-back values are themselves non-finite
            log.warning("The training logs of the last logged steps were not written: %s", error)


def trainer_plugins() -> list[Any]:
    """Plugins of a training `lightning.Trainer`: atomic checkpoint writes; under SLURM, no Lightning auto-requeue
    (`SlurmRequeue` does it at a step boundary).
    """
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint a training run resumes from: `ckpt_path` when given, else the run folder's own
    `checkpoints/last.ckpt` (a requeued job, or the command run again with the same `hydra.run.dir`), else none.

    A run folder's checkpoint of another configuration is refused: the run folder is not this run's.
    """
    if cfg.ckpt_path:
        return cfg.ckpt_path
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    if problems := checkpoint_problems(last):
        raise ConfigError(problems)
    saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {}).get("cfg")
    differing = _differing_keys(saved or {}, OmegaConf.to_container(cfg, resolve=True))
    if differing:
        shown = ", ".join(differing[:5]) + (", ..." if len(differing) > 5 else "")
        raise ConfigError(
            [
                f"{last} is the resume point of a run with another configuration ({shown} differ): pass a new "
                f"hydra.run.dir for a new run, or ckpt_path={last} to continue that run with this configuration."
            ]
        )
    log.info("Resuming from %s, found in the run folder (a requeued or repeated job); ckpt_path=... overrides", last)
    return str(last)


#: Settings a run folder's checkpoint may have had otherwise: `ckpt_path` names the resume point, and the others change
#: speed and memory, not what a step computes (a run started before one of them existed saved another value or none).
RESUME_INDIFFERENT = (
    "ckpt_path",
    "backbone.compile",
    "backbone.compile_mode",
    "backbone.gradient_checkpointing",
    "backbone.half_precision_frozen_weights",
)


def _differing_keys(saved: Any, current: Any, path: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (except `RESUME_INDIFFERENT`)."""
    if path in RESUME_INDIFFERENT:
        return []
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return [] if saved == current else [path]
    keys = sorted(set(saved) | set(current), key=str)
    return [key for k in keys for key in _differing_keys(saved.get(k), current.get(k), f"{path}.{k}" if path else k)]


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
    settings = cfg.logger.checkpoint
    best = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="epoch{epoch:02d}-val_score{val_score:.2f}",
        auto_insert_metric_name=False,
        monitor=settings.monitor,
        mode=settings.mode,
        save_top_k=settings.save_top_k,
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
    callbacks = [best, latest, ResumeHint(latest), WritePendingLogs(), LearningRateMonitor(logging_interval="step")]
    callbacks.append(QueryLimit())
    if cfg.trainer.get("enable_progress_bar") is not False:
        callbacks.append(LoggedStepProgressBar())
    if settings.every_n_train_steps:
        # The same file every N optimizer steps, mid-epoch included (Lightning triggers a ModelCheckpoint either by
        # steps or by epochs, hence a second one). A run resumed from it continues inside the epoch
        # (TBPSDataModule.train_position).
        callbacks.append(
            StepCheckpoint(
                dirpath=checkpoint_dir,
                filename="last",
                monitor=None,
                save_top_k=1,
                enable_version_counter=False,
                every_n_train_steps=settings.every_n_train_steps,
            )
        )
    if SLURMEnvironment.detect():
        callbacks.append(SlurmRequeue(Path(latest.dirpath) / "last.ckpt"))
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
