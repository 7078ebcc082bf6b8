"""TBPSLitModule: training step, retrieval evaluation and optimisation of the TBPS model."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from config_schema import typed
from data.datasets import load_rgb
from lightning_training_logs import TrainingLogs
from model.backbone import enable_gradient_checkpointing, patch_size_of
from model.build import autocast_dtype, build_model, compile_towers, compiles, store_frozen_linears
from model.features import TrainFeatures, gathered
from model.memory import StepShape, needs_checkpointing, usable_device_bytes
from model.objective import Objective
from model.objectives import cosine_similarity, identity_mask
from model.strategies import LossSettings, StepContext
from solver.build import build_optimizer
from solver.lr_scheduler import build_scheduler
from utils.analysis import save_failure_gallery, save_similarity_histogram
from utils.distributed import (
    all_gather_objects,
    all_gather_with_grad,
    gather_strided_shards,
    rank,
    world_size,
)
from utils.metrics import rank_metrics
from utils.rng import restore_rng_states, rng_states
from utils.tables import results_table

log = logging.getLogger(__name__)

GALLERY, QUERIES = 0, 1  # dataloader indices of an evaluation split
#: Where runs start (`trainer.py`): a relative model or tokenizer folder in a checkpoint's config is relative to it.
PROJECT_ROOT = Path(__file__).resolve().parent
#: The config keys that name a local folder a trained module is rebuilt from.
MODEL_FOLDER_KEYS = (("backbone", "path"), ("tokenizer", "pretrained_model_name_or_path"))


def pair_statistics(feats: TrainFeatures) -> dict[str, Tensor]:
    """Mean cosine of positive (same-person) and negative text-image pairs: Circle Loss claims s_p -> 1, s_n -> 0.

    Masked sums rather than boolean indexing: indexing would synchronise the GPU on every step.
    """
    with torch.no_grad():
        sim = cosine_similarity(feats.text_feats, feats.image_feats)
        pos = identity_mask(feats.pids, feats.pids).float()
        neg = 1 - pos
        s_p = (sim * pos).sum() / pos.sum().clamp_min(1)
        s_n = (sim * neg).sum() / neg.sum().clamp_min(1)
    return {"s_p": s_p, "s_n": s_n, "s_gap": s_p - s_n}


class TBPSLitModule(TrainingLogs, L.LightningModule):
    """Trains a TBPS model with the objective of `cfg.loss` and evaluates t2i / i2t retrieval."""

    def __init__(
        self, cfg: DictConfig | dict[str, Any], *, num_classes: int | None = None, text_vocab_size: int | None = None
    ):
        """Args:
        cfg: The composed config (stored resolved, so a checkpoint rebuilds the module without Hydra; on loading,
            keys added to the schema since take their defaults).
        num_classes: Training identities, for the ID loss's classifier.
        text_vocab_size: Tokenizer size when it exceeds the checkpoint's (MLM adds a mask token).
        """
        super().__init__()
        cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
        self.save_hyperparameters(
            {
                "cfg": OmegaConf.to_container(cfg, resolve=True),
                "num_classes": num_classes,
                "text_vocab_size": text_vocab_size,
            }
        )
        self.cfg = typed(self.hparams.cfg)
        settings = LossSettings.from_mapping(self.cfg.loss)
        self.objective = Objective(settings, use_sigmoid=self.cfg.backbone.use_sigmoid)
        self.model = build_model(
            self.cfg.backbone,
            self.objective,
            lora_cfg=self.cfg.lora,
            num_classes=num_classes,
            text_vocab_size=text_vocab_size,
        )
        self._eval_feats: dict[int, list[tuple[Tensor, Tensor]]] = {GALLERY: [], QUERIES: []}
        self._init_training_logs()
        self._compiled = False  # setup() runs for fit and again for test: compile once
        self.eval_results: dict[str, dict[str, dict[str, float]]] = {}
        #: Every validation's tables by global step (kept in checkpoints), so results.json gives the selected one's.
        self.val_history: dict[int, dict[str, dict[str, float]]] = {}
        #: Printed after "Val results" / "Test results" (which split and which weights the table is about).
        self.eval_labels: dict[str, str] = {}
        if self.cfg.model_selection == "test":
            self.eval_labels["val"] = " [TEST split: the peers' select-on-test protocol, for parity only]"

    @classmethod
    def load_trained(cls, path: str | Path) -> TBPSLitModule:
        """A trained module from a checkpoint written by `trainer.py`, on the CPU, read without unpickling code, from
        any working directory: a relative model or tokenizer folder in its config (a run started in the repository,
        such as the demo's `demo_assets/tiny_siglip`) is found in the repository when the working directory lacks it.
        """
        cfg = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]["cfg"]
        for group, key in MODEL_FOLDER_KEYS:
            folder = cfg.get(group, {}).get(key)
            if folder and not Path(folder).is_absolute() and not Path(folder).exists():
                if (PROJECT_ROOT / folder).exists():
                    cfg[group][key] = str(PROJECT_ROOT / folder)
        return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, cfg=cfg)

    @property
    def text_vocab_size(self) -> int:
        return int(self.model.backbone.config.text_config.vocab_size)

    # ---------------------------------------------------------------- placement
    def setup(self, stage: str) -> None:
        self.prepare(stage, self.trainer.strategy.root_device, str(self.trainer.precision))

    def prepare(self, stage: str, device: torch.device, precision: str) -> None:
        """Apply the speed and memory settings for `stage` on `device` under `precision` (Lightning's `setup` calls
        this; a plain training loop calls it itself): frozen linear weights in half precision and the memory plan when
        training, then compiled towers.
        """
        compiled = self._compiled or compiles(self.cfg.backbone.compile, stage, device)
        if stage == "fit":
            self._store_frozen_weights_in_half(precision)
            self._choose_checkpointing(device, precision, compiled=compiled)
        if compiled:
            self._compile_towers()

    def step_shape(self) -> StepShape:
        """What one training step encodes: the batch, its image views, patches per image and caption tokens."""
        height, width = self.cfg.backbone.image_size
        patch = patch_size_of(self.model.backbone)
        objective = self.objective
        return StepShape(
            batch_size=int(self.cfg.dataset.batch_size),
            image_views=1 + int(objective.needs_aug_view) + 2 * int(objective.needs_ss_views),
            image_tokens=(height // patch) * (width // patch),
            text_tokens=int(self.cfg.tokenizer.model_max_length),
            text_passes=1 + int(objective.needs_masked_captions),
        )

    def _store_frozen_weights_in_half(self, precision: str) -> None:
        """`backbone.half_precision_frozen_weights`: frozen linear weights in the autocast dtype (same values)."""
        dtype = autocast_dtype(precision)
        if not self.cfg.backbone.half_precision_frozen_weights or dtype is None:
            return
        count = store_frozen_linears(self.model, dtype)
        if count:
            log.info("%d frozen linear layers stored in %s, the dtype autocast computes them in.", count, dtype)

    def _choose_checkpointing(self, device: torch.device, precision: str, *, compiled: bool) -> None:
        """`backbone.gradient_checkpointing=null` (auto): on when the step would not fit the GPU without it."""
        if self.cfg.backbone.gradient_checkpointing is not None or device.type != "cuda":
            return
        on, reason = needs_checkpointing(
            self.model.backbone,
            self.model,
            self.step_shape(),
            optimizer=str(self.cfg.optimizer.type).rsplit(".", 1)[-1],
            device_bytes=usable_device_bytes(device),
            mixed_precision="16" in precision,
            compiled=compiled,
        )
        log.info("Memory plan: %s.", reason)
        if on:
            enable_gradient_checkpointing(self.model.backbone)

    def _compile_towers(self) -> None:
        """torch.compile the towers' layers in place (checkpoints keep their keys), once."""
        if self._compiled:
            return
        # Chosen automatically: a GPU or toolchain that fails to compile falls back to eager steps (with dynamo's
        # warning) instead of stopping the run; backbone.compile=true keeps the error.
        settings = self.cfg.backbone
        count = compile_towers(
            self.model.backbone, mode=settings.compile_mode, fall_back_to_eager=settings.compile is None
        )
        self._compiled = True
        log.info(
            "torch.compile (mode %s): %d transformer layers of both towers (compiled on their first batch).",
            settings.compile_mode,
            count,
        )

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The logs of every step the checkpoint holds are written before it (a run resumed from it logs the rest), and
        # never weights a non-finite step may have reached.
        self.settle_training_logs()
        # Lightning restores weights, optimizer, scheduler and loop counters but not the random generators, which
        # drive shuffling and augmentation: without them a resumed run would diverge from an uninterrupted one.
        # One entry per rank (every rank runs this hook before rank 0 writes): each rank augments with its own.
        checkpoint["rng_states"] = all_gather_objects(rng_states())
        checkpoint["val_history"] = self.val_history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_history = dict(checkpoint.get("val_history", {}))
        states = checkpoint.get("rng_states")
        if not states:
            return
        per_rank = states if isinstance(states, list) else [states]
        if len(per_rank) != world_size():
            log.warning(
                "The checkpoint holds the random states of %d process(es), this run has %d: resuming with rank 0's, "
                "so augmentation will not replay the interrupted run exactly.",
                len(per_rank),
                world_size(),
            )
        restore_rng_states(per_rank[rank() if rank() < len(per_rank) else 0])

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        objective = self.objective
        feats = self.model(
            batch,
            aug_view=objective.needs_aug_view,
            ss_views=objective.needs_ss_views,
            raw_features=objective.needs_raw_features,
        )
        if objective.settings.gather_features and self.trainer.world_size > 1:
            feats = gathered(feats, all_gather_with_grad)
        context = StepContext(epoch=self.fractional_epoch(batch_idx))
        terms = objective(feats, context)
        total = torch.stack(list(terms.values())).sum()
        stats = {"logit_scale": feats.logit_scale, "logit_bias": feats.logit_bias, **pair_statistics(feats)}
        if objective.settings.circle_term:
            # Filled on the device: a CPU tensor (or a float) would be copied from pageable memory, which waits for
            # the GPU to finish the step (a host synchronisation per step).
            weight = self.objective.settings.circle_weight(context.epoch)
            stats["circle_weight"] = torch.full((), weight, device=total.device)
        self.record_step(batch_idx, total, terms, stats)
        return total

    def fractional_epoch(self, batch_idx: int) -> float:
        """The current epoch plus the fraction of its training batches done before `batch_idx`.

        Read from Lightning's loop (not derived from the optimizer step count, which gradient accumulation skews), so
        the curriculum and the soft-label ramp change exactly at epoch boundaries.
        """
        batches = self.trainer.num_training_batches
        fraction = batch_idx / batches if 0 < batches < float("inf") else 0.0
        return self.current_epoch + fraction

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._queue_step_logs()
        self.write_training_logs()

    def on_train_epoch_end(self) -> None:
        self.settle_training_logs()

    def on_validation_start(self) -> None:
        # Validation inside training comes before the epoch's end: it would rank the features of non-finite weights.
        self.settle_training_logs()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.cfg.optimizer, self.model)
        trainer = self.trainer
        total = int(trainer.estimated_stepping_batches)  # loads the training batches: num_training_batches is known
        # Lightning steps at the end of every accumulate_grad_batches batches and at an epoch's last batch.
        batches = trainer.num_training_batches
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else None
        scheduler = build_scheduler(optimizer, self.cfg.scheduler, total, steps_per_epoch=per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- evaluation
    def _eval_step(self, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        # "dot" keeps the raw pooled embeddings: the original project ranked by unnormalised dot products (its published
        # numbers); "cosine" (default) ranks by cosine similarity, as training optimises.
        normalise = self.cfg.eval_scoring == "cosine"
        if dataloader_idx == GALLERY:
            embed = self.model.encode_image if normalise else self.model.image_embeddings
            feats = embed(batch["images"])
        else:
            embed = self.model.encode_text if normalise else self.model.text_embeddings
            feats = embed(batch["caption_input_ids"], batch.get("caption_attention_mask"))
        self._eval_feats[dataloader_idx].append((feats.float(), batch["pids"]))

    def _eval_split(self, index: int) -> tuple[Tensor, Tensor]:
        """Features and pids of the whole gallery (or query set), in dataset order, from every rank's shard."""
        # Every rank holds at least one item: the data module refuses splits smaller than the world.
        parts = self._eval_feats[index]
        feats, pids = torch.cat([f for f, _ in parts]), torch.cat([p for _, p in parts])
        if self.trainer.world_size > 1:
            feats, pids = gather_strided_shards(feats), gather_strided_shards(pids)
        return feats, pids

    def _eval_epoch_end(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            # Lightning's sanity check encodes a few batches of each loader, a part of the gallery: it checks the code
            # path; ranking queries against part of the gallery would report nothing meaningful (or fail).
            self._eval_feats = {GALLERY: [], QUERIES: []}
            return
        (image_feats, image_pids), (text_feats, text_pids) = (self._eval_split(i) for i in (GALLERY, QUERIES))
        self._eval_feats = {GALLERY: [], QUERIES: []}
        results = sim_t2i = failure = None
        if self.trainer.is_global_zero:  # ranked once; every rank then logs the same numbers
            sim_t2i = text_feats @ image_feats.T  # (Q_text, G_image) cosine (or, with eval_scoring=dot, raw) scores
            budget = self.cfg.eval_memory_budget_mb * 2**20  # per query chunk of the ranking
            try:
                sim_i2t, i2t_pids = sim_t2i.T, image_pids
                if stage in getattr(self.trainer.datamodule, "limited_stages", ()):
                    # Only some captions were kept (trainer.limit_*_batches): images of other people have no
                    # relevant caption left, so i2t ranks the images of the kept captions' people.
                    shown = torch.isin(image_pids, text_pids)
                    sim_i2t, i2t_pids = sim_i2t[shown], image_pids[shown]
                results = {
                    "t2i": rank_metrics(sim_t2i, text_pids, image_pids, memory_budget_bytes=budget),
                    "i2t": rank_metrics(sim_i2t, i2t_pids, text_pids, memory_budget_bytes=budget),
                }
            except Exception as error:
                if self.trainer.world_size == 1:
                    raise
                failure = error
        if self.trainer.world_size > 1:
            # The other ranks wait here: they learn of a failure on rank 0 and stop too, instead of hanging.
            results, message = self.trainer.strategy.broadcast((results, failure and repr(failure)), src=0)
            if failure is not None:
                raise failure
            if message is not None:
                raise RuntimeError(f"evaluation failed on rank 0: {message}")
        self.eval_results[stage] = results
        if stage == "val" and self.trainer.state.fn == "fit":
            self.val_history[self.global_step] = results
        # Identical on every rank; sync_dist only tells Lightning so (a mean of equal values).
        self.log_dict(
            {f"{stage}/{task}_{k}": v for task, metrics in results.items() for k, v in metrics.items()}, sync_dist=True
        )
        self.log(f"{stage}_score", results["t2i"]["R1"], prog_bar=stage == "val", sync_dist=True)
        if sim_t2i is not None:
            self._save_pictures(stage, sim_t2i, text_pids, image_pids)
        if self.trainer.is_global_zero:
            log.info("%s results%s:\n%s", stage.capitalize(), self.eval_labels.get(stage, ""), results_table(results))

    def _save_pictures(self, stage: str, sim_t2i: Tensor, text_pids: Tensor, image_pids: Tensor) -> None:
        """Similarity histogram (every evaluation) and, at test time, the failure gallery; PNGs in the run folder,
        also logged to W&B when it is the logger.
        """
        if self.cfg.eval_scoring != "cosine":
            return  # the histogram and thresholds are about cosines
        out = Path(self.trainer.default_root_dir)
        pictures = {
            f"{stage}/similarity": save_similarity_histogram(
                sim_t2i, text_pids, image_pids, out / f"similarity_{stage}.png"
            )
        }
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "test" and datamodule is not None:
            split = datamodule.splits.test
            pictures["test/failures"] = save_failure_gallery(
                sim_t2i,
                text_pids,
                image_pids,
                split.captions,
                lambda i: load_rgb(split.image_paths[i]),
                out / "failures.png",
            )
        if isinstance(self.logger, WandbLogger):
            for key, path in pictures.items():
                self.logger.log_image(key=key, images=[str(path)])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
