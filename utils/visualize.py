"""Pictures for inspecting retrieval: failed text-to-image queries and positive/negative similarity histograms.

Pure functions over PIL images or HxW[x3] arrays; PNGs are written atomically (temporary file + rename), so a
crash never leaves a truncated picture. Drawn with PIL only (matplotlib is not a project dependency). Text uses
DejaVu Sans when the system has it (Vietnamese diacritics), otherwise Pillow's built-in font.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ImageLike = Image.Image | np.ndarray

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
RIGHT = (30, 160, 60)  # border of a gallery image of the query's identity
WRONG = (210, 40, 40)
TRUE = (40, 90, 200)  # border of the ground-truth image
PAD = 6
BORDER = 3
TEXT_SIZE = 13
LINE_HEIGHT = 17
CAPTION_LINES = 2
LABEL_HEIGHT = LINE_HEIGHT
TOP_K = 10
EMPTY_SIZE = (360, 48)  # (width, height) of the picture drawn when there are no failures


@dataclass(frozen=True)
class FailureRow:
    """One failed text-to-image query.

    Attributes:
        caption: The query text.
        ranked: Gallery images in rank order (the first `TOP_K` are drawn; fewer is fine).
        correct: For each ranked image, whether it shows the query's identity.
        true_image: One image of the query's identity, or None when the gallery has none.
    """

    caption: str
    ranked: Sequence[ImageLike]
    correct: Sequence[bool]
    true_image: ImageLike | None


@cache
def font(size: int = TEXT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans at `size` if installed, else Pillow's built-in font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def to_pil(image: ImageLike) -> Image.Image:
    """RGB PIL image from a PIL image or an HxW / HxWx3 array (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3)):
        raise ValueError(f"expected an HxW or HxWx3 image array, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array).convert("RGB")


def fit_thumbnail(image: ImageLike, thumb_size: tuple[int, int]) -> Image.Image:
    """`image` scaled to fit (height, width) with its aspect ratio kept, centred on a white tile of that size."""
    height, width = thumb_size
    picture = to_pil(image)
    scale = min(width / picture.width, height / picture.height)
    resized = picture.resize(
        (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), Image.Resampling.BICUBIC
    )
    tile = Image.new("RGB", (width, height), BACKGROUND)
    tile.paste(resized, ((width - resized.width) // 2, (height - resized.height) // 2))
    return tile


def framed(image: ImageLike, thumb_size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    """Thumbnail inside a `BORDER`-pixel frame of `colour`."""
    tile = fit_thumbnail(image, thumb_size)
    frame = Image.new("RGB", (tile.width + 2 * BORDER, tile.height + 2 * BORDER), colour)
    frame.paste(tile, (BORDER, BORDER))
    return frame


def wrap_text(text: str, max_width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `max_width` pixels; the last kept line ends with an ellipsis when text is cut."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font()) <= max_width:
            lines[-1] = candidate
        else:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "…", font=font()) > max_width:
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last + "…"]
    return lines


def draw_lines(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: Sequence[str], fill=INK) -> None:
    x, y = xy
    for i, line in enumerate(lines):
        draw.text((x, y + i * LINE_HEIGHT), line, fill=fill, font=font())


def save_png(image: Image.Image, out_path: str | Path) -> Path:
    """Write `image` as PNG to a temporary file beside `out_path`, then rename it over `out_path`."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".png", dir=out_path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            image.save(file, format="PNG")
        os.replace(temporary, out_path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return out_path


def message_image(text: str, size: tuple[int, int] = EMPTY_SIZE) -> Image.Image:
    """A small white picture saying `text` (used when there is nothing to draw)."""
    picture = Image.new("RGB", size, BACKGROUND)
    draw_lines(ImageDraw.Draw(picture), (PAD, PAD), wrap_text(text, size[0] - 2 * PAD, 2))
    return picture


def failure_gallery(rows: Sequence[FailureRow], out_path: str | Path, *, thumb_size: tuple[int, int]) -> Path:
    """Draw failed text-to-image queries, one row each, and write the PNG.

    Each row: the caption (up to `CAPTION_LINES` lines), then `TOP_K` slots for the top-ranked gallery images with
    a green (right identity) or red (wrong identity) frame and the rank below, then after a gap one true image in
    a blue frame. Slots with no image stay blank. The picture is
    `PAD + (TOP_K + 1) * (w + 2 * BORDER + PAD) + 2 * PAD` wide and
    `PAD + len(rows) * (CAPTION_LINES * LINE_HEIGHT + h + 2 * BORDER + LABEL_HEIGHT + PAD)` high for
    `thumb_size = (h, w)`. With no rows it is an `EMPTY_SIZE` picture saying so.

    Args:
        rows: The failures to draw, in order.
        out_path: PNG to write.
        thumb_size: (height, width) of each thumbnail.

    Raises:
        ValueError: a row whose `ranked` and `correct` lengths differ.
    """
    if not rows:
        return save_png(message_image("No failed queries: every caption found its identity."), out_path)
    for index, row in enumerate(rows):
        if len(row.ranked) != len(row.correct):
            raise ValueError(
                f"failure row {index} ({row.caption[:40]!r}): {len(row.ranked)} ranked images but "
                f"{len(row.correct)} correct flags; pass one flag per ranked image."
            )
    height, width = thumb_size
    slot_w, slot_h = width + 2 * BORDER, height + 2 * BORDER
    row_h = CAPTION_LINES * LINE_HEIGHT + slot_h + LABEL_HEIGHT + PAD
    total_w = PAD + (TOP_K + 1) * (slot_w + PAD) + 2 * PAD  # 2 * PAD: gap before the true image
    picture = Image.new("RGB", (total_w, PAD + len(rows) * row_h), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    for index, row in enumerate(rows):
        top = PAD + index * row_h
        draw_lines(draw, (PAD, top), wrap_text(row.caption, total_w - 2 * PAD, CAPTION_LINES))
        thumbs_top = top + CAPTION_LINES * LINE_HEIGHT
        for rank, (image, right) in enumerate(zip(row.ranked[:TOP_K], row.correct[:TOP_K], strict=True), start=1):
            left = PAD + (rank - 1) * (slot_w + PAD)
            picture.paste(framed(image, thumb_size, RIGHT if right else WRONG), (left, thumbs_top))
            draw.text((left, thumbs_top + slot_h), f"#{rank}", fill=INK, font=font())
        if row.true_image is not None:
            left = PAD + TOP_K * (slot_w + PAD) + 2 * PAD
            picture.paste(framed(row.true_image, thumb_size, TRUE), (left, thumbs_top))
            draw.text((left, thumbs_top + slot_h), "true", fill=TRUE, font=font())
    return save_png(picture, out_path)


HIST_SIZE = (640, 400)  # (width, height)
HIST_MARGINS = (56, 48, 24, 44)  # left, top, right, bottom: room for ticks, legend and labels


def similarity_histogram(
    pos_sims: Sequence[float] | np.ndarray,
    neg_sims: Sequence[float] | np.ndarray,
    out_path: str | Path,
    *,
    bins: int = 50,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Overlaid histograms of positive-pair (green) and negative-pair (red) cosine similarities; write the PNG.

    Each histogram is normalised to fractions of its own pairs, so a few thousand positives and millions of
    negatives share one y axis. Values outside `value_range` are clipped into the edge bins. The picture is
    `HIST_SIZE`; the legend gives each side's count and mean.

    Raises:
        ValueError: both inputs empty, or `bins` < 1.
    """
    pos = np.asarray(pos_sims, dtype=np.float64).ravel()
    neg = np.asarray(neg_sims, dtype=np.float64).ravel()
    if pos.size + neg.size == 0 or bins < 1:
        raise ValueError(f"similarity_histogram needs at least one similarity and bins >= 1 (bins={bins}).")
    low, high = value_range
    edges = np.linspace(low, high, bins + 1)
    fractions = [np.histogram(np.clip(v, low, high), edges)[0] / max(v.size, 1) for v in (pos, neg)]
    top_fraction = max(float(f.max()) for f in fractions) or 1.0

    width, height = HIST_SIZE
    left, top, right, bottom = HIST_MARGINS
    plot_w, plot_h = width - left - right, height - top - bottom
    picture = Image.new("RGBA", HIST_SIZE, BACKGROUND + (255,))
    for fraction, colour in zip(fractions, (RIGHT, WRONG), strict=True):
        layer = Image.new("RGBA", HIST_SIZE, (0, 0, 0, 0))
        layer_draw = ImageDraw.Draw(layer)
        for i, value in enumerate(fraction):
            if value > 0:
                x0, x1 = left + plot_w * i / bins, left + plot_w * (i + 1) / bins
                layer_draw.rectangle(
                    (x0, top + plot_h * (1 - value / top_fraction), x1 - 1, top + plot_h), colour + (150,)
                )
        picture = Image.alpha_composite(picture, layer)
    picture = picture.convert("RGB")
    draw = ImageDraw.Draw(picture)
    draw.line((left, top, left, top + plot_h, left + plot_w, top + plot_h), fill=INK)
    for tick in np.linspace(low, high, 5):
        x = left + plot_w * (tick - low) / (high - low)
        draw.line((x, top + plot_h, x, top + plot_h + 4), fill=INK)
        draw.text((x, top + plot_h + 6), f"{tick:g}", fill=INK, font=font(), anchor="mt")
    draw.text((left - 6, top), f"{top_fraction:.2f}", fill=INK, font=font(), anchor="rm")
    draw.text((left - 6, top + plot_h), "0", fill=INK, font=font(), anchor="rm")
    draw.text(
        (left + plot_w // 2, height - 6),
        "cosine similarity (fraction of pairs per bin)",
        fill=INK,
        font=font(),
        anchor="mb",
    )
    for row, (name, values, colour) in enumerate((("positive", pos, RIGHT), ("negative", neg, WRONG))):
        mean = f"{values.mean():.3f}" if values.size else "n/a"
        y = 8 + row * LINE_HEIGHT
        draw.rectangle((left + 8, y + 2, left + 20, y + 12), fill=colour)
        draw.text((left + 26, y), f"{name} pairs: n={values.size}, mean={mean}", fill=INK, font=font())
    return save_png(picture, out_path)
