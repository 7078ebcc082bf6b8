"""Draw one synthetic pedestrian with PIL: background, pose, clothes and accessories, then lighting and noise.

The canvas is drawn at ``SUPERSAMPLE`` times the output size and downsampled, which anti-aliases the edges like a
resized detector crop. Body geometry is in body units (see ``geometry``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from data.synthetic.accessories import BAG_LAYERS, HAT_DRAWERS, STRAW, draw_head, draw_nothing
from data.synthetic.attributes import COLOURS, PersonAttributes
from data.synthetic.backgrounds import BACKGROUNDS, RGB
from data.synthetic.clothes import BOTTOM_DRAWERS, LEG_WIDTH, TOP_STYLES, draw_arm, draw_shoes, draw_torso
from data.synthetic.geometry import Draw, Frame, Pose, limb

SUPERSAMPLE = 2
SKIN_TONES: tuple[RGB, ...] = ((241, 194, 167), (226, 173, 138), (198, 140, 105), (160, 112, 82))
FACINGS = ("front", "back", "left", "right")
NOISE_STD = 3.0  # sensor noise, in 0-255 intensity units


@dataclass(frozen=True)
class View:
    """How one image of an identity is shot.

    Attributes:
        facing: One of ``FACINGS``; ``left``/``right`` are side views.
        stride: Leg swing in [-1, 1]; 0 is standing.
        arm_swing: Arm swing in [-1, 1].
        scale: Person height as a fraction of the image height.
        x_shift: Horizontal offset of the person's centre as a fraction of the image width.
        ground: Height of the soles as a fraction of the image height.
        background: Key of ``BACKGROUNDS``.
        brightness: Global brightness factor.
        light_tilt: Left-to-right brightness ramp amplitude (uneven lighting).
        skin_tone: Index into ``SKIN_TONES``; the caller keeps it fixed per identity.
        seed: Seed of the background texture and the sensor noise.
    """

    facing: str
    stride: float
    arm_swing: float
    scale: float
    x_shift: float
    ground: float
    background: str
    brightness: float
    light_tilt: float
    skin_tone: int
    seed: int


def sample_view(rng: random.Random, skin_tone: int) -> View:
    """Draws a random pose, framing, background and lighting for one image."""
    return View(
        facing=rng.choice(FACINGS),
        stride=rng.uniform(-1.0, 1.0),
        arm_swing=rng.uniform(-1.0, 1.0),
        scale=rng.uniform(0.72, 0.9),
        x_shift=rng.uniform(-0.12, 0.12),
        ground=rng.uniform(0.95, 0.99),
        background=rng.choice(sorted(BACKGROUNDS)),
        brightness=rng.uniform(0.75, 1.2),
        light_tilt=rng.uniform(-0.15, 0.15),
        skin_tone=skin_tone,
        seed=rng.getrandbits(32),
    )


def _pose(view: View) -> Pose:
    """Front/back views spread the legs and hang the arms; side views swing legs and arms back and forth."""
    if view.facing in ("left", "right"):
        s, a = 0.13 * view.stride, 0.12 * view.arm_swing
        legs = tuple(((0.0, 0.48), (k * s / 2 + 0.015, 0.72), (k * s, 0.95)) for k in (-1, 1))
        far_arm, near_arm = (((0.0, 0.19), (k * a / 2, 0.34), (k * a, 0.48)) for k in (-1, 1))
        return Pose(view.facing, 0.08, legs, (far_arm,), (near_arm,))
    spread = 0.02 + 0.03 * abs(view.stride)
    legs = tuple(((k * 0.055, 0.48), (k * (0.055 + spread / 2), 0.72), (k * (0.055 + spread), 0.95)) for k in (-1, 1))
    swing = 0.02 * view.arm_swing
    arms = tuple(((k * 0.135, 0.19), (k * 0.16, 0.34), (k * 0.165 + swing, 0.49)) for k in (-1, 1))
    return Pose(view.facing, 0.125, legs, (), arms)


def _draw_person(draw: Draw, frame: Frame, pose: Pose, attrs: PersonAttributes, skin: RGB) -> None:
    """Paints back to front: bag behind, legs, bottoms, shoes, far arm, torso, near arms, bag, head, hat."""
    top = COLOURS[attrs.top_colour].rgb
    style = TOP_STYLES[attrs.top]
    bag_behind, bag_front = BAG_LAYERS[attrs.bag] if attrs.bag else (draw_nothing, draw_nothing)
    bag = COLOURS[attrs.bag_colour].rgb if attrs.bag_colour else (0, 0, 0)  # unused by draw_nothing
    bag_behind(draw, frame, pose, bag)
    for leg in pose.legs:
        limb(draw, frame, leg, LEG_WIDTH, skin)
    if attrs.bottom:
        BOTTOM_DRAWERS[attrs.bottom](draw, frame, pose, COLOURS[attrs.bottom_colour].rgb)
    draw_shoes(draw, frame, pose, COLOURS[attrs.shoes_colour].rgb)
    for arm in pose.arms_behind:
        draw_arm(draw, frame, arm, skin, top, style.sleeve)
    draw_torso(draw, frame, pose, top, style.hem)
    if style.detail:
        style.detail(draw, frame, pose, top)
    for arm in pose.arms_front:
        draw_arm(draw, frame, arm, skin, top, style.sleeve)
    bag_front(draw, frame, pose, bag)
    draw_head(draw, frame, pose, attrs, skin)
    if attrs.hat:
        HAT_DRAWERS[attrs.hat](draw, frame, pose, COLOURS[attrs.hat_colour].rgb if attrs.hat_colour else STRAW)


def _apply_lighting(image: Image.Image, view: View) -> Image.Image:
    """Global brightness, a horizontal lighting ramp and Gaussian sensor noise."""
    pixels = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    ramp = view.brightness * (1.0 + view.light_tilt * np.linspace(-1.0, 1.0, pixels.shape[1], dtype=np.float32))
    noise = np.random.default_rng(view.seed).normal(0.0, NOISE_STD, size=pixels.shape)
    return Image.fromarray(np.clip(pixels * ramp[None, :, None] + noise, 0, 255).round().astype(np.uint8))


def render_person(attrs: PersonAttributes, view: View, size: tuple[int, int]) -> Image.Image:
    """Draws one image of a person.

    Args:
        attrs: What the person wears.
        view: Pose, framing, background and lighting.
        size: Output ``(height, width)`` in pixels.

    Returns:
        An RGB image of ``size``.
    """
    height, width = size
    canvas = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE))
    rng = random.Random(view.seed)
    feet = view.ground * canvas.height
    BACKGROUNDS[view.background](canvas, round(feet - rng.uniform(0.08, 0.3) * canvas.height), rng)
    person_height = view.scale * canvas.height
    frame = Frame(
        canvas.width * (0.5 + view.x_shift), feet - person_height, person_height, -1 if view.facing == "left" else 1
    )
    _draw_person(ImageDraw.Draw(canvas), frame, _pose(view), attrs, SKIN_TONES[view.skin_tone])
    return _apply_lighting(canvas.resize((width, height), Image.Resampling.LANCZOS), view)
