"""utils/visualize.py: failure gallery layout and frame colours, similarity histogram bars, atomic PNG writes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from utils.visualize import (
    BORDER,
    CAPTION_LINES,
    EMPTY_SIZE,
    HIST_MARGINS,
    HIST_SIZE,
    LABEL_HEIGHT,
    LINE_HEIGHT,
    PAD,
    RIGHT,
    TOP_K,
    TRUE,
    WRONG,
    FailureRow,
    failure_gallery,
    similarity_histogram,
)

THUMB = (48, 24)


def _person(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (30, 60), colour)


def _rows() -> list[FailureRow]:
    ranked = [_person((i * 20, 100, 150)) for i in range(12)]  # more than TOP_K: only ten are drawn
    flags = [i % 3 == 0 for i in range(12)]
    array = np.full((40, 20, 3), 0.5)  # a float array in [0, 1]
    return [
        FailureRow("Người phụ nữ mặc áo sơ mi trắng, đeo ba lô đỏ " * 4, ranked, flags, _person((0, 0, 0))),
        FailureRow("a man in a black jacket", [array, np.zeros((40, 20), np.uint8)], [False, True], None),
        FailureRow("no gallery at all", [], [], _person((255, 0, 0))),
    ]


def test_failure_gallery_size_and_frames(tmp_path):
    out = failure_gallery(_rows(), tmp_path / "fail.png", thumb_size=THUMB)
    height, width = THUMB
    slot_w, slot_h = width + 2 * BORDER, height + 2 * BORDER
    row_h = CAPTION_LINES * LINE_HEIGHT + slot_h + LABEL_HEIGHT + PAD
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        assert picture.size == (PAD + (TOP_K + 1) * (slot_w + PAD) + 2 * PAD, PAD + 3 * row_h)
        pixels = picture.convert("RGB")

    def frame(row: int, column: int) -> tuple[int, int, int]:
        left = PAD + column * (slot_w + PAD) + (2 * PAD if column == TOP_K else 0)
        return pixels.getpixel((left + 1, PAD + row * row_h + CAPTION_LINES * LINE_HEIGHT + 1))

    flags = [i % 3 == 0 for i in range(TOP_K)]
    assert [frame(0, c) for c in range(TOP_K)] == [RIGHT if f else WRONG for f in flags]
    assert frame(0, TOP_K) == TRUE
    assert [frame(1, 0), frame(1, 1)] == [WRONG, RIGHT]
    assert frame(1, 2) == frame(1, TOP_K) == frame(2, 0) == (255, 255, 255)  # empty slots stay blank
    assert frame(2, TOP_K) == TRUE


def test_failure_gallery_with_no_failures_says_so(tmp_path):
    with Image.open(failure_gallery([], tmp_path / "none.png", thumb_size=THUMB)) as picture:
        assert picture.size == EMPTY_SIZE
        assert np.asarray(picture.convert("L")).min() < 128  # some text was drawn


def test_failure_gallery_rejects_mismatched_flags(tmp_path):
    row = FailureRow("caption", [_person((1, 2, 3))] * 3, [True, False], None)
    with pytest.raises(ValueError, match="failure row 0 .*3 ranked images but 2 correct flags"):
        failure_gallery([row], tmp_path / "bad.png", thumb_size=THUMB)
    assert not list(tmp_path.iterdir())


def _blend(colour: tuple[int, int, int], alpha: int = 150) -> np.ndarray:
    return np.array([round((c * alpha + 255 * (255 - alpha)) / 255) for c in colour])


def _bar_columns(picture: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    left, top, right, bottom = HIST_MARGINS
    baseline = picture[HIST_SIZE[1] - bottom - 1, :, :].astype(int)  # the row just above the x axis
    return np.flatnonzero(np.abs(baseline - _blend(colour)).max(axis=1) <= 2)


def test_similarity_histogram_puts_each_distribution_in_its_bins(tmp_path):
    rng = np.random.default_rng(0)
    pos = 0.9 + 0.01 * rng.standard_normal(500)
    neg = -0.5 + 0.01 * rng.standard_normal(5000)
    out = similarity_histogram(pos, neg, tmp_path / "hist.png", bins=40)
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == HIST_SIZE
        pixels = np.asarray(picture.convert("RGB"))
    left, _, right, _ = HIST_MARGINS
    plot_w = HIST_SIZE[0] - left - right

    def x_of(value: float) -> float:
        return left + plot_w * (value + 1) / 2

    green, red = _bar_columns(pixels, RIGHT), _bar_columns(pixels, WRONG)
    assert green.size and red.size
    assert x_of(0.8) <= green.min() and green.max() <= x_of(1.0)
    assert x_of(-0.6) <= red.min() and red.max() <= x_of(-0.4)


def test_similarity_histogram_errors_and_atomic_overwrite(tmp_path):
    with pytest.raises(ValueError, match="at least one similarity"):
        similarity_histogram([], [], tmp_path / "empty.png")
    target = tmp_path / "hist.png"
    target.write_bytes(b"old")
    similarity_histogram([0.5], [], target)
    with Image.open(target) as picture:
        picture.verify()
    assert [p.name for p in tmp_path.iterdir()] == ["hist.png"]  # no temporary file left behind
