"""TBPSDataModule: datasets, samplers and loaders for training, validation (gallery + queries) and test."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler

from data.collate import collate_text, collate_train
from data.datasets import ImageDataset, ImageTextDataset, TextDataset
from data.images import check_images
from data.readers import DatasetSplits, EvalSplit
from data.registry import load_splits
from data.samplers import IdentitySampler, ResumableSampler, StridedShardSampler
from data.splits import hold_out_identities
from data.subsets import identity_fold
from data.text import CaptionTokenizer
from data.transforms import build_eval_transform, build_simclr_transform, build_train_transform
from model.objective import Objective
from model.strategies import LossSettings
from utils.config import ConfigError
from utils.errors import InputError
from utils.metrics import RANKS

log = logging.getLogger(__name__)


class TBPSDataModule(L.LightningDataModule):
    """Reads the dataset named by `cfg.dataset.dataset_name` under `cfg.dataset_root_dir`.

    Evaluation loaders come in pairs: index 0 the image gallery, index 1 the caption queries.

    Under data parallelism the module shards the data itself (the trainer runs with use_distributed_sampler=False):
    training through a distributed identity sampler or torch's DistributedSampler, evaluation through strided shards
    that cover every item exactly once.
    """

    def __init__(
        self,
        cfg: DictConfig,
        tokenizer: CaptionTokenizer,
        *,
        simclr_views: bool = False,
        mlm_probability: float | None = None,
    ):
        """Args:
        cfg: The composed config.
        tokenizer: Caption tokenizer (with a mask token when `mlm_probability` is set).
        simclr_views: Also produce the two SimCLR views of each training image.
        mlm_probability: Also produce masked captions for MLM, masking this fraction of tokens.
        """
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.simclr_views = simclr_views
        self.mlm_probability = mlm_probability
        self.splits: DatasetSplits | None = None
        #: Where training starts: `{"epoch": e, "batches_done": k}` (a resumed run: read from its checkpoint).
        self.start: dict[str, int] = {"epoch": 0, "batches_done": 0}
        #: Per evaluation stage ("val", "test"): the trainer's limit, applied to the queries only (QueryLimit).
        self.query_limits: dict[str, int | float] = {}
        #: Stages whose queries the limit cut (their i2t ranks only the images of the kept captions' people).
        self.limited_stages: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: where a run resumed from this checkpoint starts (`train_position`)."""
        return self.train_position()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores the data module before it builds the loaders: the training loader starts here.
        epoch = state_dict.get("epoch", state_dict.get("epochs_done", 0))  # epochs_done: written before mid-epoch
        self.start = {"epoch": int(epoch), "batches_done": int(state_dict.get("batches_done", 0))}

    def train_position(self) -> dict[str, int]:
        """The training epoch under way and how many of its batches are trained, from Lightning's loop progress.

        A checkpoint written mid-epoch (every N steps, on a SLURM signal) resumes after those batches; one written at
        an epoch's end (or after its last batch, at validation) resumes at the next epoch's start.
        """
        if self.trainer is None:
            return {"epoch": 0, "batches_done": 0}
        loop = self.trainer.fit_loop
        epochs = loop.epoch_progress.current
        epoch, done = epochs.processed, 0
        if epochs.started > epochs.processed:  # inside an epoch
            done = loop.epoch_loop.batch_progress.current.processed
            if done >= self.trainer.num_training_batches:
                epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": done}

    def setup(self, stage: str | None = None) -> None:
        """Read the dataset; `stage="test"` (evaluating a checkpoint) needs only the test records."""
        if self.splits is not None:
            return
        evaluate_only = stage == "test"
        data, seed = self.cfg.dataset, self.cfg.seed
        splits = load_splits(
            data.dataset_name,
            self.cfg.dataset_root_dir,
            seed=seed,
            require_train=not evaluate_only,
            bad_records=data.bad_records,
            mix_form=data.mix_form,
        )
        if evaluate_only:  # only the test images are read: nothing else needs to exist or be decoded
            splits = dataclasses.replace(splits, train=[], val=None)
        # Selecting on test (the peers' protocol) uses no validation split: every training identity trains.
        selects_on_test = self.cfg.model_selection == "test"
        hold_out = False
        if splits.val is None and not evaluate_only and not selects_on_test:
            if not data.val_identities:
                raise ConfigError(
                    [
                        f"{splits.name} under {splits.root} has no validation split to select checkpoints on: set "
                        "dataset.val_identities=<n> to hold out n training identities for it, or model_selection=test "
                        "for the peers' protocol (every training identity trains, epochs are selected on test)."
                    ]
                )
            splits = hold_out_identities(splits, data.val_identities, seed)
            hold_out = True
        # After the hold-out: a fold is the asked share of the people that train, and every fold selects its epochs on
        # the same validation people.
        if data.proportion and not evaluate_only:
            splits = identity_fold(splits, data.proportion, data.fold_id, seed)
        # After the fold and hold-out: only images that will be read are checked.
        splits, _ = check_images(splits, data.bad_images)
        _check_ranking_sizes(splits, "val_identities" if hold_out else None)
        self.splits = splits

    @property
    def num_train_ids(self) -> int:
        return self.splits.num_train_ids

    def _replicas(self) -> tuple[int, int]:
        """(world size, global rank) of the attached trainer; (1, 0) outside one."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _image_cfg(self) -> tuple[tuple[int, int], list[float], list[float]]:
        img = self.cfg.aug.img
        return tuple(img.size), list(img.mean), list(img.std)

    def train_dataloader(self) -> DataLoader:
        size, mean, std = self._image_cfg()
        augment = dict(self.cfg.aug.img.augment_cfg or {})
        k = self.cfg.aug.image_random_k
        dataset = ImageTextDataset(
            self.splits.train,
            transform=build_train_transform(size, mean, std, augment, k),
            aug_transform=build_train_transform(size, mean, std, augment, k),
            simclr_transform=build_simclr_transform(size, mean, std) if self.simclr_views else None,
            seed=self.cfg.seed,
            caption_deletion=self.cfg.aug.text.random_deletion,
        )
        data = self.cfg.dataset
        world, rank = self._replicas()
        if data.sampler == "identity":
            sampler = IdentitySampler(
                [s.pid for s in self.splits.train],
                [s.image_id for s in self.splits.train],
                data.batch_size,
                data.num_instance,
                seed=self.cfg.seed,
                num_replicas=world,
                rank=rank,
                coverage=data.sampler_coverage,
            )
        else:
            # Shuffled from (seed, epoch) alone, each rank taking its stride (one process: all); the remainder is
            # dropped. Same order on resume, whatever the global random state.
            sampler = DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.cfg.seed, drop_last=True
            )
        resumable = ResumableSampler(sampler, data.batch_size)
        # Lightning starts this loader's iterator (estimating the schedule's length) before it restores its loops and
        # calls set_epoch, and worker processes prefetch at once: the sampler must already stand where training
        # starts, which a resumed run knows from the checkpoint (`load_state_dict`).
        resumable.resume_at(self.start["epoch"], self.start["batches_done"])
        return TrainLoader(
            dataset,
            position=self.train_position,
            sampler=resumable,
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            collate_fn=partial(collate_train, tokenizer=self.tokenizer, mlm_probability=self.mlm_probability),
            # Items are seeded by (seed, epoch, index): workers may persist across epochs without changing results.
            persistent_workers=data.num_workers > 0,
            drop_last=True,
            generator=_own_generator(self.cfg.seed),
        )

    def _eval_loaders(self, split: EvalSplit, stage: str) -> list[DataLoader]:
        size, mean, std = self._image_cfg()
        data = self.cfg.dataset
        common = dict(batch_size=data.test_batch_size, num_workers=data.num_workers, generator=_own_generator(0))
        gallery = ImageDataset(split.image_paths, split.image_pids, build_eval_transform(size, mean, std))
        world, rank = self._replicas()
        kept = _limited(len(split.captions), self.query_limits.get(stage, 1.0), data.test_batch_size * world, world)
        if kept < len(split.captions):
            self.limited_stages.add(stage)
            log.warning(
                "%s: %d of %d queries ranked against the whole gallery of %d images (trainer.limit_%s_batches; i2t: "
                "the images of their people against them); numbers for debugging, not comparable with a full "
                "evaluation.",
                stage,
                kept,
                len(split.captions),
                len(gallery),
                stage,
            )
        queries = TextDataset(split.captions[:kept], split.caption_pids[:kept])
        if min(len(gallery), len(queries)) < world:
            # A rank without any item would skip the epoch-end gather the others wait in.
            raise ConfigError(
                [
                    f"an evaluation split of {self.splits.name} has {len(gallery)} images and {len(queries)} "
                    f"queries, fewer than the {world} processes: evaluate with fewer trainer.devices."
                ]
            )
        return [
            DataLoader(gallery, sampler=StridedShardSampler(len(gallery), world, rank), **common),
            DataLoader(
                queries,
                sampler=StridedShardSampler(len(queries), world, rank),
                collate_fn=partial(collate_text, tokenizer=self.tokenizer),
                **common,
            ),
        ]

    def val_dataloader(self) -> list[DataLoader]:
        if self.cfg.model_selection == "test":
            # The peers' protocol (IRRA, TBPS-CLIP, the original project): epochs are selected on the test split.
            return self._eval_loaders(self.splits.test, "val")
        return self._eval_loaders(self.splits.val, "val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.splits.test, "test")


class TrainLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch in Lightning's sense (`state_dict` / `load_state_dict`).

    Its state is the training position (`TBPSDataModule.train_position`), which Lightning's fit loop saves with every
    checkpoint; loading it starts the `ResumableSampler` there. Lightning 2.6 only loads loader states when it builds
    the loader after restoring its loops, which it does not when `configure_optimizers` reads
    `estimated_stepping_batches` (Lightning issue #20550): the data module's own state, restored first, positions the
    sampler then. Either way the loader starts at the same place.

    Args:
        position: Returns the current training position (`{"epoch": e, "batches_done": k}`).
        *args, **kwargs: DataLoader's; `sampler` must be a `ResumableSampler`.
    """

    def __init__(self, *args: Any, position: Callable[[], dict[str, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict[str, int]:
        return self.position()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.resume_at(state_dict["epoch"], state_dict["batches_done"])


def _limited(total: int, limit: int | float, batch: int, world: int) -> int:
    """How many of `total` queries a trainer limit keeps: `limit` global batches of `batch`, or that fraction of them
    (Lightning's reading of limit_*_batches). Never fewer than one per process, nor than the largest R@k: i2t ranks
    the images against the kept captions.
    """
    kept = limit * batch if isinstance(limit, int) else int(limit * total)
    return min(max(kept, world, max(RANKS)), total)


def _own_generator(seed: int) -> torch.Generator:
    """A DataLoader draws its workers' base seed when an iterator starts (persistent workers: once, otherwise every
    epoch). From its own generator, that draw leaves the global random stream alone, which dropout uses and
    checkpoints restore: a resumed run then continues that stream exactly as the uninterrupted run did.
    """
    return torch.Generator().manual_seed(seed)


def _check_ranking_sizes(splits: DatasetSplits, hold_out_key: str | None) -> None:
    """Refuse, before training, an evaluation split too small for R@10: text-to-image ranks its images, image-to-text
    its captions, and R@k needs at least k of them (the metrics would stop at the first evaluation).
    """
    need = max(RANKS)
    for name, split in (("validation", splits.val), ("test", splits.test)):
        if split is None:
            continue
        sizes = {"images": len(split.image_paths), "captions": len(split.captions)}
        small = {kind: count for kind, count in sizes.items() if count < need}
        if not small:
            continue
        shown = " and ".join(f"{count} {kind}" for kind, count in small.items())
        fix = (
            f"hold out more people (dataset.{hold_out_key})"
            if name == "validation" and hold_out_key
            else f"give the {name} split of the annotation file more people"
        )
        raise InputError(
            f"the {name} split of {splits.name} under {splits.root} has {shown}: R@{need} ranks {need} of each, so "
            f"it needs at least {need}; {fix}."
        )


def build_datamodule(cfg: DictConfig, stage: str | None = None) -> TBPSDataModule:
    """Tokenizer (plus a mask token when a loss reads masked captions) and a set-up data module for the config."""
    tokenizer = CaptionTokenizer.from_pretrained(
        cfg.tokenizer.pretrained_model_name_or_path,
        cfg.tokenizer.model_max_length,
        return_attention_mask=cfg.tokenizer.use_attention_mask,
    )
    objective = Objective(LossSettings.from_mapping(cfg.loss), use_sigmoid=cfg.backbone.use_sigmoid)
    if objective.needs_masked_captions:
        tokenizer.add_mask_token()
    datamodule = TBPSDataModule(
        cfg,
        tokenizer,
        simclr_views=objective.needs_ss_views,
        mlm_probability=cfg.loss.mlm_probability if objective.needs_masked_captions else None,
    )
    datamodule.setup(stage)
    return datamodule
