"""The schema of the composed config: one typed dataclass per group, registered in Hydra's ConfigStore.

`config/train.yaml` composes every group onto `TBPSConfig` (its first default, `tbps_schema`), so an unknown key or
a value of the wrong type fails at composition with Hydra's message, and every default is written once, in the
dataclass that owns it. The semantic checks live beside each dataclass (`problems()`); `validate_config` gathers
them all into one error before anything is downloaded or built.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from lightning.fabric.connector import _PRECISION_INPUT
from omegaconf import DictConfig, OmegaConf

from data.settings import AugSettings, DatasetSettings, TokenizerSettings
from model.build import BackboneSettings
from model.lora import LoraSettings
from model.strategies import CLEAR_NAMES, LossSettings
from solver.build import OptimizerSettings
from solver.lr_scheduler import SchedulerSettings
from utils.config import ConfigError, register_resolvers

#: Lightning strategies whose workers are forked or spawned from this process: train() could not return their results.
PROCESS_POOL_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_spawn_find_unused_parameters_true")
LOGGERS = ("wandb", "csv")


def _flattened(literal: Any) -> tuple[Any, ...]:
    args = typing.get_args(literal)
    return tuple(value for arg in args for value in (_flattened(arg) if typing.get_args(arg) else (arg,)))


#: `trainer.precision` values Lightning accepts (its own type of the argument).
PRECISIONS = _flattened(_PRECISION_INPUT)
MODEL_SELECTIONS = ("validation", "test")
EVAL_SCORINGS = ("cosine", "dot")


@dataclass
class TrainerSettings:
    """The `trainer` group: keyword arguments of `lightning.Trainer`; unset (null) ones keep Lightning's default.

    `limit_val_batches` / `limit_test_batches` (and `fast_dev_run`) limit the evaluation *queries* only: the whole
    gallery is always ranked, so R@k stays a ranking over every candidate (see `lightning_callbacks.QueryLimit`).
    """

    accelerator: str = "auto"  # auto | cpu | gpu
    strategy: str | None = None  # auto | ddp
    devices: Any = 1  # a count, a list of indices, -1 (all: trainer=ddp) or auto
    num_nodes: int | None = None
    precision: Any = None  # 32-true | 16-mixed | bf16-mixed (lightning.fabric's precision values)
    max_epochs: int | None = None
    min_epochs: int | None = None
    max_steps: int | None = None
    min_steps: int | None = None
    max_time: Any = None
    accumulate_grad_batches: int = 1  # gradients accumulate; each contrastive loss still sees one micro-batch
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    limit_train_batches: Any = None  # a count or a fraction of the training batches
    limit_val_batches: Any = None  # a count (of test_batch_size batches) or a fraction of the queries; 0: off
    limit_test_batches: Any = None
    overfit_batches: Any = None
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = None
    num_sanity_val_steps: int = 0  # Lightning's sanity check encodes part of the gallery and ranks nothing here
    log_every_n_steps: int | None = None
    fast_dev_run: Any = None  # true or a count: that many training batches and query batches, no checkpoints
    enable_progress_bar: bool | None = None
    enable_model_summary: bool | None = None
    deterministic: Any = None
    benchmark: bool | None = None
    inference_mode: bool | None = None
    detect_anomaly: bool | None = None
    sync_batchnorm: bool | None = None
    reload_dataloaders_every_n_epochs: int | None = None
    profiler: str | None = None

    def problems(self) -> list[str]:
        issues = []
        if str(self.strategy) in PROCESS_POOL_STRATEGIES:
            issues.append(
                f"trainer.strategy={self.strategy} keeps the results in the started processes; use "
                "trainer.strategy=ddp (trainer=ddp or trainer=ddp_cpu)."
            )
        if self.precision is not None and self.precision not in PRECISIONS:
            issues.append(f"trainer.precision={self.precision!r} is unknown; valid: {list(PRECISIONS)}.")
        return issues


@dataclass
class CheckpointSettings:
    """The epoch kept as the best checkpoint (`lightning.pytorch.callbacks.ModelCheckpoint`) and how often the resume
    point `last.ckpt` is written.
    """

    monitor: str = "val_score"  # t2i R1 on the validation split
    mode: str = "max"
    save_top_k: int = 1
    # Also rewrite last.ckpt every N optimizer steps (mid-epoch included; 0: after every epoch only). A hard failure
    # then loses at most N steps; a SLURM preemption with --signal loses none (the signal saves). Off by default: a
    # full fine-tuning checkpoint with AdamW state is ~4.5 GB per write.
    every_n_train_steps: int = 0

    def problems(self) -> list[str]:
        if self.every_n_train_steps < 0:
            return [
                f"logger.checkpoint.every_n_train_steps={self.every_n_train_steps} is negative; use 0 (after every "
                "epoch only) or a number of optimizer steps."
            ]
        return []


@dataclass
class LoggerSettings:
    """The `logger` group."""

    type: str = "wandb"  # wandb | csv (metrics.csv in the run folder)
    project: str | None = None  # W&B project
    mode: str | None = None  # W&B: offline (no account or network; `wandb sync` later) | online
    experiment_name: str | None = None  # default: <config name>_<overrides>
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)

    def problems(self) -> list[str]:
        issues = [] if self.type in LOGGERS else [f"logger.type={self.type!r} is unknown; valid: {list(LOGGERS)}."]
        return issues + self.checkpoint.problems()


@dataclass
class EarlyStoppingSettings:
    """Stop when the validation score has not improved for `patience` evaluations (`early_stopping.patience=10`)."""

    patience: int | None = None  # null: no early stopping
    min_delta: float | None = None


@dataclass
class TBPSConfig:
    """The composed config: the groups plus the run's own settings."""

    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    backbone: BackboneSettings = field(default_factory=BackboneSettings)
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    aug: AugSettings = field(default_factory=AugSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    logger: LoggerSettings = field(default_factory=LoggerSettings)
    lora: LoraSettings | None = None  # lora=cir or lora=default: LoRA adapters instead of full fine-tuning
    early_stopping: EarlyStoppingSettings = field(default_factory=EarlyStoppingSettings)

    dataset_root_dir: str = "${oc.env:TBPS_DATA_ROOT,.}"  # the folder holding CUHK-PEDES/, VN3K/, ...
    img_size_str: str = "(256, 256)"  # (height, width); the checkpoint's native size, or "(384,128)"
    img_size: list[int] = "${img_size:${img_size_str}}"  # type: ignore[assignment]  # parsed, never evaluated
    seed: int = 2307
    eval_before_train: bool = True  # zero-shot evaluation before the first epoch
    ckpt_path: str | None = None  # resume training from a Lightning checkpoint, or the checkpoint to evaluate
    train: bool = True  # false: only evaluate ckpt_path on the configured dataset (any language)
    preflight: bool = False  # true: check the checkpoint and the data, print a report, train nothing
    model_selection: str = "validation"  # "test": select epochs on the test split like IRRA, TBPS-CLIP (parity only)
    eval_scoring: str = "cosine"  # "dot": rank by unnormalised dot products (parity=seed)
    eval_memory_budget_mb: int = 256  # memory for ranking one chunk of queries (evaluation at any gallery size)
    lora_train_logit_params: bool = True  # read by the lora group; parity=seed: LoRA freezes the logit parameters

    def problems(self) -> list[str]:
        issues = self.dataset.problems() + self.aug.problems() + self.backbone.problems()
        for key, valid in (("model_selection", MODEL_SELECTIONS), ("eval_scoring", EVAL_SCORINGS)):
            if getattr(self, key) not in valid:
                issues.append(f"{key}={getattr(self, key)!r} is unknown; valid: {list(valid)}.")
        try:
            issues += self.loss.problems(use_sigmoid=self.backbone.use_sigmoid)
        except ValueError as error:
            issues.append(str(error))
        if self.lora is not None:
            issues += self.lora.problems()
        issues += self.optimizer.problems() + self.scheduler.problems()
        issues += self.trainer.problems() + self.logger.problems()
        warmup, epochs = self.scheduler.warmup_epochs, self.trainer.max_epochs
        if warmup is not None and epochs is not None and 0 < epochs <= warmup:
            issues.append(
                f"scheduler.warmup_epochs={warmup} is not shorter than trainer.max_epochs={epochs}: lower it, or train "
                "for more epochs."
            )
        if self.ckpt_path:
            issues += checkpoint_problems(Path(self.ckpt_path))
        return issues


def checkpoint_problems(path: Path) -> list[str]:
    """Empty when `path` is a checkpoint torch can read without unpickling code (memory-mapped: nothing is copied)."""
    fix = "pass a .ckpt written by trainer.py, such as <run folder>/checkpoints/last.ckpt"
    if not path.is_file():
        return [f"ckpt_path={str(path)!r} does not exist; {fix}, or ckpt_path=null to start from the backbone."]
    if reason := unreadable_checkpoint(path):
        return [f"ckpt_path={str(path)!r} is not a readable checkpoint ({reason}); {fix}."]
    return []


def unreadable_checkpoint(path: Path) -> str | None:
    """Why torch cannot read the file `path` as a checkpoint of tensors and plain containers (None when it can).

    Memory-mapped, so nothing is copied; a truncated copy, another kind of file or pickled objects all end here.
    """
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, KeyError, OSError, pickle.UnpicklingError) as error:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return None


def register_schema() -> None:
    """Store `TBPSConfig` as `tbps_schema` (the first default of config/train.yaml) and the resolvers. Idempotent."""
    register_resolvers()
    ConfigStore.instance().store(name="tbps_schema", node=TBPSConfig)


def typed(cfg: DictConfig | dict[str, Any]) -> DictConfig:
    """`cfg` on the schema: missing keys (a checkpoint written before a setting existed) take their defaults."""
    register_resolvers()
    return OmegaConf.merge(OmegaConf.structured(TBPSConfig), cfg)


def unknown_keys(node: Any, path: str = "") -> list[str]:
    """Keys of `node` that its dataclass does not declare: Hydra adds `+key=...` and `++key=...` even to a schema."""
    if not isinstance(node, DictConfig):
        return []
    schema = OmegaConf.get_type(node)
    declared = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    unknown = sorted(set(node.keys()) - declared) if declared is not None else []
    issues = []
    if unknown:
        group = path.rstrip(".") or "top-level"
        issues.append(f"Unknown {group} setting(s) {unknown}; valid keys: {sorted(declared)}.")
    for key in node.keys():
        if key not in unknown and OmegaConf.is_dict(node._get_node(key)):
            issues += unknown_keys(node[key], f"{path}{key}.")
    return issues


def with_original_names(overrides: list[str]) -> list[str]:
    """Command-line overrides with the clear loss names (`loss.simclr=true`) written as the keys (`loss.SS=true`)."""
    pattern = re.compile(rf"^([+~]*loss\.)({'|'.join(CLEAR_NAMES)})(?==|$)")
    return [pattern.sub(lambda match: match[1] + CLEAR_NAMES[match[2]], override) for override in overrides]


def validate_config(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every problem of the composed config (before any download or model build)."""
    try:
        config = typed(cfg)
        problems = unknown_keys(config)
        problems += OmegaConf.to_object(config).problems()
    except Exception as error:  # noqa: BLE001 - an interpolation or type error is a config problem to report
        raise ConfigError([f"cannot resolve the config: {error}"]) from None
    if problems:
        raise ConfigError(problems)
