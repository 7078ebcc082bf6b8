"""Backgrounds for synthetic pedestrian images: a brick wall, a street with buildings, and a row of shop fronts.

Colours are muted (mixed with grey) so the clothing palette stays the most saturated thing in the picture and a
person stands out from the scene, as in a detector crop.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from PIL import Image, ImageDraw

RGB = tuple[int, int, int]


def shade(rgb: RGB, factor: float) -> RGB:
    """Scales a colour's brightness, clipped to 255."""
    return tuple(min(255, round(channel * factor)) for channel in rgb)


def _muted(rng: random.Random, low: float = 80.0, high: float = 190.0) -> RGB:
    """A random colour pulled towards a grey level in ``[low, high]``."""
    grey = rng.uniform(low, high)
    return tuple(round(0.4 * rng.uniform(0, 255) + 0.6 * grey) for _ in range(3))


def _px(image: Image.Image, value: float) -> int:
    """Converts a length given for a 256-pixel-high canvas to this canvas, so textures scale with image size."""
    return max(1, round(value * image.height / 256))


def _vertical_gradient(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], top: RGB, bottom: RGB) -> None:
    """Fills ``box`` (x0, y0, x1, y1) row by row from ``top`` to ``bottom``."""
    x0, y0, x1, y1 = box
    rows = max(1, y1 - y0)
    for y in range(y0, y1):
        t = (y - y0) / rows
        draw.line([(x0, y), (x1, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))


def _ground(image: Image.Image, horizon: int, rng: random.Random) -> None:
    """Pavement from the horizon down, with a dark ground line at the horizon."""
    draw = ImageDraw.Draw(image)
    colour = _muted(rng, 90, 170)
    _vertical_gradient(draw, (0, horizon, image.width, image.height), shade(colour, 0.85), shade(colour, 1.1))
    draw.line([(0, horizon), (image.width, horizon)], fill=shade(colour, 0.55), width=_px(image, 2))


def wall(image: Image.Image, horizon: int, rng: random.Random) -> None:
    """A brick wall down to the horizon, then pavement."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    base = _muted(rng)
    mortar = shade(base, 0.75)
    draw.rectangle([0, 0, width, height], fill=base)
    brick_h = _px(image, rng.randint(10, 18))
    brick_w = brick_h * rng.randint(2, 3)
    line_w = _px(image, 2)
    for row, y in enumerate(range(0, horizon, brick_h)):
        draw.line([(0, y), (width, y)], fill=mortar, width=line_w)
        for x in range((row % 2) * brick_w // 2, width, brick_w):
            draw.line([(x, y), (x, min(y + brick_h, horizon))], fill=mortar, width=line_w)
    _ground(image, horizon, rng)


def street(image: Image.Image, horizon: int, rng: random.Random) -> None:
    """A sky gradient, building blocks with windows standing on the horizon, then road."""
    draw = ImageDraw.Draw(image)
    width, _ = image.size
    sky = _muted(rng, 150, 220)
    _vertical_gradient(draw, (0, 0, width, horizon), shade(sky, 0.9), shade(sky, 1.15))
    win_w, win_h, step_x, step_y = _px(image, 5), _px(image, 7), _px(image, 12), _px(image, 14)
    x = -_px(image, rng.randint(0, 20))
    while x < width:
        block_w = _px(image, rng.randint(24, 60))
        roof = round(horizon * rng.uniform(0.1, 0.6))
        facade = _muted(rng)
        draw.rectangle([x, roof, x + block_w, horizon], fill=facade)
        for wy in range(roof + win_h, horizon - win_h, step_y):
            for wx in range(x + win_w, x + block_w - win_w - 3, step_x):
                draw.rectangle([wx, wy, wx + win_w, wy + win_h], fill=shade(facade, 0.6))
        x += block_w
    _ground(image, horizon, rng)


def shops(image: Image.Image, horizon: int, rng: random.Random) -> None:
    """Vertical shop-front stripes with noisy horizontal texture and an awning band, then pavement."""
    draw = ImageDraw.Draw(image)
    width, _ = image.size
    x = 0
    while x < width:
        stripe_w = _px(image, rng.randint(16, 48))
        colour = _muted(rng)
        draw.rectangle([x, 0, x + stripe_w, horizon], fill=colour)
        for y in range(0, horizon, _px(image, 3)):
            if rng.random() < 0.3:
                draw.line([(x, y), (x + stripe_w, y)], fill=shade(colour, rng.uniform(0.8, 1.2)))
        awning = round(horizon * rng.uniform(0.15, 0.35))
        draw.rectangle([x, awning, x + stripe_w, awning + _px(image, 8)], fill=shade(_muted(rng, 60, 200), 1.1))
        x += stripe_w
    _ground(image, horizon, rng)


BACKGROUNDS: dict[str, Callable[[Image.Image, int, random.Random], None]] = {
    "wall": wall,
    "street": street,
    "shops": shops,
}
