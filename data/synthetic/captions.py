"""Vietnamese and English captions for synthetic pedestrians.

Each caption is built from one template applied to phrases whose synonyms are drawn per caption, so the two captions
of an image differ in structure and wording. Template ``k`` in Vietnamese and in English say the same thing, so
``en_captions[i]`` is a translation of ``captions[i]``, like the machine-translated English of VN3K. Every caption
names every attribute (gender, hair, top, bottom, shoes, bag, hat) with the colour words of ``COLOURS``; a few also
mention the background, in words that carry no colour.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from data.synthetic.attributes import BAGS, BOTTOMS, COLOURS, HAIR_COLOURS, HATS, TOPS, Colour, PersonAttributes

PLACE_PROB = 0.4
VI_COLOUR_PREFIX_PROB = 0.4  # "áo màu trắng" as often as "áo trắng"

# Background key -> parallel (Vietnamese, English) phrases; index i of one translates index i of the other.
PLACES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "wall": (
        ("đang đứng trước một bức tường gạch", "đang đi ngang qua một bức tường gạch"),
        ("standing in front of a brick wall", "walking past a brick wall"),
    ),
    "street": (("đang đi trên vỉa hè", "đang đi bộ trên phố"), ("walking on the sidewalk", "walking down the street")),
    "shops": (
        ("đang đi ngang qua dãy cửa hàng", "đang đi trước các cửa hiệu"),
        ("walking past a row of shops", "walking in front of some shops"),
    ),
}
VI_SUBJECTS = {"male": ("người đàn ông", "chàng trai"), "female": ("người phụ nữ", "cô gái")}
EN_SUBJECTS = {"male": ("man", "young man"), "female": ("woman", "young woman")}
VI_PRONOUNS = {"male": ("Anh ấy",), "female": ("Cô ấy", "Chị ấy")}
EN_PRONOUNS = {"male": ("He",), "female": ("She",)}
VI_HAIR_LENGTHS = {"short": "ngắn", "long": "dài"}
VI_BAG_VERBS = {"backpack": ("đeo",), "handbag": ("cầm", "tay cầm"), "shoulder_bag": ("đeo",)}
EN_BAG_VERBS = {
    "backpack": ("carrying", "wearing"),
    "handbag": ("holding", "carrying"),
    "shoulder_bag": ("carrying", "wearing"),
}
EN_PLURAL_NOUNS = frozenset({"trousers", "pants", "jeans", "denim jeans", "shorts", "shoes"})


@dataclass(frozen=True)
class _Parts:
    """One language's phrases for one caption; Vietnamese accessories are verb phrases, English ones noun phrases.

    Examples are (Vietnamese / English).
    """

    subject: str  # "Một cô gái" / "A young woman"
    noun: str  # "một cô gái" / "a young woman"
    pronoun: str  # "Cô ấy" / "She"
    hair: str  # "tóc dài màu đen" / "long black hair"
    top: str  # "áo sơ mi trắng" / "a white shirt"
    bottom: str | None  # "quần jean xanh dương" / "blue jeans"
    shoes: str  # "đi giày trắng" / "white shoes"
    bag: str | None  # "đeo ba lô đỏ" / "carrying a red backpack"
    hat: str | None  # "đội nón lá" / "a conical hat"
    place: str | None  # "đang đi trên vỉa hè" / "walking on the sidewalk"


def _join(items: Sequence[str | None], conjunction: str) -> str:
    """``a, b and c`` over the items that are not None."""
    present = [item for item in items if item]
    return present[0] if len(present) == 1 else f"{', '.join(present[:-1])} {conjunction} {present[-1]}"


def _vi_colour(rng: random.Random, colour: Colour) -> str:
    word = rng.choice(colour.vi)
    return f"màu {word}" if rng.random() < VI_COLOUR_PREFIX_PROB else word


def _en_noun_phrase(rng: random.Random, noun: str, colour: Colour | None) -> str:
    """``a red cap``, ``an orange tee``, ``blue jeans``, ``a conical hat``."""
    phrase = f"{rng.choice(colour.en)} {noun}" if colour else noun
    if noun in EN_PLURAL_NOUNS:
        return phrase
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _vi_parts(attrs: PersonAttributes, place: str | None, rng: random.Random) -> _Parts:
    noun = rng.choice(VI_SUBJECTS[attrs.gender])
    hat = None
    if attrs.hat:
        hat_colour = f" {_vi_colour(rng, COLOURS[attrs.hat_colour])}" if attrs.hat_colour else ""
        hat = f"đội {rng.choice(HATS[attrs.hat].vi)}{hat_colour}"
    bag = None
    if attrs.bag:
        article = rng.choice(("", "một chiếc "))
        bag = (
            f"{rng.choice(VI_BAG_VERBS[attrs.bag])} {article}{rng.choice(BAGS[attrs.bag].vi)} "
            f"{_vi_colour(rng, COLOURS[attrs.bag_colour])}"
        )
    return _Parts(
        subject=(rng.choice(("Một ", "")) + noun).capitalize(),
        noun=f"một {noun}",
        pronoun=rng.choice(VI_PRONOUNS[attrs.gender]),
        hair=f"tóc {VI_HAIR_LENGTHS[attrs.hair_length]} {_vi_colour(rng, HAIR_COLOURS[attrs.hair_colour])}",
        top=(
            f"{rng.choice(('', '', 'một chiếc '))}{rng.choice(TOPS[attrs.top].vi)} "
            f"{_vi_colour(rng, COLOURS[attrs.top_colour])}"
        ),
        bottom=(
            f"{rng.choice(BOTTOMS[attrs.bottom].vi)} {_vi_colour(rng, COLOURS[attrs.bottom_colour])}"
            if attrs.bottom
            else None
        ),
        shoes=f"{rng.choice(('đi', 'mang'))} {rng.choice(('giày', 'đôi giày'))} "
        f"{_vi_colour(rng, COLOURS[attrs.shoes_colour])}",
        bag=bag,
        hat=hat,
        place=place,
    )


def _en_parts(attrs: PersonAttributes, place: str | None, rng: random.Random) -> _Parts:
    noun = rng.choice(EN_SUBJECTS[attrs.gender])
    return _Parts(
        subject=rng.choice(("A ", "The ")) + noun,
        noun=f"a {noun}",
        pronoun=rng.choice(EN_PRONOUNS[attrs.gender]),
        hair=f"{attrs.hair_length} {rng.choice(HAIR_COLOURS[attrs.hair_colour].en)} hair",
        top=_en_noun_phrase(rng, rng.choice(TOPS[attrs.top].en), COLOURS[attrs.top_colour]),
        bottom=(
            _en_noun_phrase(rng, rng.choice(BOTTOMS[attrs.bottom].en), COLOURS[attrs.bottom_colour])
            if attrs.bottom
            else None
        ),
        shoes=_en_noun_phrase(rng, "shoes", COLOURS[attrs.shoes_colour]),
        bag=(
            f"{rng.choice(EN_BAG_VERBS[attrs.bag])} "
            f"{_en_noun_phrase(rng, rng.choice(BAGS[attrs.bag].en), COLOURS[attrs.bag_colour])}"
            if attrs.bag
            else None
        ),
        hat=(
            _en_noun_phrase(rng, rng.choice(HATS[attrs.hat].en), COLOURS.get(attrs.hat_colour)) if attrs.hat else None
        ),
        place=place,
    )


# ---- templates: (Vietnamese, English) pairs ------------------------------------------------------------------------
def _vi_list(p: _Parts) -> str:
    head = f"{p.subject} {p.hair}, mặc {_join([p.top, p.bottom], 'và')}, {p.shoes}"
    return ", ".join([head, *(x for x in (p.hat, p.bag, p.place) if x)]) + "."


def _en_list(p: _Parts) -> str:
    head = f"{p.subject} with {p.hair}, wearing {_join([p.top, p.bottom, p.shoes, p.hat], 'and')}"
    return ", ".join([head, *(x for x in (p.bag, p.place) if x)]) + "."


def _vi_sentences(p: _Parts) -> str:
    opening = f"{p.subject} {p.place}. {p.pronoun} mặc" if p.place else f"{p.subject} mặc"
    clothes = p.top + (f" cùng với {p.bottom}" if p.bottom else "")
    text = f"{opening} {clothes} và {p.shoes}. {p.pronoun} có mái {p.hair}" + (f" và {p.hat}" if p.hat else "") + "."
    return text + (f" {p.pronoun} {p.bag}." if p.bag else "")


def _en_sentences(p: _Parts) -> str:
    opening = f"{p.subject} is {p.place}. {p.pronoun} is wearing" if p.place else f"{p.subject} is wearing"
    clothes = p.top + (f" with {p.bottom}" if p.bottom else "")
    text = f"{opening} {clothes} and {p.shoes}. {p.pronoun} has {p.hair}" + (f" and wears {p.hat}" if p.hat else "")
    return text + "." + (f" {p.pronoun} is {p.bag}." if p.bag else "")


def _vi_portrait(p: _Parts) -> str:
    text = f"Người trong ảnh là {p.noun} để {p.hair}" + (f", {p.hat}" if p.hat else "") + "."
    clothes = p.top + (f" phối với {p.bottom}" if p.bottom else "")
    text += f" {p.pronoun} mặc {clothes}, {_join([p.shoes, p.bag], 'và')}."
    return text + (f" {p.pronoun} {p.place}." if p.place else "")


def _en_portrait(p: _Parts) -> str:
    text = f"The person in the image is {p.noun} with {p.hair}" + (f", wearing {p.hat}" if p.hat else "") + "."
    clothes = p.top + (f" paired with {p.bottom}" if p.bottom else "")
    text += f" {p.pronoun} is dressed in {clothes} and {p.shoes}" + (f", and is {p.bag}" if p.bag else "") + "."
    return text + (f" {p.pronoun} is {p.place}." if p.place else "")


def _vi_dressed(p: _Parts) -> str:
    subject = p.subject[0].lower() + p.subject[1:]
    text = f"Mặc {_join([p.top, p.bottom], 'và')}, {subject} {p.hair} {_join([p.shoes, p.hat, p.bag], 'và')}."
    return text + (f" {p.pronoun} {p.place}." if p.place else "")


def _en_dressed(p: _Parts) -> str:
    subject = p.subject[0].lower() + p.subject[1:]
    text = (
        f"Dressed in {_join([p.top, p.bottom], 'and')}, {subject} with {p.hair} wears {_join([p.shoes, p.hat], 'and')}"
    )
    text += (f" and is {p.bag}" if p.bag else "") + "."
    return text + (f" {p.pronoun} is {p.place}." if p.place else "")


TEMPLATES: tuple[tuple[Callable[[_Parts], str], Callable[[_Parts], str]], ...] = (
    (_vi_list, _en_list),
    (_vi_sentences, _en_sentences),
    (_vi_portrait, _en_portrait),
    (_vi_dressed, _en_dressed),
)


def _finish(text: str) -> str:
    """NFC (tokenisers treat NFD Vietnamese as different ids) with single spaces."""
    return unicodedata.normalize("NFC", " ".join(text.split()))


def make_captions(
    attrs: PersonAttributes, background: str, rng: random.Random, count: int = 2
) -> tuple[list[str], list[str]]:
    """Writes ``count`` differently worded captions of one image in each language.

    Args:
        attrs: What the person wears.
        background: Key of ``PLACES`` (the image's background), mentioned in some captions.
        rng: Source of randomness.
        count: Captions per language, at most ``len(TEMPLATES)``; each uses a different template.

    Returns:
        ``(vietnamese, english)``, where ``english[i]`` translates ``vietnamese[i]``.
    """
    vietnamese, english = [], []
    vi_places, en_places = PLACES[background]
    for template in rng.sample(range(len(TEMPLATES)), count):
        place = rng.randrange(len(vi_places)) if rng.random() < PLACE_PROB else None
        vi_template, en_template = TEMPLATES[template]
        vietnamese.append(_finish(vi_template(_vi_parts(attrs, None if place is None else vi_places[place], rng))))
        english.append(_finish(en_template(_en_parts(attrs, None if place is None else en_places[place], rng))))
    return vietnamese, english
