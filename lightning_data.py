"""TBPSDataModule: datasets, samplers and loaders for training, validation (gallery + queries) and test."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from data.datasets import EpochTaggedSampler, ImageDataset, ImageTextDataset, TextDataset
from data.images import bad_images_problems, check_images
from data.mlm import mask_tokens
from data.readers import READERS, DatasetNotFoundError, DatasetSplits, EvalSplit, bad_records_problems, read_dataset
from data.samplers import COVERAGES, IdentitySampler, StridedShardSampler
from data.splits import hold_out_identities
from data.subsets import MIX_FORMS, identity_fold, ten_percent_cuhk_vn3k_mix
from data.text import CaptionTokenizer
from data.transforms import AUGMENTATIONS, build_eval_transform, build_simclr_transform, build_train_transform
from utils.config import ConfigError

log = logging.getLogger(__name__)

SAMPLERS = ("random", "identity")
#: Training mixes built from several datasets, by `dataset.dataset_name`.
MIXES = {"TEN_PERCENT_CUHK_VN3K_MIX": ten_percent_cuhk_vn3k_mix}


def data_config_problems(cfg: DictConfig) -> list[str]:
    """Problems in the dataset / aug / tokenizer groups, found without touching the disk."""
    data = cfg.dataset
    issues = []
    if data.dataset_name not in READERS and data.dataset_name not in MIXES:
        issues.append(
            f"dataset.dataset_name={data.dataset_name!r} is unknown; valid: {sorted(READERS) + sorted(MIXES)}."
        )
    if cfg.get("eval_scoring", "cosine") not in ("cosine", "dot"):
        issues.append(f"eval_scoring={cfg.eval_scoring!r} is unknown; valid: ['cosine', 'dot'].")
    if cfg.get("model_selection", "validation") not in ("validation", "test"):
        issues.append(f"model_selection={cfg.model_selection!r} is unknown; valid: ['validation', 'test'].")
    if data.sampler not in SAMPLERS:
        issues.append(f"dataset.sampler={data.sampler!r} is unknown; valid: {list(SAMPLERS)}.")
    if data.get("sampler_coverage", "chunks") not in COVERAGES:
        issues.append(f"dataset.sampler_coverage={data.sampler_coverage!r} is unknown; valid: {list(COVERAGES)}.")
    if data.batch_size < 2:
        issues.append(f"dataset.batch_size must be >= 2 for contrastive losses, got {data.batch_size}.")
    if data.sampler == "identity" and (data.num_instance < 1 or data.batch_size % data.num_instance):
        issues.append(
            f"dataset.batch_size={data.batch_size} must be a multiple of dataset.num_instance={data.num_instance} "
            "with the identity sampler."
        )
    issues += bad_images_problems(data.get("bad_images", "fail"))
    issues += bad_records_problems(data.get("bad_records", "fail"))
    if data.get("mix_form", "identities") not in MIX_FORMS:
        issues.append(f"dataset.mix_form={data.mix_form!r} is unknown; valid: {list(MIX_FORMS)}.")
    unknown_aug = sorted(set(cfg.aug.img.augment_cfg or {}) - set(AUGMENTATIONS))
    if unknown_aug:
        issues.append(f"aug.img.augment_cfg has unknown augmentation(s) {unknown_aug}; valid: {sorted(AUGMENTATIONS)}.")
    if not 0 <= cfg.aug.text.random_deletion < 1:
        issues.append(f"aug.text.random_deletion must be in [0, 1), got {cfg.aug.text.random_deletion}.")
    return issues


def collate_train(
    samples: Sequence[Mapping[str, Any]], tokenizer: CaptionTokenizer, mlm_probability: float | None = None
) -> dict[str, Any]:
    """Stack a training batch, tokenise its (already augmented) captions and, for MLM, mask a copy of them.

    Each caption is masked with a generator seeded from its own sample's seed, so the masks, like the image views,
    depend only on (seed, epoch, sample), not on which samples share its batch or process.
    """
    captions = [sample["captions"] for sample in samples]
    batch = default_collate([{k: v for k, v in sample.items() if k != "captions"} for sample in samples])
    for key, value in tokenizer(captions).items():
        batch[f"caption_{key}"] = value
    if mlm_probability:
        rows = [
            mask_tokens(
                ids,
                mask_token_id=tokenizer.tokenizer.mask_token_id,
                vocab_size=tokenizer.vocab_size,
                special_token_ids=tokenizer.special_token_ids,
                probability=mlm_probability,
                generator=torch.Generator().manual_seed(int(sample["sample_seeds"])),
            )
            for ids, sample in zip(batch["caption_input_ids"], samples)
        ]
        batch["mlm_input_ids"] = torch.stack([masked for masked, _ in rows])
        batch["mlm_labels"] = torch.stack([labels for _, labels in rows])
        if "caption_attention_mask" in batch:
            batch["mlm_attention_mask"] = batch["caption_attention_mask"]
    return batch


def collate_text(samples: Sequence[Mapping[str, Any]], tokenizer: CaptionTokenizer) -> dict[str, Any]:
    batch = {"pids": torch.tensor([sample["pids"] for sample in samples])}
    for key, value in tokenizer([sample["captions"] for sample in samples]).items():
        batch[f"caption_{key}"] = value
    return batch


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
        """
        Args:
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
        self.start_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the number of training epochs done, where a resumed run starts."""
        trainer = self.trainer
        return {"epochs_done": trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start_epoch = int(state_dict.get("epochs_done", 0))

    def setup(self, stage: str | None = None) -> None:
        """Read the dataset; `stage="test"` (evaluating a checkpoint) needs only the test records."""
        if self.splits is not None:
            return
        evaluate_only = stage == "test"
        name, root, seed = self.cfg.dataset.dataset_name, Path(self.cfg.dataset_root_dir), self.cfg.seed
        bad_records = self.cfg.dataset.get("bad_records", "fail")
        if name in MIXES:
            form = self.cfg.dataset.get("mix_form", "identities")
            splits = MIXES[name](root, seed, bad_records=bad_records, form=form)
        else:
            splits = read_dataset(name, root, require_train=not evaluate_only, bad_records=bad_records)
        if evaluate_only:  # only the test images are read: nothing else needs to exist or be decoded
            splits = dataclasses.replace(splits, train=[], val=None)
        if self.cfg.dataset.get("proportion") and not evaluate_only:
            splits = identity_fold(splits, self.cfg.dataset.proportion, self.cfg.dataset.get("fold_id", 0), seed)
        val_identities = self.cfg.dataset.get("val_identities", 0)
        # Selecting on test (the peers' protocol) uses no validation split: every training identity trains.
        selects_on_test = self.cfg.get("model_selection", "validation") == "test"
        if splits.val is None and not evaluate_only and not selects_on_test:
            if not val_identities:
                raise ConfigError(
                    [
                        f"{splits.name} under {splits.root} has no validation split to select checkpoints on: set "
                        "dataset.val_identities=<n> to hold out n training identities for it, or model_selection=test "
                        "for the peers' protocol (every training identity trains, epochs are selected on test)."
                    ]
                )
            splits = hold_out_identities(splits, val_identities, seed)
        # After the fold and hold-out: only images that will be read are checked.
        splits, _ = check_images(splits, self.cfg.dataset.get("bad_images", "fail"))
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
                coverage=data.get("sampler_coverage", "chunks"),
            )
        else:
            # Shuffled from (seed, epoch) alone, each rank taking its stride (one process: all); the remainder is
            # dropped. Same order on resume, whatever the global random state.
            sampler = DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.cfg.seed, drop_last=True
            )
        tagged = EpochTaggedSampler(sampler)
        # Lightning starts this loader's iterator (estimating the schedule's length) before it restores its loops and
        # calls set_epoch, and worker processes prefetch at once: the sampler must already hold the epoch training
        # starts at, which a resumed run knows from the checkpoint (`load_state_dict`).
        tagged.set_epoch(self.start_epoch)
        return DataLoader(
            dataset,
            sampler=tagged,
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            collate_fn=partial(collate_train, tokenizer=self.tokenizer, mlm_probability=self.mlm_probability),
            # Items are seeded by (seed, epoch, index): workers may persist across epochs without changing results.
            persistent_workers=data.num_workers > 0,
            drop_last=True,
            generator=_own_generator(self.cfg.seed),
        )

    def _eval_loaders(self, split: EvalSplit) -> list[DataLoader]:
        size, mean, std = self._image_cfg()
        data = self.cfg.dataset
        common = dict(batch_size=data.test_batch_size, num_workers=data.num_workers, generator=_own_generator(0))
        gallery = ImageDataset(split.image_paths, split.image_pids, build_eval_transform(size, mean, std))
        queries = TextDataset(split.captions, split.caption_pids)
        world, rank = self._replicas()
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
        if self.cfg.get("model_selection", "validation") == "test":
            # The peers' protocol (IRRA, TBPS-CLIP, the original project): epochs are selected on the test split.
            return self._eval_loaders(self.splits.test)
        return self._eval_loaders(self.splits.val)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.splits.test)


def _own_generator(seed: int) -> torch.Generator:
    """A DataLoader draws its workers' base seed when an iterator starts (persistent workers: once, otherwise every
    epoch). From its own generator, that draw leaves the global random stream alone, which dropout uses and
    checkpoints restore: a resumed run then continues that stream exactly as the uninterrupted run did."""
    return torch.Generator().manual_seed(seed)


def ensure_demo_assets(cfg: DictConfig) -> None:
    """Create the embedded dataset and the tiny checkpoint when the config asks for them and they are absent.

    `dataset.synthetic` generates `<dataset_root_dir>/VN3K`; `backbone.tiny` builds `backbone.path` with a
    SentencePiece vocabulary trained on the generated captions. Real datasets and checkpoints carry neither key.
    """
    synthetic = cfg.dataset.get("synthetic")
    root = Path(cfg.dataset_root_dir)
    if synthetic:
        from data.synthetic import SyntheticSpec, ensure_vn3k

        ensure_vn3k(
            root,
            SyntheticSpec(
                num_identities=synthetic.num_identities,
                images_per_identity=tuple(synthetic.images_per_identity),
                image_size=tuple(synthetic.image_size),
                seed=synthetic.seed,
            ),
        )
    tiny = cfg.backbone.get("tiny")
    if tiny and not Path(cfg.backbone.path).exists():
        from data.synthetic import all_captions
        from model.checkpoints import TinySiglipSpec, write_tiny_checkpoint

        if not (root / "VN3K").is_dir():
            raise DatasetNotFoundError(
                f"The tiny tokenizer is trained on {root / 'VN3K'}, which does not exist: set dataset.synthetic "
                "(the demo config does) or point dataset_root_dir at a folder holding VN3K/."
            )
        write_tiny_checkpoint(cfg.backbone.path, all_captions(root / "VN3K"), TinySiglipSpec(**tiny))


def build_datamodule(cfg: DictConfig, stage: str | None = None) -> TBPSDataModule:
    """Tokenizer (plus a mask token when `loss.MLM`) and a set-up data module for the composed config."""
    tokenizer = CaptionTokenizer.from_pretrained(
        cfg.tokenizer.pretrained_model_name_or_path,
        cfg.tokenizer.model_max_length,
        return_attention_mask=cfg.tokenizer.use_attention_mask,
    )
    mlm = bool(cfg.loss.get("MLM", False))
    if mlm:
        tokenizer.add_mask_token()
    datamodule = TBPSDataModule(
        cfg,
        tokenizer,
        simclr_views=bool(cfg.loss.get("SS", False)),
        mlm_probability=cfg.loss.get("mlm_probability", 0.15) if mlm else None,
    )
    datamodule.setup(stage)
    return datamodule
