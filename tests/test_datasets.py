"""torch Datasets over reader records and the image loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from data.datasets import ImageDataset, ImageTextDataset, TextDataset, load_rgb
from data.readers import TrainSample
from data.transforms import build_eval_transform, build_simclr_transform, build_train_transform

SIZE = (16, 8)
MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture
def samples(tmp_path: Path) -> list[TrainSample]:
    paths = []
    for i, mode in enumerate(["RGB", "L", "RGBA"]):  # the loader must always return RGB
        path = tmp_path / f"{i}.png"
        Image.linear_gradient("L").resize((10, 20)).convert(mode).save(path)
        paths.append(path)
    return [TrainSample(pid=i // 2, image_id=i, image_path=p, caption=f"caption {i}") for i, p in enumerate(paths)]


def test_load_rgb_converts_modes(samples: list[TrainSample]) -> None:
    for sample in samples:
        image = load_rgb(sample.image_path)
        assert image.mode == "RGB" and image.size == (10, 20)


def test_load_rgb_names_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.png")):
        load_rgb(tmp_path / "nope.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(OSError, match=f"cannot read image {broken}"):
        load_rgb(broken)


def test_load_rgb_returns_a_photo_upright_as_its_exif_orientation_says(tmp_path: Path) -> None:
    # A portrait photo (20 wide, 40 tall, red above blue) as a phone stores it: pixels turned a quarter turn
    # counter-clockwise, with EXIF Orientation 6 ("rotate 90 degrees clockwise to display").
    upright = Image.new("RGB", (20, 40), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 20, 20))
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.jpg"
    stored.save(path, exif=exif, quality=95)
    image = load_rgb(path)
    assert image.size == (20, 40)
    red, _, blue = image.getpixel((10, 5))
    assert red > 200 and blue < 60  # the top is red, as displayed


def test_image_text_item_keys(samples: list[TrainSample]) -> None:
    dataset = ImageTextDataset(samples, build_eval_transform(SIZE, MEAN, STD))
    item = dataset[1]
    assert len(dataset) == 3
    assert set(item) == {"index", "sample_seeds", "pids", "image_ids", "images", "captions"}
    assert (item["index"], item["pids"], item["image_ids"], item["captions"]) == (1, 0, 1, "caption 1")
    assert item["images"].shape == (3, *SIZE)


def test_image_text_extra_views_are_independent(samples: list[TrainSample]) -> None:
    train = build_train_transform(SIZE, MEAN, STD, {"random_erasing": {"p": 1.0}}, random_k=-1)
    dataset = ImageTextDataset(
        samples, train, aug_transform=train, simclr_transform=build_simclr_transform(SIZE, MEAN, STD)
    )
    torch.manual_seed(0)
    item = dataset[0]
    assert {"aug_images", "ss_images1", "ss_images2"} <= set(item)
    for key in ("images", "aug_images", "ss_images1", "ss_images2"):
        assert item[key].shape == (3, *SIZE)
    assert not torch.equal(item["images"], item["aug_images"])
    assert not torch.equal(item["ss_images1"], item["ss_images2"])


def test_gallery_and_query_datasets(samples: list[TrainSample]) -> None:
    transform = build_eval_transform(SIZE, MEAN, STD)
    gallery = ImageDataset([samples[0].image_path, samples[2].image_path], [5, 6], transform)
    assert len(gallery) == 2 and gallery[1]["pids"] == 6 and gallery[1]["images"].shape == (3, *SIZE)
    torch.testing.assert_close(gallery[1]["images"], transform(load_rgb(samples[2].image_path)))
    queries = TextDataset(["a", "b", "c"], [5, 5, 6])
    assert len(queries) == 3 and queries[2] == {"pids": 6, "captions": "c"}
    with pytest.raises(ValueError, match="1 image paths but 2 pids"):
        ImageDataset([samples[0].image_path], [5, 6], transform)
    with pytest.raises(ValueError, match="2 captions but 1 pids"):
        TextDataset(["a", "b"], [5])
