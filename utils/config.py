"""Config helpers: safe image-size parsing, OmegaConf resolvers, and one error for every config problem."""

from __future__ import annotations

import ast
from collections.abc import Iterable

from omegaconf import OmegaConf

from utils.errors import ImageSizeError, InputError

__all__ = ["ConfigError", "ImageSizeError", "parse_img_size", "register_resolvers"]


class ConfigError(InputError):
    """The composed config is invalid; the message lists every problem found."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("Invalid configuration:\n  - " + "\n  - ".join(self.problems))


def parse_img_size(text: str | int | Iterable[int]) -> list[int]:
    """Parse `img_size_str` ("(384, 128)", "384,128", "256" or a sequence) into [height, width].

    Only integer literals are accepted (`ast.literal_eval`, never `eval`).

    Raises:
        ImageSizeError: for anything but one or two positive integers.
    """
    if isinstance(text, int):
        value = (text, text)
    elif isinstance(text, str):
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, TypeError, SyntaxError) as error:
            raise ImageSizeError(
                f"img_size_str={text!r} is not a literal like '(384,128)'; write (height, width) as two integers."
            ) from error
        if isinstance(value, int):
            value = (value, value)
    else:
        try:
            value = tuple(text)
        except TypeError:  # a float or another scalar: reported below
            value = text
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ImageSizeError(f"img_size_str={text!r} must be two positive integers (height, width), e.g. '(384,128)'.")
    return [int(value[0]), int(value[1])]


def register_resolvers() -> None:
    """Register `${img_size:...}` (safe size parsing). Idempotent."""
    if not OmegaConf.has_resolver("img_size"):
        OmegaConf.register_new_resolver("img_size", parse_img_size)
