"""The data config groups (`dataset`, `aug`, `tokenizer`) as typed settings, each with the checks of its values.

They are the groups' schema: Hydra composes the YAML files onto them, so an unknown key or a wrong type fails at
composition, and every default below is written only here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data.images import bad_images_problems
from data.readers import bad_records_problems
from data.registry import DATASETS
from data.samplers import COVERAGES, SAMPLERS
from data.subsets import MIX_FORMS
from data.transforms import AUGMENTATIONS


def _choice(key: str, value: str, valid: tuple[str, ...] | dict) -> list[str]:
    return [] if value in valid else [f"{key}={value!r} is unknown; valid: {list(valid)}."]


@dataclass
class SyntheticSettings:
    """Generate `<dataset_root_dir>/VN3K` when absent (data/synthetic), in the VN3K layout."""

    num_identities: int = 320
    images_per_identity: list[int] = field(default_factory=lambda: [2, 4])  # inclusive (min, max) per person
    image_size: list[int] = field(default_factory=lambda: [128, 64])  # (height, width) of the generated photos
    seed: int = 0


@dataclass
class DatasetSettings:
    """The `dataset` config group."""

    dataset_name: str = "???"  # a key of data.registry.DATASETS
    batch_size: int = 32
    sampler: str = "random"  # random | identity (num_instance samples of the same person per identity)
    num_instance: int = 1
    # identity sampler: chunks (re-ID convention: drops n mod K, pads small identities) | all (each sample once)
    sampler_coverage: str = "chunks"
    test_batch_size: int = 512
    # DataLoader workers; unset: enough to feed a GPU (utils.config.default_num_workers), at most the cores less one.
    num_workers: int = "${default_num_workers:}"  # type: ignore[assignment]
    val_identities: int = 0  # held out from train when the dataset has no validation split (0: require one)
    proportion: float | None = None  # e.g. 0.1: train on one fold of the identities (data-efficiency runs)
    fold_id: int = 0  # which fold, 0 .. int(1 / proportion) - 1
    bad_images: str = "fail"  # fail: stop at a missing image (path named) | skip: drop and count them
    bad_records: str = "fail"  # fail: name the first malformed caption or record | skip: drop, count and log them
    mix_form: str = "identities"  # TEN_PERCENT_CUHK_VN3K_MIX: identities | images (the original project's)
    synthetic: SyntheticSettings | None = None  # the embedded demo data, generated when absent

    def problems(self) -> list[str]:
        issues = _choice("dataset.dataset_name", self.dataset_name, DATASETS)
        issues += _choice("dataset.sampler", self.sampler, SAMPLERS)
        issues += _choice("dataset.sampler_coverage", self.sampler_coverage, COVERAGES)
        issues += bad_images_problems(self.bad_images) + bad_records_problems(self.bad_records)
        issues += _choice("dataset.mix_form", self.mix_form, MIX_FORMS)
        if self.batch_size < 2:
            issues.append(f"dataset.batch_size must be >= 2 for contrastive losses, got {self.batch_size}.")
        if self.sampler == "identity" and (self.num_instance < 1 or self.batch_size % self.num_instance):
            issues.append(
                f"dataset.batch_size={self.batch_size} must be a multiple of dataset.num_instance={self.num_instance} "
                "with the identity sampler."
            )
        return issues


@dataclass
class ImageAugSettings:
    size: list[int] = "${img_size}"  # type: ignore[assignment]  # (height, width): the top-level img_size
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    augment_cfg: dict[str, Any] | None = None  # augmentation name (data.transforms.AUGMENTATIONS) -> its arguments


@dataclass
class TextAugSettings:
    random_deletion: float = 0.0  # drop each word with this probability (EDA); 0 disables


@dataclass
class AugSettings:
    """The `aug` config group: `image_random_k` augmentations of `img.augment_cfg` are drawn per training image."""

    image_random_k: int = 2
    img: ImageAugSettings = field(default_factory=ImageAugSettings)
    text: TextAugSettings = field(default_factory=TextAugSettings)

    def problems(self) -> list[str]:
        issues = []
        unknown = sorted(set(self.img.augment_cfg or {}) - set(AUGMENTATIONS))
        if unknown:
            issues.append(f"aug.img.augment_cfg has unknown augmentation(s) {unknown}; valid: {sorted(AUGMENTATIONS)}.")
        if not 0 <= self.text.random_deletion < 1:
            issues.append(f"aug.text.random_deletion must be in [0, 1), got {self.text.random_deletion}.")
        return issues


@dataclass
class TokenizerSettings:
    """The `tokenizer` config group."""

    pretrained_model_name_or_path: str = "${backbone.path}"  # a folder with the tokenizer files
    model_max_length: int = 64  # SigLIP pools the last position: captions are right-padded to exactly this length
    use_attention_mask: bool = False  # SigLIP was pre-trained without a text mask (parity=seed passes one)
