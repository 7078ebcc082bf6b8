"""Image transforms for training, evaluation and SimCLR views, built from plain config mappings.

The training and evaluation pipelines resize the decoded uint8 tensor with torchvision (bicubic, antialiased), so train
and eval images are resampled the same way, and exactly as transformers' default (torchvision-backed) image processor
resizes: an exported model's `preprocessor_config.json` gives evaluation's pixel values (docs/seed_differences.md).
PIL's bicubic differs (it rounds and clips between its two passes), by up to a dozen grey levels on sharp edges.
SimCLR views crop and resize PIL images: they are training-only and heavily augmented. Augmentations run on float
tensors in [0, 1], after ``to tensor`` and before normalisation, which is where erasing-type transforms must run.

Randomness comes from torch's global generator; `data.datasets.ImageTextDataset` seeds it per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

Transform = Callable[[Any], Any]
AugmentationFactory = Callable[..., Transform]


def _without_size(cls: type[v2.Transform]) -> AugmentationFactory:
    """Adapts a transform class whose arguments do not involve the output size."""

    def factory(output_size: tuple[int, int], /, **kwargs: Any) -> Transform:
        return cls(**kwargs)

    return factory


class ShapeRelativeResizedCrop(v2.RandomResizedCrop):
    """RandomResizedCrop whose aspect-ratio range is relative to each input's own aspect (width / height).

    torchvision's range is absolute (w/h in 3/4..4/3 by default, made for square images): on a person crop of
    384x128 (w/h = 1/3) no such window fits, every draw falls back to one fixed centre crop, and resizing it back
    stretches the person 2.25x. Relative to the input, `ratio=(3/4, 4/3)` gives windows of w/h in 1/4..4/9 there: they
    vary, and the output keeps the person's proportions up to the same factor a square image would get.

    Args:
        size: Output (H, W).
        scale: Window area as a fraction of the input's, (min, max).
        ratio: Window aspect relative to the input's aspect, (min, max).
        interpolation: Resampling of the window to `size`.
        antialias: As torchvision's.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        relative, relative_log = self.ratio, self._log_ratio
        own = width / height
        # Rescale the range for this input only; the parent's sampling (and its centre fallback) then sees it.
        self.ratio = (relative[0] * own, relative[1] * own)
        self._log_ratio = relative_log + math.log(own)
        try:
            return super().make_params(flat_inputs)
        finally:
            self.ratio, self._log_ratio = relative, relative_log


class GaussianBlurSigma(v2.Transform):
    """Gaussian blur with a standard deviation drawn uniformly from `sigma` (drawn from torch's generator).

    PIL images are blurred by PIL (`ImageFilter.GaussianBlur`: extended box filters with the Gaussian's variance, as
    MoCo v2 and most SimCLR re-implementations do), about 30x faster on a CPU than torchvision's depthwise
    convolution with SimCLR's kernel of 10 % of each side (1.8 ms against 59 ms per 384x128 view, one core;
    `bench/data_throughput.py`), which made SimCLR's two views the data pipeline's bottleneck. With sigma <= 2 that
    kernel holds +-3 sigma, so it cut nothing off. Tensors go through torchvision's blur with a +-3 sigma kernel.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        super().__init__()
        self.sigma = sigma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"sigma": float(torch.empty(()).uniform_(*self.sigma))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        sigma = params["sigma"]
        if isinstance(inpt, Image.Image):
            return inpt.filter(ImageFilter.GaussianBlur(radius=sigma))
        kernel = 2 * math.ceil(3 * sigma) + 1
        return v2.functional.gaussian_blur(inpt, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


def _with_size(cls: type[v2.Transform]) -> AugmentationFactory:
    """Adapts a crop class so its ``size`` defaults to the output size."""

    def factory(output_size: tuple[int, int], /, **kwargs: Any) -> Transform:
        return cls(**{"size": output_size, **kwargs})

    return factory


# Factories take the output (H, W) first, so crops default to it, then the configured keyword arguments.
AUGMENTATIONS: dict[str, AugmentationFactory] = {
    "color_jitter": _without_size(v2.ColorJitter),
    "random_rotation": _without_size(v2.RandomRotation),
    "random_resized_crop": _with_size(ShapeRelativeResizedCrop),  # `ratio` is relative to the image's aspect
    "random_crop": _with_size(v2.RandomCrop),
    "pad": _without_size(v2.Pad),
    "random_grayscale": _without_size(v2.RandomGrayscale),
    "random_horizontal_flip": _without_size(v2.RandomHorizontalFlip),
    "gaussian_blur": _without_size(v2.GaussianBlur),
    "random_erasing": _without_size(v2.RandomErasing),
}


class RandomSubset:
    """Applies ``k`` transforms drawn without replacement from a pool, in pool order.

    Draws come from torch's global generator (seeded per sample by the training dataset).

    Args:
        transforms: The pool.
        k: How many to apply per call; -1 applies the whole pool.
    """

    def __init__(self, transforms: Sequence[Transform], k: int) -> None:
        if not -1 <= k <= len(transforms):
            raise ValueError(f"random_k must be -1 (all) or between 0 and the pool size {len(transforms)}, got {k}")
        self.transforms = list(transforms)
        self.k = len(transforms) if k == -1 else k

    def __call__(self, image: Any) -> Any:
        chosen = torch.randperm(len(self.transforms))[: self.k].sort().values
        for i in chosen.tolist():
            image = self.transforms[i](image)
        return image

    def __repr__(self) -> str:
        pool = ", ".join(map(repr, self.transforms))
        return f"{type(self).__name__}(k={self.k}, pool=[{pool}])"


def _resize_to_float(size: tuple[int, int]) -> list[v2.Transform]:
    """PIL image -> uint8 tensor -> bicubic antialiased resize (torchvision rounds and clamps to uint8) -> [0, 1]."""
    return [
        v2.ToImage(),
        v2.Resize(tuple(size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
    ]


def _to_float_tensor() -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    # ToPureTensor: hand plain tensors to collate instead of torchvision's Image subclass.
    return [v2.Normalize(mean=list(mean), std=list(std)), v2.ToPureTensor()]


def build_augmentation(name: str, size: tuple[int, int], kwargs: Mapping[str, Any] | None) -> Transform:
    """Builds one augmentation from the registry.

    Args:
        name: A key of ``AUGMENTATIONS``.
        size: Output (H, W); crops use it unless ``kwargs`` sets ``size``.
        kwargs: Keyword arguments of the torchvision transform (None: defaults).

    Raises:
        ValueError: Unknown name or arguments the transform rejects.
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation '{name}'; valid names: {sorted(AUGMENTATIONS)}")
    # Sequences (YAML lists, possibly OmegaConf ListConfig) become tuples, so transforms hold only plain values.
    arguments = {
        key: tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
        for key, value in (kwargs or {}).items()
    }
    try:
        return AUGMENTATIONS[name](tuple(size), **arguments)
    except (TypeError, ValueError) as err:
        raise ValueError(f"augmentation '{name}' rejected its arguments {arguments}: {err}") from err


def build_train_transform(
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    augment: Mapping[str, Mapping[str, Any] | None],
    random_k: int,
) -> v2.Compose:
    """To uint8 tensor -> resize -> to float -> ``random_k`` augmentations of the pool -> normalise.

    Args:
        size: Output (H, W).
        mean: Per-channel normalisation mean (0.5 for SigLIP).
        std: Per-channel normalisation std (0.5 for SigLIP).
        augment: Pool of augmentations, name -> keyword arguments, applied in this order.
        random_k: How many pool entries to apply per image, drawn without replacement; -1 applies all.

    Returns:
        A transform from a PIL image to a float tensor of shape (3, H, W).
    """
    pool = [build_augmentation(name, size, kwargs) for name, kwargs in augment.items()]
    return v2.Compose([*_resize_to_float(size), RandomSubset(pool, random_k), *_normalize(mean, std)])


def build_eval_transform(size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """To uint8 tensor -> resize -> to float -> normalise; deterministic (transformers' image processor's pipeline).

    Returns:
        A transform from a PIL image to a float tensor of shape (3, H, W).
    """
    return v2.Compose([*_resize_to_float(size), *_normalize(mean, std)])


def build_simclr_transform(size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """SimCLR view (Chen et al., arXiv 2002.05709) with the TBPS-CLIP settings.

    Random resized crop (scale 0.2-1, aspect 3/4-4/3 relative to the image's own) -> colour jitter
    (0.4, 0.4, 0.4, 0.1) with p 0.8 -> grayscale p 0.2 ->
    Gaussian blur (sigma 0.1-2; SimCLR's kernel of 10 % of each side holds +-3 sigma) with p 0.5 -> horizontal flip ->
    to tensor -> normalise.

    Returns:
        A transform from a PIL image to a float tensor of shape (3, H, W).
    """
    height, width = size
    return v2.Compose(
        [
            ShapeRelativeResizedCrop(
                (height, width), scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([GaussianBlurSigma(sigma=(0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(),
            *_to_float_tensor(),
            *_normalize(mean, std),
        ]
    )
