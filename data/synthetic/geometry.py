"""Body-unit geometry and PIL drawing primitives shared by the clothes and accessory painters.

Body units: ``u`` across (units of person height, positive = the person's front in side views) and ``v`` down from
the top of the head (0) to the soles (1). ``Frame`` maps them to canvas pixels, so scale, position and facing
direction are one transform.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import ImageDraw

from data.synthetic.backgrounds import RGB, shade

Point = tuple[float, float]
Draw = ImageDraw.ImageDraw


@dataclass(frozen=True)
class Frame:
    """Maps body units to canvas pixels."""

    cx: float
    top: float
    height: float
    mirror: int  # -1 flips u, so a person facing left has its front towards -x

    def p(self, u: float, v: float) -> Point:
        return self.cx + self.mirror * u * self.height, self.top + v * self.height

    def box(self, cu: float, cv: float, ru: float, rv: float) -> list[float]:
        """Pixel bounding box (x0, y0, x1, y1) of an ellipse given in body units."""
        (xa, y0), (xb, y1) = self.p(cu - ru, cv - rv), self.p(cu + ru, cv + rv)
        return [min(xa, xb), y0, max(xa, xb), y1]


@dataclass(frozen=True)
class Pose:
    """Limb polylines in body units; arms split by whether they are hidden behind the torso."""

    facing: str
    half_width: float  # torso half-width at the shoulders
    legs: tuple[tuple[Point, ...], ...]
    arms_behind: tuple[tuple[Point, ...], ...]
    arms_front: tuple[tuple[Point, ...], ...]

    @property
    def side(self) -> bool:
        return self.facing in ("left", "right")


Painter = Callable[[Draw, Frame, Pose, RGB], None]


def prefix(points: Sequence[Point], fraction: float) -> list[Point]:
    """The first ``fraction`` of a polyline by length (a sleeve along an arm, shorts along a leg)."""
    remaining = fraction * sum(math.dist(a, b) for a, b in zip(points, points[1:]))
    out = [points[0]]
    for a, b in zip(points, points[1:]):
        length = math.dist(a, b)
        if remaining <= length:
            t = remaining / length if length else 0.0
            out.append((a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t))
            return out
        out.append(b)
        remaining -= length
    return out


def limb(draw: Draw, frame: Frame, points: Sequence[Point], width: float, colour: RGB) -> None:
    """A thick polyline with round ends."""
    pixels = [frame.p(u, v) for u, v in points]
    draw.line(pixels, fill=colour, width=max(1, round(width * frame.height)), joint="curve")
    for u, v in (points[0], points[-1]):
        draw.ellipse(frame.box(u, v, width / 2, width / 2), fill=colour)


def polygon(draw: Draw, frame: Frame, points: Sequence[Point], colour: RGB) -> None:
    """A filled polygon with a darker outline."""
    draw.polygon([frame.p(u, v) for u, v in points], fill=colour, outline=shade(colour, 0.7))


def ellipse(draw: Draw, frame: Frame, shape: tuple[float, float, float, float], colour: RGB) -> None:
    """An outlined ellipse given as (centre u, centre v, radius u, radius v)."""
    draw.ellipse(frame.box(*shape), fill=colour, outline=shade(colour, 0.7))


def box(cu: float, cv: float, hu: float, hv: float) -> list[Point]:
    """Corners of an axis-aligned rectangle centred at (cu, cv) with half-sizes (hu, hv)."""
    return [(cu - hu, cv - hv), (cu + hu, cv - hv), (cu + hu, cv + hv), (cu - hu, cv + hv)]
