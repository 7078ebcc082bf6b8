"""Visual attribute vocabulary of the synthetic pedestrians and how identities are sampled from it.

The palette is deliberately small (10 clothing colours) so that many identities share a top or a bottom colour:
that gives retrieval hard negatives ("same white shirt, different trousers"). A share of the identities in every
split is built as a *variant* of an earlier one that keeps its top and changes one or two other attribute groups.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Colour:
    """A named colour: its drawing RGB and its Vietnamese / English words (synonyms, first is canonical)."""

    rgb: tuple[int, int, int]
    vi: tuple[str, ...]
    en: tuple[str, ...]


COLOURS: dict[str, Colour] = {
    "white": Colour((238, 238, 232), ("trắng",), ("white",)),
    "black": Colour((28, 28, 32), ("đen",), ("black",)),
    "red": Colour((204, 32, 40), ("đỏ",), ("red",)),
    "blue": Colour((36, 78, 196), ("xanh dương", "xanh lam", "xanh nước biển"), ("blue",)),
    "green": Colour((38, 142, 62), ("xanh lá", "xanh lá cây"), ("green",)),
    "yellow": Colour((240, 204, 40), ("vàng",), ("yellow",)),
    "grey": Colour((132, 132, 136), ("xám", "ghi"), ("grey", "gray")),
    "pink": Colour((240, 136, 178), ("hồng",), ("pink",)),
    "brown": Colour((124, 76, 40), ("nâu",), ("brown",)),
    "orange": Colour((244, 132, 28), ("cam",), ("orange",)),
}
HAIR_COLOURS: dict[str, Colour] = {
    "black": Colour((24, 20, 20), ("đen",), ("black",)),
    "brown": Colour((98, 62, 34), ("nâu",), ("brown",)),
    "blond": Colour((220, 184, 92), ("vàng",), ("blond", "blonde")),
    "grey": Colour((182, 182, 182), ("bạc",), ("grey", "gray")),
}
HAIR_COLOUR_WEIGHTS = (0.6, 0.2, 0.1, 0.1)  # black hair dominates street scenes in Vietnam
GENDERS = ("male", "female")
HAIR_LENGTHS = ("short", "long")
HAIR_LENGTH_WEIGHTS: dict[str, tuple[float, float]] = {"male": (0.9, 0.1), "female": (0.3, 0.7)}
PALETTE = tuple(COLOURS)
SHOE_COLOURS = ("black", "white", "brown", "grey", "red", "blue")


@dataclass(frozen=True)
class Item:
    """A garment or accessory type.

    Attributes:
        vi: Vietnamese nouns (synonyms).
        en: English nouns (synonyms).
        colours: Allowed colour keys of ``COLOURS``; empty for items with one fixed look that captions never colour.
        genders: Genders that wear it.
        weight: Relative sampling weight among the items a gender can wear.
    """

    vi: tuple[str, ...]
    en: tuple[str, ...]
    colours: tuple[str, ...] = PALETTE
    genders: tuple[str, ...] = GENDERS
    weight: float = 1.0


TOPS: dict[str, Item] = {
    "tshirt": Item(("áo phông", "áo thun"), ("t-shirt", "tee")),
    "shirt": Item(("áo sơ mi",), ("shirt", "button-up shirt")),
    "jacket": Item(("áo khoác",), ("jacket",)),
    "dress": Item(("váy liền", "đầm"), ("dress",), genders=("female",), weight=0.6),
    "ao_dai": Item(
        ("áo dài",),
        ("ao dai", "traditional ao dai"),
        ("white", "red", "blue", "pink", "yellow"),
        ("female",),
        weight=0.4,
    ),
}
BOTTOMS: dict[str, Item] = {
    "trousers": Item(("quần dài", "quần âu"), ("trousers", "pants")),
    "jeans": Item(("quần jean", "quần bò"), ("jeans", "denim jeans"), ("blue", "black", "grey", "white")),
    "shorts": Item(("quần short", "quần đùi"), ("shorts",)),
    "skirt": Item(("chân váy", "váy ngắn"), ("skirt", "short skirt"), genders=("female",)),
}
# A dress covers the legs itself; an ao dai is worn over long trousers.
COMPATIBLE_BOTTOMS: dict[str, tuple[str, ...]] = {
    "tshirt": tuple(BOTTOMS),
    "shirt": tuple(BOTTOMS),
    "jacket": tuple(BOTTOMS),
    "dress": (),
    "ao_dai": ("trousers",),
}
BAGS: dict[str, Item] = {
    "backpack": Item(("ba lô",), ("backpack",)),
    "handbag": Item(("túi xách", "túi xách tay"), ("handbag", "hand bag"), genders=("female",)),
    "shoulder_bag": Item(("túi đeo chéo", "túi đeo vai"), ("shoulder bag", "crossbody bag")),
}
HATS: dict[str, Item] = {
    "cap": Item(("mũ lưỡi trai", "nón kết"), ("cap", "baseball cap")),
    "helmet": Item(("mũ bảo hiểm",), ("helmet", "motorbike helmet"), ("white", "black", "red", "blue", "yellow")),
    "conical": Item(("nón lá",), ("conical hat", "conical leaf hat"), colours=()),
}
NO_BAG_PROB = 0.45
NO_HAT_PROB = 0.6


@dataclass(frozen=True)
class PersonAttributes:
    """Everything the captions describe about one identity (keys of the tables above; None = not worn)."""

    gender: str
    hair_length: str
    hair_colour: str
    top: str
    top_colour: str
    bottom: str | None
    bottom_colour: str | None
    shoes_colour: str
    bag: str | None
    bag_colour: str | None
    hat: str | None
    hat_colour: str | None


# Attribute groups a variant may change; the top is never among them, so variants are hard negatives.
VARIANT_GROUPS: dict[str, tuple[str, ...]] = {
    "hair": ("hair_length", "hair_colour"),
    "bottom": ("bottom", "bottom_colour"),
    "shoes": ("shoes_colour",),
    "bag": ("bag", "bag_colour"),
    "hat": ("hat", "hat_colour"),
}
VARIANT_PROB = 0.4
_MAX_TRIES = 1000


def _pick(rng: random.Random, table: dict[str, Item], gender: str) -> str:
    """Draws an item key that ``gender`` wears, by weight."""
    keys = [key for key, item in table.items() if gender in item.genders]
    return rng.choices(keys, weights=[table[key].weight for key in keys])[0]


def _optional(
    rng: random.Random, table: dict[str, Item], gender: str, none_prob: float
) -> tuple[str | None, str | None]:
    """Draws ``(item, colour)`` or ``(None, None)``; the colour is None for fixed-look items."""
    if rng.random() < none_prob:
        return None, None
    key = _pick(rng, table, gender)
    colours = table[key].colours
    return key, (rng.choice(colours) if colours else None)


def sample_attributes(rng: random.Random, *, gender: str | None = None, top: str | None = None) -> PersonAttributes:
    """Draws a consistent attribute set (no skirt on a dress, only female tops for women, ...).

    Args:
        rng: Source of randomness.
        gender: Fix the gender instead of drawing it.
        top: Fix the top type (must suit ``gender``) instead of drawing it.
    """
    gender = gender or rng.choice(GENDERS)
    top = top or _pick(rng, TOPS, gender)
    bottoms = [key for key in COMPATIBLE_BOTTOMS[top] if gender in BOTTOMS[key].genders]
    bottom = rng.choice(bottoms) if bottoms else None
    bag, bag_colour = _optional(rng, BAGS, gender, NO_BAG_PROB)
    hat, hat_colour = _optional(rng, HATS, gender, NO_HAT_PROB)
    return PersonAttributes(
        gender=gender,
        hair_length=rng.choices(HAIR_LENGTHS, weights=HAIR_LENGTH_WEIGHTS[gender])[0],
        hair_colour=rng.choices(tuple(HAIR_COLOURS), weights=HAIR_COLOUR_WEIGHTS)[0],
        top=top,
        top_colour=rng.choice(TOPS[top].colours),
        bottom=bottom,
        bottom_colour=rng.choice(BOTTOMS[bottom].colours) if bottom else None,
        shoes_colour=rng.choice(SHOE_COLOURS),
        bag=bag,
        bag_colour=bag_colour,
        hat=hat,
        hat_colour=hat_colour,
    )


def make_variant(base: PersonAttributes, rng: random.Random) -> PersonAttributes:
    """Returns ``base`` with one or two attribute groups redrawn; gender and top stay the same."""
    fresh = sample_attributes(rng, gender=base.gender, top=base.top)
    groups = rng.sample(sorted(VARIANT_GROUPS), k=rng.randint(1, 2))
    return replace(base, **{name: getattr(fresh, name) for group in groups for name in VARIANT_GROUPS[group]})


def sample_identities(count: int, rng: random.Random) -> list[PersonAttributes]:
    """Draws ``count`` pairwise-distinct attribute sets for one split, some of them variants of earlier ones.

    Raises:
        RuntimeError: ``count`` exceeds what the vocabulary can make distinct (never for realistic sizes).
    """
    chosen: list[PersonAttributes] = []
    seen: set[PersonAttributes] = set()
    for _ in range(count):
        for _ in range(_MAX_TRIES):
            if chosen and rng.random() < VARIANT_PROB:
                candidate = make_variant(rng.choice(chosen), rng)
            else:
                candidate = sample_attributes(rng)
            if candidate not in seen:
                break
        else:
            raise RuntimeError(f"could not draw {count} distinct identities after {len(chosen)}; ask for fewer")
        seen.add(candidate)
        chosen.append(candidate)
    return chosen
