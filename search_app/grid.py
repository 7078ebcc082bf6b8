"""The `--grid` picture: per query, its text above a row of the top-k thumbnails with rank and score."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from data.datasets import load_rgb
from search_app.query import QueryResult
from utils.visualize import (
    BACKGROUND,
    BORDER,
    INK,
    LINE_HEIGHT,
    PAD,
    draw_lines,
    font,
    framed,
    message_image,
    save_png,
    wrap_text,
)

QUERY_LINES = 3
FRAME = (150, 150, 150)


def grid_size(num_queries: int, k: int, thumb_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the grid for `num_queries` rows of `k` thumbnails of (height, width) `thumb_size`."""
    height, width = thumb_size
    slot_w, slot_h = width + 2 * BORDER, height + 2 * BORDER
    row_h = QUERY_LINES * LINE_HEIGHT + slot_h + LINE_HEIGHT + PAD
    return PAD + k * (slot_w + PAD), PAD + num_queries * row_h


def results_grid(
    results: Sequence[QueryResult], image_root: str | Path, out_path: str | Path, *, thumb_size: tuple[int, int]
) -> Path:
    """Draw the results and write a PNG of `grid_size(len(results), k, thumb_size)`, k the longest hit list.

    Each row: the query (wrapped to `QUERY_LINES` lines), then the ranked thumbnails labelled `#rank score`.
    """
    k = max((len(result.hits) for result in results), default=0)
    if k == 0:
        return save_png(message_image("No results."), out_path)
    image_root = Path(image_root)
    total_w, total_h = grid_size(len(results), k, thumb_size)
    slot_w = thumb_size[1] + 2 * BORDER
    slot_h = thumb_size[0] + 2 * BORDER
    row_h = (total_h - PAD) // len(results)
    picture = Image.new("RGB", (total_w, total_h), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    for row, result in enumerate(results):
        top = PAD + row * row_h
        draw_lines(draw, (PAD, top), wrap_text(result.query, total_w - 2 * PAD, QUERY_LINES))
        thumbs_top = top + QUERY_LINES * LINE_HEIGHT
        for column, hit in enumerate(result.hits):
            left = PAD + column * (slot_w + PAD)
            picture.paste(framed(load_rgb(image_root / hit.path), thumb_size, FRAME), (left, thumbs_top))
            draw.text((left, thumbs_top + slot_h), f"#{hit.rank} {hit.score:.3f}", fill=INK, font=font(11))
    return save_png(picture, out_path)
