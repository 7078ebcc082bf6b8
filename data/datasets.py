"""torch Datasets over reader records: training pairs, gallery images and caption queries.

Items carry raw caption strings; tokenisation happens in the collate function.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from data.readers import TrainSample
from data.text import random_deletion
from utils.errors import InputError

ImageTransform = Callable[[Image.Image], torch.Tensor]


class ImageReadError(InputError, OSError):
    """An image file referenced by the annotation cannot be decoded."""


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    """An image file referenced by the annotation does not exist."""


#: How to get past bad image files (the end of every image error message).
BAD_IMAGE_FIX = "fix the file, or set dataset.bad_images=skip to drop unreadable images and count them"


def load_rgb(path: Path) -> Image.Image:
    """Loads an image as RGB, upright as it is displayed (its EXIF orientation applied: a phone's portrait photo is
    stored sideways with a tag saying so), failing once with the path instead of retrying.

    Raises:
        ImageNotFoundError: The file does not exist.
        ImageReadError: The file exists but PIL cannot decode it.
    """
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError as err:
        raise ImageNotFoundError(f"image {path} not found; {BAD_IMAGE_FIX}") from err
    # PIL reports undecodable files as OSError (UnidentifiedImageError, truncation) but also as SyntaxError,
    # ValueError or DecompressionBombError depending on the format.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path} ({err}); {BAD_IMAGE_FIX}") from err


def sample_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """A 63-bit seed for the random draws of one training sample in one epoch.

    Augmentations drawn from it depend only on (run seed, epoch, sample index, how many times the sample was already
    drawn this epoch): not on the DataLoader worker that happens to load the sample, the number of workers, nor on
    what ran before (so a resumed run draws exactly what the uninterrupted run drew). A sample drawn twice in an epoch
    (an identity padded to K) gets two different augmentations.
    """
    state = np.random.SeedSequence([seed, epoch, index, repeat]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class EpochTaggedSampler(Sampler):
    """Yields `(epoch, index, repeat)` for every index of a wrapped sampler, so a dataset item knows its epoch and how
    many times this process already drew it in the epoch.

    `set_epoch` (called by Lightning before every training epoch, resumed ones included) is passed on to the wrapped
    sampler.
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return _tagged(self.epoch, iter(self.sampler))


def _tagged(epoch: int, indices: Iterator[int]) -> Iterator[tuple[int, int, int]]:
    drawn: Counter[int] = Counter()
    for index in indices:
        yield epoch, index, drawn[index]
        drawn[index] += 1


class ImageTextDataset(Dataset):
    """Training pairs, one item per caption, each augmented from its own seeded generator.

    Items are looked up by `(epoch, index, repeat)` (see `EpochTaggedSampler`) or by a plain index (epoch 0). Every
    random draw of an item (image augmentations, caption word deletion, the MLM masking of its caption) comes from
    `sample_seed(seed, epoch, index, repeat)`.

    Args:
        samples: Reader output (``DatasetSplits.train``).
        transform: Training transform for ``images``.
        aug_transform: If given, a second, independently drawn augmentation of the same image (``aug_images``,
            for multi-view supervision).
        simclr_transform: If given, two SimCLR views (``ss_images1``, ``ss_images2``).
        seed: The run's seed.
        caption_deletion: Probability of dropping each caption word (EDA random deletion); 0 keeps captions.
    """

    def __init__(
        self,
        samples: Sequence[TrainSample],
        transform: ImageTransform,
        aug_transform: ImageTransform | None = None,
        simclr_transform: ImageTransform | None = None,
        *,
        seed: int = 0,
        caption_deletion: float = 0.0,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.aug_transform = aug_transform
        self.simclr_transform = simclr_transform
        self.seed = seed
        self.caption_deletion = caption_deletion

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, ...]) -> dict[str, Any]:
        epoch, index, repeat = (*key, 0)[:3] if isinstance(key, tuple) else (0, key, 0)
        sample = self.samples[index]
        image = load_rgb(sample.image_path)
        seed = sample_seed(self.seed, epoch, index, repeat)
        # The transforms draw from torch's CPU generator: seed it for this sample only (the CUDA generators, which
        # dropout uses in the main process, are not touched), and leave the caller's stream as it was.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            item = {
                "index": index,
                "sample_seeds": seed,
                "pids": sample.pid,
                "image_ids": sample.image_id,
                "images": self.transform(image),
                "captions": random_deletion(sample.caption, self.caption_deletion, random.Random(seed)),
            }
            if self.aug_transform is not None:
                item["aug_images"] = self.aug_transform(image)
            if self.simclr_transform is not None:
                item["ss_images1"] = self.simclr_transform(image)
                item["ss_images2"] = self.simclr_transform(image)
        return item


class ImageDataset(Dataset):
    """Gallery images with their person ids (``EvalSplit.image_paths`` / ``image_pids``).

    Args:
        paths: Image files.
        pids: Person id of each image.
        transform: Evaluation transform.
    """

    def __init__(self, paths: Sequence[Path], pids: Sequence[int], transform: ImageTransform) -> None:
        if len(paths) != len(pids):
            raise ValueError(f"ImageDataset got {len(paths)} image paths but {len(pids)} pids")
        self.paths = paths
        self.pids = pids
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pids": self.pids[index], "images": self.transform(load_rgb(self.paths[index]))}


class TextDataset(Dataset):
    """Caption queries with their person ids (``EvalSplit.captions`` / ``caption_pids``).

    Args:
        captions: Query texts.
        pids: Person id of each caption.
    """

    def __init__(self, captions: Sequence[str], pids: Sequence[int]) -> None:
        if len(captions) != len(pids):
            raise ValueError(f"TextDataset got {len(captions)} captions but {len(pids)} pids")
        self.captions = captions
        self.pids = pids

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pids": self.pids[index], "captions": self.captions[index]}
