"""Clothes painters: torso and tops (with sleeves), bottoms and shoes, keyed by the attribute vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from data.synthetic.backgrounds import RGB, shade
from data.synthetic.geometry import Draw, Frame, Painter, Point, Pose, box, ellipse, limb, polygon, prefix

LEG_WIDTH = 0.085
ARM_WIDTH = 0.055


def draw_torso(draw: Draw, frame: Frame, pose: Pose, colour: RGB, hem: float) -> None:
    """The top's body from sloped shoulders down to ``hem``."""
    w = pose.half_width
    polygon(
        draw, frame, [(-w, 0.2), (-0.7 * w, 0.16), (0.7 * w, 0.16), (w, 0.2), (0.88 * w, hem), (-0.88 * w, hem)], colour
    )


def _shirt_detail(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    """Collar and a button line, visible from the front."""
    if pose.facing == "front":
        polygon(draw, frame, [(-0.045, 0.16), (0.0, 0.21), (0.045, 0.16)], shade(colour, 1.25))
        limb(draw, frame, [(0.0, 0.21), (0.0, 0.48)], 0.008, shade(colour, 0.6))


def _jacket_detail(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    """Open front with a darker inner strip, visible from the front."""
    if pose.facing == "front":
        polygon(draw, frame, box(0.0, 0.35, 0.025, 0.18), shade(colour, 0.55))


def _dress_skirt(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    w = pose.half_width
    polygon(draw, frame, [(-0.85 * w, 0.45), (0.85 * w, 0.45), (w + 0.05, 0.74), (-w - 0.05, 0.74)], colour)


def _ao_dai_panels(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    """Long front/back flaps over the trousers, split at the hips."""
    offsets = (-0.045, 0.045) if pose.side else (0.0,)
    for du in offsets:
        polygon(draw, frame, [(du - 0.07, 0.45), (du + 0.07, 0.45), (du + 0.085, 0.86), (du - 0.085, 0.86)], colour)


@dataclass(frozen=True)
class _TopStyle:
    """How a top type is drawn beyond its colour."""

    sleeve: float  # fraction of the arm the sleeve covers
    hem: float  # v of the torso piece's lower edge
    detail: Painter | None = None


TOP_STYLES: dict[str, _TopStyle] = {
    "tshirt": _TopStyle(0.38, 0.5),
    "shirt": _TopStyle(1.0, 0.5, _shirt_detail),
    "jacket": _TopStyle(1.0, 0.53, _jacket_detail),
    "dress": _TopStyle(0.3, 0.47, _dress_skirt),
    "ao_dai": _TopStyle(1.0, 0.47, _ao_dai_panels),
}


def _hips(draw: Draw, frame: Frame, pose: Pose, colour: RGB, bottom: float) -> None:
    polygon(draw, frame, box(0.0, (0.46 + bottom) / 2, 0.8 * pose.half_width, (bottom - 0.46) / 2), colour)


def _trousers(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    _hips(draw, frame, pose, colour, 0.56)
    for leg in pose.legs:
        limb(draw, frame, leg, LEG_WIDTH, colour)


def _jeans(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    _trousers(draw, frame, pose, colour)
    for leg in pose.legs:  # a light outer seam tells jeans from plain trousers
        limb(draw, frame, [(u + 0.025, v) for u, v in leg[1:]], 0.007, shade(colour, 1.35))


def _shorts(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    _hips(draw, frame, pose, colour, 0.56)
    for leg in pose.legs:
        limb(draw, frame, prefix(leg, 0.42), LEG_WIDTH * 1.2, colour)


def _skirt(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    w = pose.half_width
    polygon(draw, frame, [(-0.8 * w, 0.45), (0.8 * w, 0.45), (w + 0.04, 0.68), (-w - 0.04, 0.68)], colour)


BOTTOM_DRAWERS: dict[str, Painter] = {
    "trousers": _trousers,
    "jeans": _jeans,
    "shorts": _shorts,
    "skirt": _skirt,
}


def draw_shoes(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    """One shoe per ankle, longer and pointing forward in side views."""
    forward, length = (0.025, 0.065) if pose.side else (0.0, 0.05)
    for leg in pose.legs:
        ellipse(draw, frame, (leg[-1][0] + forward, 0.975, length, 0.025), colour)


def draw_arm(draw: Draw, frame: Frame, arm: Sequence[Point], skin: RGB, sleeve_colour: RGB, sleeve: float) -> None:
    """A bare arm covered by a sleeve over its first ``sleeve`` fraction, and a hand."""
    limb(draw, frame, arm, ARM_WIDTH, skin)
    limb(draw, frame, prefix(arm, sleeve), ARM_WIDTH * 1.2, sleeve_colour)
    ellipse(draw, frame, (*arm[-1], 0.028, 0.028), skin)
