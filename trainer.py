"""Train and evaluate a TBPS model: `uv run trainer.py -cn <config> [key=value ...]`."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from config_schema import checkpoint_problems, register_schema, validate_config, with_original_names
from lightning_callbacks import (
    QueryLimit,
    build_logger,
    checkpoint_dir_of,
    resume_checkpoint,
    trainer_kwargs,
    trainer_plugins,
    training_callbacks,
)
from lightning_data import TBPSDataModule, build_datamodule
from lightning_models import TBPSLitModule
from preflight import run_preflight
from prepare_checkpoints import ensure_demo_assets
from sweep_jobs import SweepJob
from utils.config import ConfigError
from utils.errors import InputError, user_message
from utils.io import atomic_write_json
from utils.metrics import chance_rank1

log = logging.getLogger(__name__)
register_schema()


def chance_level(datamodule: TBPSDataModule) -> float:
    """t2i R1 of a random ranking of the test split, the floor every result is read against."""
    test = datamodule.splits.test
    return chance_rank1(test.caption_pids, test.image_pids)


def write_results(trainer: L.Trainer, run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "results.json", results)
    return results


def protocol_of(cfg: DictConfig) -> str:
    """How the reported numbers were obtained, for the log and results.json."""
    if cfg.model_selection == "test":
        return "peers' protocol: every training identity trained, epochs selected on the test split"
    held_out = cfg.dataset.val_identities
    if held_out:
        return f"epochs selected on validation ({held_out} training identities held out if the dataset has none)"
    return "epochs selected on the dataset's validation split"


def train(cfg: DictConfig, run_dir: Path, run_name: str = "run", callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Fit on the train split, select the best epoch on validation, test it.

    Returns (and writes to `run_dir/results.json`) the val and test tables, the chance level and the checkpoint.
    `callbacks` are added to the trainer's own (checkpointing, learning-rate monitor, early stopping).
    """
    validate_config(cfg)
    # A requeued job (or the same command with the same hydra.run.dir) resumes from the run folder's last.ckpt.
    resume_from = resume_checkpoint(cfg, run_dir)
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
    chance = chance_level(datamodule)
    log.info("chance t2i R1: %.2f%%; protocol: %s", chance, protocol_of(cfg))
    best, own_callbacks = training_callbacks(cfg, checkpoint_dir_of(cfg, run_dir))
    trainer = L.Trainer(
        default_root_dir=run_dir,
        logger=build_logger(cfg, run_dir, run_name),
        plugins=trainer_plugins(),
        callbacks=[*own_callbacks, *callbacks],
        **trainer_kwargs(cfg),
    )
    if trainer.world_size > 1:  # each process says where it runs, before the nodes meet (or wait for each other)
        log.info(
            "process %d of %d: node %d, local rank %d",
            trainer.global_rank,
            trainer.world_size,
            trainer.node_rank,
            trainer.local_rank,
        )
    if cfg.eval_before_train and resume_from is None:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    best_path = best.best_model_path or None
    tested = {}
    if trainer.limit_test_batches == 0:  # Lightning's "no test"
        log.info("trainer.limit_test_batches=0: the run is not tested; results.json holds no test table.")
    else:
        module.eval_labels["test"] = " (last epoch)"
        trainer.test(module, datamodule=datamodule, verbose=False)
        tested["test_last"] = module.eval_results["test"]
        selection = "validation" if cfg.model_selection == "validation" else "TEST (peers' protocol)"
        module.eval_labels["test"] = f" (checkpoint selected on {selection}: {best_path or 'final weights'})"
        trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)
    results = {
        **module.eval_results,
        **selected_validation(module, best_path),
        **tested,
        "chance_t2i_R1": chance,
        "best_checkpoint": best_path,
        "model_selection": cfg.model_selection,
        "protocol": protocol_of(cfg),
    }
    return write_results(trainer, run_dir, results)


def selected_validation(module: TBPSLitModule, best_path: str | None) -> dict[str, Any]:
    """`val`: the validation tables of the selected checkpoint's epoch (beside its `test` table); `val_last`: those of
    the last validation. Without a selected checkpoint (no validation ran) there is only the last one, if any.
    """
    last = module.eval_results.get("val")
    if best_path is None or last is None:
        return {}
    selected = torch.load(best_path, map_location="cpu", weights_only=True, mmap=True)
    tables = module.val_history.get(selected["global_step"], last)
    return {"val": tables, "val_last": last, "selected_epoch": selected["epoch"]}


def evaluate(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Test the checkpoint `cfg.ckpt_path` on the dataset of `cfg` (e.g. trained on VN3K_VI, tested on VN3K_EN).

    The model, its tokenizer and image preprocessing come from the checkpoint's own config; only the dataset
    (`dataset`, `dataset_root_dir`) and the trainer settings come from the command line. The training split is not
    needed.
    """
    if not cfg.ckpt_path:
        raise ConfigError(["evaluation (train=false) needs ckpt_path=<run folder>/checkpoints/<name>.ckpt."])
    if cfg.trainer.get("limit_test_batches") == 0:
        raise ConfigError(["evaluation (train=false) with trainer.limit_test_batches=0 tests nothing; drop it."])
    checkpoint = Path(cfg.ckpt_path)
    if problems := checkpoint_problems(checkpoint):
        raise ConfigError(problems)
    try:
        module = TBPSLitModule.load_trained(checkpoint)
    except KeyError as error:  # readable, but not written by TBPSLitModule (no hyper-parameters / state dict)
        raise ConfigError(
            [
                f"ckpt_path={str(checkpoint)!r} is not a TBPS checkpoint (no {error}); "
                "pass a .ckpt written by trainer.py."
            ]
        ) from error
    eval_cfg = OmegaConf.merge(module.cfg, {"dataset": cfg.dataset, "dataset_root_dir": cfg.dataset_root_dir})
    datamodule = build_datamodule(eval_cfg, stage="test")
    chance = chance_level(datamodule)
    log.info("Evaluating %s on %s; chance t2i R1: %.2f%%", checkpoint, cfg.dataset.dataset_name, chance)
    trainer = L.Trainer(default_root_dir=run_dir, logger=False, callbacks=[QueryLimit()], **trainer_kwargs(cfg))
    trainer.test(module, datamodule=datamodule, verbose=False)
    results = {
        **module.eval_results,
        "chance_t2i_R1": chance,
        "checkpoint": str(checkpoint),
        "dataset": cfg.dataset.dataset_name,
    }
    return write_results(trainer, run_dir, results)


def run_name_of(config_name: str, overrides: list[str]) -> str:
    """`<config>_<key>_<value>_...` from the command-line overrides (the original project's experiment names)."""
    parts = [config_name] + [o.lstrip("+~").replace("=", "_").replace("/", "-") for o in sorted(overrides)]
    return "_".join(parts)[:128]


def launcher_overrides(overrides: Sequence[str]) -> list[str]:
    """Hydra overrides for one of several processes that torchrun or SLURM's srun started (none otherwise).

    Every such process runs Hydra itself. Left alone, each would create its own timestamped run folder (nodes start
    at different times), and the best checkpoint, saved by rank 0, would be missing where the other ranks read it
    back for the final test: the command must name the run folder, the same for all. In that shared folder rank 0
    writes the config snapshot (`.hydra/`) and `trainer.log`; the other ranks write their log to `trainer_rank<R>.log`
    and no snapshot, instead of appending to and rewriting rank 0's files (Lightning does the same for the processes
    it starts itself).

    Raises:
        ConfigError: several processes were launched and `hydra.run.dir` is not set.
    """
    for environment in (TorchElasticEnvironment, SLURMEnvironment):  # Lightning's order: torchrun inside SLURM wins
        if environment.detect():
            cluster = environment()
            break
    else:
        return []
    if cluster.world_size() == 1:
        return []
    if not any(override.lstrip("+").startswith("hydra.run.dir=") for override in overrides):
        raise ConfigError(
            [
                f"{cluster.world_size()} processes were launched ({type(cluster).__name__}) but hydra.run.dir is not "
                "set, so each would write to its own timestamped folder; add hydra.run.dir=<folder on storage every "
                "node sees>, the same for every process (e.g. hydra.run.dir=/shared/runs/$SLURM_JOB_ID)."
            ]
        )
    rank = cluster.global_rank()
    return [] if rank == 0 else [f"hydra.job.name=trainer_rank{rank}", "hydra.output_subdir=null"]


class SelectedScore(Callback):
    """The validation score of the epoch kept as the best checkpoint, once fitting ends (what a search maximises)."""

    def __init__(self) -> None:
        self.value: float | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's `checkpoint_callback` is the first ModelCheckpoint: the one train() selects the best epoch with.
        best = trainer.checkpoint_callback.best_model_score
        self.value = None if best is None else float(best)


class SweepError(InputError):
    """A sweep that cannot run as asked: a search selecting on test or on nothing, DDP under an in-place launcher."""


def check_search(cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """Refuse an Optuna search (`hparams_search=...`) that would tune on the test split or on nothing."""
    if hydra_cfg.runtime.choices.get("hydra/sweeper") != "optuna":
        return
    search = hydra_cfg.runtime.choices.get("hparams_search") or "optuna"
    if cfg.model_selection == "test":
        raise SweepError(
            f"model_selection=test with hparams_search={search} would tune on the test split; drop model_selection=test"
            " (parity=seed sets it too): the search maximises the validation score."
        )
    if cfg.trainer.limit_val_batches == 0:
        raise SweepError(f"trainer.limit_val_batches=0 leaves hparams_search={search} no validation score; drop it.")


def check_sweep_ddp(cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """Refuse DDP in a multirun whose jobs Lightning would re-launch with the sweep's own command line."""
    launcher = hydra_cfg.runtime.choices.get("hydra/launcher")
    if hydra_cfg.mode != RunMode.MULTIRUN or "ddp" not in str(cfg.trainer.strategy) or "slurm" in str(launcher):
        return
    raise SweepError(
        f"trainer.strategy={cfg.trainer.strategy} in a multirun with the {launcher} launcher: Lightning would start "
        "each extra process with this command, which runs the whole sweep again; use hydra/launcher=slurm with "
        "hydra.launcher.tasks_per_node and gpus_per_node set to the GPUs per job, or run the jobs without -m."
    )


def close_wandb_run() -> None:
    """End the W&B run of a job: Lightning's WandbLogger would log the next job of a multirun into the same run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def run_job(cfg: DictConfig, run_dir: Path, name: str) -> float | None:
    """Preflight, train or evaluate, as `cfg` asks; the selected epoch's validation score when training."""
    if cfg.preflight:
        validate_config(cfg)
        ensure_demo_assets(cfg)
        raise SystemExit(run_preflight(cfg))
    if not cfg.train:
        validate_config(cfg)
        evaluate(cfg, run_dir)
        return None
    score = SelectedScore()
    train(cfg, run_dir, name, callbacks=[score])
    return score.value


@hydra.main(version_base="1.3", config_path="config", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run one job; returns the selected epoch's validation score (an Optuna search maximises it), else None.

    A job of a multirun (`-m`) keeps a status file in its folder and is skipped when its folder already holds
    results.json, so launching a sweep again runs only the jobs that did not finish (sweep_jobs.py).
    """
    hydra_cfg = HydraConfig.get()
    name = cfg.logger.experiment_name or run_name_of(hydra_cfg.job.config_name or "run", hydra_cfg.overrides.task)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    job = SweepJob(run_dir, list(hydra_cfg.overrides.task)) if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        check_search(cfg, hydra_cfg)
        check_sweep_ddp(cfg, hydra_cfg)
        if job is None:
            return run_job(cfg, run_dir, name)
        if job.finished:
            job.val_score = job.recorded().get("val_score")
            log.info("Skipped: %s already holds results.json (val_score %s).", run_dir, job.val_score)
            return job.val_score
        with job:
            job.val_score = run_job(cfg, run_dir, name)
        return job.val_score
    except InputError as error:
        # Bad config, dataset or checkpoint: the message names the file or field and the fix; no traceback.
        log.error("%s", user_message(error))
        raise SystemExit(2) from None
    except SIGTERMException:
        # Lightning stops cleanly on SIGTERM but exits 0; a scheduler must see that the job did not finish.
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        close_wandb_run()


if __name__ == "__main__":
    arguments = with_original_names(sys.argv[1:])  # loss.simclr=true -> loss.SS=true
    try:
        arguments += launcher_overrides(arguments)
    except ConfigError as error:  # before Hydra starts: no process creates a folder of its own
        print(user_message(error), file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv = [sys.argv[0], *arguments]
    main()
