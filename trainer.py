"""Train and evaluate a TBPS model: `uv run trainer.py -cn <config> [key=value ...]`."""

from __future__ import annotations

import logging
import pickle
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lightning_data import build_datamodule, data_config_problems, ensure_demo_assets
from lightning_models import TBPSLitModule, model_config_problems
from preflight import run_preflight
from utils.config import ConfigError, register_resolvers
from utils.errors import InputError
from utils.io import atomic_write, atomic_write_json
from utils.metrics import chance_rank1

log = logging.getLogger(__name__)
register_resolvers()


#: Lightning strategies whose workers are forked or spawned from this process: train() could not return their results.
PROCESS_POOL_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_spawn_find_unused_parameters_true")


def checkpoint_problems(path: Path) -> list[str]:
    """Empty when `path` is a checkpoint torch can read without unpickling code (memory-mapped: nothing is copied)."""
    fix = "pass a .ckpt written by trainer.py, such as <run folder>/checkpoints/last.ckpt"
    if not path.is_file():
        return [f"ckpt_path={str(path)!r} does not exist; {fix}, or ckpt_path=null to start from the backbone."]
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, KeyError, OSError, pickle.UnpicklingError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return [f"ckpt_path={str(path)!r} is not a readable checkpoint ({reason}); {fix}."]
    return []


def validate_config(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every problem of the composed config (before any download or model build)."""
    problems = []
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as error:  # noqa: BLE001 - any interpolation error is a config problem to report
        problems.append(f"cannot resolve the config: {error}")
    else:
        problems += data_config_problems(cfg) + model_config_problems(cfg)
    if str(cfg.trainer.get("strategy", "")) in PROCESS_POOL_STRATEGIES:
        problems.append(
            f"trainer.strategy={cfg.trainer.strategy} keeps the results in the started processes; use "
            "trainer.strategy=ddp (trainer=ddp or trainer=ddp_cpu)."
        )
    if cfg.get("ckpt_path"):
        problems += checkpoint_problems(Path(cfg.ckpt_path))
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


def trainer_settings(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments of lightning.Trainer: the `trainer` group, with data sharding left to TBPSDataModule.

    Lightning's own distributed sampler would split identity batches across ranks and pad evaluation sets with
    repeated items; the data module shards both correctly itself.
    """
    return {**OmegaConf.to_container(cfg.trainer, resolve=True), "use_distributed_sampler": False}


def extra_callbacks(cfg: DictConfig) -> list[Callback]:
    """Early stopping on the validation score when `early_stopping` is configured (`+early_stopping.patience=10`)."""
    if not cfg.get("early_stopping"):
        return []
    settings = {"monitor": "val_score", "mode": "max", **cfg.early_stopping}
    return [EarlyStopping(**settings)]


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


def protocol_of(cfg: DictConfig) -> str:
    """How the reported numbers were obtained, for the log and results.json."""
    if cfg.get("model_selection", "validation") == "test":
        return "peers' protocol: every training identity trained, epochs selected on the test split"
    held_out = cfg.dataset.get("val_identities", 0)
    if held_out:
        return f"epochs selected on validation ({held_out} training identities held out if the dataset has none)"
    return "epochs selected on the dataset's validation split"


def checkpoint_dir_of(cfg: DictConfig, run_dir: Path) -> Path:
    """Where checkpoints go: `run_dir/checkpoints`, or, when resuming, the folder of the checkpoint resumed from.

    Lightning restores a ModelCheckpoint's best score and top-k list only in the folder that wrote them; in a new
    folder the selection would restart after the resume point, and a preempted run would report another "best" epoch.
    """
    if cfg.get("ckpt_path"):
        folder = Path(cfg.ckpt_path).resolve().parent
        log.info("Resuming: checkpoints continue in %s (best-checkpoint selection carries over)", folder)
        return folder
    return run_dir / "checkpoints"


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
    log.info("chance t2i R1: %.2f%%; protocol: %s", chance, protocol_of(cfg))

    checkpoint_dir = checkpoint_dir_of(cfg, run_dir)
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
    trainer = L.Trainer(
        default_root_dir=run_dir,
        logger=build_logger(cfg, run_dir, run_name),
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            best,
            latest,
            ResumeHint(latest),
            LearningRateMonitor(logging_interval="step"),
            *extra_callbacks(cfg),
            *callbacks,
        ],
        **trainer_settings(cfg),
    )
    if cfg.eval_before_train:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    module.eval_labels["test"] = " (last epoch)"
    trainer.test(module, datamodule=datamodule, verbose=False)
    test_last = module.eval_results["test"]
    best_path = best.best_model_path or None
    selection = "validation" if cfg.get("model_selection", "validation") == "validation" else "TEST (peers' protocol)"
    module.eval_labels["test"] = f" (checkpoint selected on {selection}: {best_path or 'final weights'})"
    trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)
    results = {
        **module.eval_results,
        "test_last": test_last,
        "chance_t2i_R1": chance,
        "best_checkpoint": best_path,
        "model_selection": cfg.get("model_selection", "validation"),
        "protocol": protocol_of(cfg),
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
    if not cfg.ckpt_path:
        raise ConfigError(["evaluation (train=false) needs ckpt_path=<run folder>/checkpoints/<name>.ckpt."])
    checkpoint = Path(cfg.ckpt_path)
    if problems := checkpoint_problems(checkpoint):
        raise ConfigError(problems)
    try:
        module = TBPSLitModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    except KeyError as error:  # readable, but not written by TBPSLitModule (no hyper-parameters / state dict)
        raise ConfigError(
            [
                f"ckpt_path={str(checkpoint)!r} is not a TBPS checkpoint (no {error}); "
                "pass a .ckpt written by trainer.py."
            ]
        ) from error
    eval_cfg = OmegaConf.merge(module.cfg, {"dataset": cfg.dataset, "dataset_root_dir": cfg.dataset_root_dir})
    datamodule = build_datamodule(eval_cfg, stage="test")
    test = datamodule.splits.test
    chance = chance_rank1(test.caption_pids, test.image_pids)
    log.info("Evaluating %s on %s; chance t2i R1: %.2f%%", checkpoint, cfg.dataset.dataset_name, chance)
    trainer = L.Trainer(default_root_dir=run_dir, logger=False, **trainer_settings(cfg))
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


def user_message(error: InputError) -> str:
    """The error's own message; a DataLoader worker re-raises it wrapped in the worker's traceback, which is cut."""
    message = str(error)
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]  # "data.datasets.ImageReadError: <message>"
    name, separator, own = last.partition(": ")
    return own if separator and name.split(".")[-1] == type(error).__name__ else last


def run_name_of(config_name: str, overrides: list[str]) -> str:
    """`<config>_<key>_<value>_...` from the command-line overrides (the original project's experiment names)."""
    parts = [config_name] + [o.lstrip("+~").replace("=", "_").replace("/", "-") for o in sorted(overrides)]
    return "_".join(parts)[:128]


@hydra.main(version_base="1.3", config_path="config", config_name=None)
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    name = cfg.logger.experiment_name or run_name_of(hydra_cfg.job.config_name or "run", hydra_cfg.overrides.task)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        if cfg.get("preflight", False):
            validate_config(cfg)
            ensure_demo_assets(cfg)
            raise SystemExit(run_preflight(cfg))
        if cfg.get("train", True):
            train(cfg, run_dir, name)
        else:
            validate_config(cfg)
            evaluate(cfg, run_dir)
    except InputError as error:
        # Bad config, dataset or checkpoint: the message names the file or field and the fix; no traceback.
        log.error("%s", user_message(error))
        raise SystemExit(2) from None
    except SIGTERMException:
        # Lightning stops cleanly on SIGTERM but exits 0; a scheduler must see that the job did not finish.
        raise SystemExit(128 + signal.SIGTERM) from None


if __name__ == "__main__":
    main()
