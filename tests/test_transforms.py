"""Image transforms: shapes, ranges, interpolation, random-k selection and registry errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data import transforms
from data.transforms import (
    AUGMENTATIONS,
    build_eval_transform,
    build_simclr_transform,
    build_train_transform,
)

SIZE = (24, 8)
MEAN = STD = (0.5, 0.5, 0.5)
# The seed's aug/img/siglip.yaml pool.
SIGLIP_POOL = {
    "color_jitter": {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.0},
    "random_rotation": {"degrees": 15},
    "random_resized_crop": {"scale": (0.9, 1.0)},
    "random_grayscale": {"p": 0.1},
    "random_horizontal_flip": {"p": 0.5},
    "random_erasing": {"scale": (0.10, 0.20)},
}


@pytest.fixture
def image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(37, 15, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("random_k", [0, 2, -1])
def test_train_output_shape_dtype_range(image: Image.Image, random_k: int) -> None:
    torch.manual_seed(0)
    transform = build_train_transform(SIZE, MEAN, STD, SIGLIP_POOL, random_k)
    for _ in range(10):
        out = transform(image)
        assert type(out) is torch.Tensor
        assert out.shape == (3, *SIZE) and out.dtype == torch.float32
        assert out.min() >= -1.0 and out.max() <= 1.0


def test_eval_matches_bicubic_reference_and_is_deterministic(image: Image.Image) -> None:
    out = build_eval_transform(SIZE, MEAN, STD)(image)
    # torch's antialiased bicubic on the uint8 image (the resize transformers' torchvision image processors run).
    pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None]
    resized = F.interpolate(pixels, size=SIZE, mode="bicubic", antialias=True, align_corners=False)
    reference = (resized[0].float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(build_eval_transform(SIZE, MEAN, STD)(image), out, atol=0, rtol=0)
    bilinear = np.asarray(image.resize((SIZE[1], SIZE[0]), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    assert not torch.allclose(out, torch.from_numpy((bilinear - 0.5) / 0.5).permute(2, 0, 1))


def test_train_without_augmentation_equals_eval(image: Image.Image) -> None:
    train = build_train_transform(SIZE, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28), SIGLIP_POOL, random_k=0)
    evaluation = build_eval_transform(SIZE, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    torch.testing.assert_close(train(image), evaluation(image), atol=0, rtol=0)


def _spy_pool(monkeypatch: pytest.MonkeyPatch, calls: list[str], names: list[str]) -> dict[str, dict[str, Any]]:
    """Registers augmentations that record their name and check they receive a float tensor."""

    def factory_for(name: str) -> Any:
        def factory(size: tuple[int, int]) -> Any:
            def apply(x: torch.Tensor) -> torch.Tensor:
                assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
                calls.append(name)
                return x

            return apply

        return factory

    for name in names:
        monkeypatch.setitem(AUGMENTATIONS, name, factory_for(name))
    return {name: {} for name in names}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_k_distinct_augmentations_in_pool_order(monkeypatch: pytest.MonkeyPatch, image: Image.Image, k: int) -> None:
    names = ["spy_e", "spy_a", "spy_d", "spy_b", "spy_c"]  # pool order is config order, not alphabetical
    calls: list[str] = []
    transform = build_train_transform(SIZE, MEAN, STD, _spy_pool(monkeypatch, calls, names), random_k=k)
    torch.manual_seed(0)
    chosen_sets = set()
    for _ in range(60):
        calls.clear()
        transform(image)
        assert len(calls) == k and len(set(calls)) == k
        assert calls == sorted(calls, key=names.index)
        chosen_sets.add(tuple(calls))
    assert (len(chosen_sets) == 1) == (k == len(names))  # the subset varies unless it is the whole pool


def test_k_minus_one_applies_whole_pool(monkeypatch: pytest.MonkeyPatch, image: Image.Image) -> None:
    calls: list[str] = []
    names = ["spy_b", "spy_a", "spy_c"]
    build_train_transform(SIZE, MEAN, STD, _spy_pool(monkeypatch, calls, names), random_k=-1)(image)
    assert calls == names


@pytest.mark.parametrize("k", [-2, 7])
def test_k_out_of_range(k: int) -> None:
    with pytest.raises(ValueError, match="random_k"):
        build_train_transform(SIZE, MEAN, STD, SIGLIP_POOL, random_k=k)


def test_erasing_runs_on_tensors(image: Image.Image) -> None:
    white = Image.new("RGB", (15, 37), (255, 255, 255))
    out = build_train_transform(SIZE, MEAN, STD, {"random_erasing": {"p": 1.0, "scale": (0.2, 0.3)}}, -1)(white)
    erased = (out == -1.0).all(dim=0)  # erased pixels are 0 before normalisation
    assert 0.1 < erased.float().mean() < 0.4 and (out[:, ~erased] == 1.0).all()


def test_crop_defaults_to_output_size_and_accepts_override(image: Image.Image) -> None:
    crop = transforms.build_augmentation("random_resized_crop", SIZE, None)
    assert tuple(crop(torch.zeros(3, 50, 50)).shape) == (3, *SIZE)
    crop = transforms.build_augmentation("random_crop", SIZE, {"size": (4, 4)})
    assert tuple(crop(torch.zeros(3, 50, 50)).shape) == (3, 4, 4)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown augmentation 'random_solarize'") as info:
        build_train_transform(SIZE, MEAN, STD, {"random_solarize": {}}, random_k=-1)
    assert all(name in str(info.value) for name in AUGMENTATIONS)


def test_bad_arguments_name_the_augmentation() -> None:
    with pytest.raises(ValueError, match="augmentation 'random_rotation'.*degree"):
        build_train_transform(SIZE, MEAN, STD, {"random_rotation": {"degree": 15}}, random_k=-1)


def test_simclr_views_differ_and_have_output_shape(image: Image.Image) -> None:
    torch.manual_seed(0)
    transform = build_simclr_transform(SIZE, MEAN, STD)
    first, second = transform(image), transform(image)
    assert first.shape == second.shape == (3, *SIZE) and first.dtype == torch.float32
    assert not torch.equal(first, second)


def test_list_arguments_become_tuples() -> None:
    erasing = transforms.build_augmentation("random_erasing", SIZE, {"scale": [0.1, 0.2], "p": 1.0})
    assert erasing.scale == (0.1, 0.2)


def test_simclr_blur_spreads_an_impulse_by_the_drawn_sigma_and_replays_under_a_seed():
    """A Gaussian of standard deviation sigma spreads a single bright pixel with variance sigma^2 along each axis
    (the definition); PIL's extended box filters match that variance by construction.
    """
    from data.transforms import GaussianBlurSigma

    impulse = Image.new("L", (65, 65))
    impulse.putpixel((32, 32), 255)
    for sigma in (1.0, 2.0):
        blurred = GaussianBlurSigma(sigma=(sigma, sigma))(impulse)
        weights = torch.tensor(list(blurred.getdata()), dtype=torch.float64).view(65, 65)
        offsets = torch.arange(65, dtype=torch.float64) - 32
        variance_x = (weights.sum(0) * offsets**2).sum() / weights.sum()
        assert variance_x.item() == pytest.approx(sigma**2, rel=0.15), (sigma, variance_x)
    blur = GaussianBlurSigma()
    torch.manual_seed(3)
    first = blur.make_params([impulse])["sigma"]
    torch.manual_seed(3)
    assert blur.make_params([impulse])["sigma"] == first and 0.1 <= first <= 2.0
