"""torch Datasets over reader records: training pairs, gallery images and caption queries.

Items carry raw caption strings; tokenisation happens in the collate function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from data.readers import TrainSample
from utils.errors import InputError

ImageTransform = Callable[[Image.Image], torch.Tensor]


class ImageReadError(InputError, OSError):
    """An image file referenced by the annotation cannot be decoded."""


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    """An image file referenced by the annotation does not exist."""


#: How to get past bad image files (the end of every image error message).
BAD_IMAGE_FIX = "fix the file, or set dataset.bad_images=skip to drop unreadable images and count them"


def load_rgb(path: Path) -> Image.Image:
    """Loads an image as RGB, failing once with the path instead of retrying (the seed retried forever).

    Raises:
        ImageNotFoundError: The file does not exist.
        ImageReadError: The file exists but PIL cannot decode it.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise ImageNotFoundError(f"image {path} not found; {BAD_IMAGE_FIX}") from err
    # PIL reports undecodable files as OSError (UnidentifiedImageError, truncation) but also as SyntaxError,
    # ValueError or DecompressionBombError depending on the format.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path} ({err}); {BAD_IMAGE_FIX}") from err


class ImageTextDataset(Dataset):
    """Training pairs, one item per caption.

    Args:
        samples: Reader output (``DatasetSplits.train``).
        transform: Training transform for ``images``.
        aug_transform: If given, a second, independently drawn augmentation of the same image (``aug_images``,
            for multi-view supervision).
        simclr_transform: If given, two SimCLR views (``ss_images1``, ``ss_images2``).
    """

    def __init__(
        self,
        samples: Sequence[TrainSample],
        transform: ImageTransform,
        aug_transform: ImageTransform | None = None,
        simclr_transform: ImageTransform | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.aug_transform = aug_transform
        self.simclr_transform = simclr_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = load_rgb(sample.image_path)
        item = {
            "index": index,
            "pids": sample.pid,
            "image_ids": sample.image_id,
            "images": self.transform(image),
            "captions": sample.caption,
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
