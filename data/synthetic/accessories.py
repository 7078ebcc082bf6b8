"""Head, hair, hat and bag painters, keyed by the attribute vocabulary."""

from __future__ import annotations

from data.synthetic.attributes import HAIR_COLOURS, PersonAttributes
from data.synthetic.backgrounds import RGB, shade
from data.synthetic.geometry import Draw, Frame, Painter, Pose, box, ellipse, limb, polygon

HEAD = (0.0, 0.075, 0.055, 0.066)  # centre u, centre v, radius u, radius v
STRAW: RGB = (214, 188, 128)  # colour of hats that captions never colour (nón lá)


def draw_head(draw: Draw, frame: Frame, pose: Pose, attrs: PersonAttributes, skin: RGB) -> None:
    """Neck, hair and face; long hair falls over the shoulders (front), down the back or behind the head (side)."""
    hair = HAIR_COLOURS[attrs.hair_colour].rgb
    cu, cv, ru, rv = HEAD
    polygon(draw, frame, box(0.0, 0.15, 0.022, 0.03), skin)  # neck
    if attrs.hair_length == "long":
        strands = {"front": [(-0.065, 0.17), (0.065, 0.17)], "back": [(0.0, 0.17)]}.get(pose.facing, [(-0.045, 0.16)])
        for su, sv in strands:
            half = 0.075 if pose.facing == "back" else 0.022
            polygon(draw, frame, box(su, sv, half, 0.1), hair)
    ellipse(draw, frame, (cu, cv - 0.006, ru + 0.004, rv + 0.002), hair)
    faces = {"front": (cu, cv + 0.012, ru - 0.008, rv - 0.014), "back": None}
    face = faces.get(pose.facing, (cu + 0.016, cv + 0.012, ru - 0.016, rv - 0.016))
    if face is not None:
        ellipse(draw, frame, face, skin)


def _cap(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    cu, cv, ru, rv = HEAD
    draw.chord(frame.box(cu, cv, ru + 0.005, rv + 0.006), 180, 360, fill=colour, outline=shade(colour, 0.7))
    brims = {"front": box(0.0, cv - 0.004, ru + 0.008, 0.008), "back": None}
    brim = brims.get(pose.facing, box(ru + 0.02, cv - 0.004, 0.035, 0.007))
    if brim is not None:
        polygon(draw, frame, brim, shade(colour, 0.8))


def _helmet(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    cu, cv, ru, rv = HEAD
    draw.chord(frame.box(cu, cv + 0.012, ru + 0.014, rv + 0.016), 180, 360, fill=colour, outline=shade(colour, 0.6))
    limb(draw, frame, [(cu - ru - 0.01, cv + 0.012), (cu + ru + 0.01, cv + 0.012)], 0.01, shade(colour, 0.5))


def _conical(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    polygon(draw, frame, [(0.0, -0.055), (0.135, 0.045), (-0.135, 0.045)], colour)
    limb(draw, frame, [(-0.07, -0.003), (0.07, -0.003)], 0.006, shade(colour, 0.75))


HAT_DRAWERS: dict[str, Painter] = {
    "cap": _cap,
    "helmet": _helmet,
    "conical": _conical,
}


def _backpack_behind(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    """The pack's body where it shows past the torso: on the back in side views, at the sides from the front."""
    if pose.side:
        polygon(draw, frame, box(-pose.half_width - 0.03, 0.32, 0.05, 0.12), colour)
    elif pose.facing == "front":
        polygon(draw, frame, box(0.0, 0.31, pose.half_width + 0.025, 0.11), colour)


def _backpack_front(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    """Straps from the front; the whole pack over the torso from the back."""
    if pose.facing == "front":
        for k in (-1, 1):
            limb(draw, frame, [(k * 0.07, 0.165), (k * 0.085, 0.4)], 0.02, colour)
    elif pose.facing == "back":
        polygon(draw, frame, box(0.0, 0.32, 0.1, 0.12), colour)
        polygon(draw, frame, box(0.0, 0.38, 0.07, 0.04), shade(colour, 0.75))


def _handbag(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    hu, hv = pose.arms_front[-1][-1]
    limb(draw, frame, [(hu - 0.03, hv + 0.03), (hu, hv), (hu + 0.03, hv + 0.03)], 0.008, shade(colour, 0.7))
    polygon(draw, frame, box(hu, hv + 0.065, 0.045, 0.04), colour)


def _shoulder_bag(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    w = pose.half_width
    start, end = ((0.0, 0.17), (0.05, 0.45)) if pose.side else ((0.7 * w, 0.17), (-0.8 * w, 0.45))
    limb(draw, frame, [start, end], 0.014, shade(colour, 0.8))
    polygon(draw, frame, box(end[0], 0.47, 0.05, 0.04), colour)


def draw_nothing(draw: Draw, frame: Frame, pose: Pose, colour: RGB) -> None:
    """Layer in which a bag type shows nothing."""


# (behind the body, in front of the body)
BAG_LAYERS: dict[str, tuple[Painter, Painter]] = {
    "backpack": (_backpack_behind, _backpack_front),
    "handbag": (draw_nothing, _handbag),
    "shoulder_bag": (draw_nothing, _shoulder_bag),
}
