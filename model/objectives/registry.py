"""`Loss`: one entry of the loss registry (`model.objectives.LOSSES`), a pure function and how it is wired."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Loss:
    """A loss of the menu: its pure function, and what the objective gives it.

    Calling the entry calls the function; its docstring is the function's.

    Attributes:
        fn: The pure function. It returns a scalar, or a tuple whose first item is the loss (the rest is logged
            nowhere: e.g. MLM accuracy).
        flag: The `loss.<FLAG>` setting that adds this loss, in every strategy, as the term `<name>_loss`; None for
            the losses a strategy computes itself (N-ITC, NC-ITC, the Circle terms).
        weight_key: The `loss.<...>` setting weighting the term; `weight` is its default.
        inputs: Function argument -> the training feature it receives: `sim` (text x image cosine similarities),
            `pos_mask` (same person), or any `model.features.TrainFeatures` field (`image_feats`, `logit_scale`,
            `raw_text_feats`, `ss_feats_a`, `id_logits_image`, `mlm_logits`, ...). The objective derives from them
            which views, heads and raw features the model must produce.
        options: Function argument -> (the `loss.<...>` setting it is read from, that setting's default). The
            default's type is the setting's type: write `1.0` for a float setting.
        matching: Matches images to texts, so it can replace N-ITC (`loss.NITC=false`).
    """

    fn: Callable[..., Any]
    flag: str | None = None
    weight_key: str | None = None
    weight: float = 1.0
    inputs: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, tuple[str, Any]] = field(default_factory=dict)
    matching: bool = False

    def __post_init__(self) -> None:
        if self.flag and not self.weight_key:
            raise ValueError(f"the loss switched by {self.flag} needs a weight_key")
        object.__setattr__(self, "__doc__", self.fn.__doc__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def settings(self) -> list[tuple[str, type, Any]]:
        """`(name, type, default)` of each loss setting this entry adds: its flag, its weight, its options."""
        if not self.flag:
            return []
        fields = [(self.flag, bool, False), (self.weight_key, float, self.weight)]
        # An option's type is its default's (write 1.0 for a float); a None default leaves it untyped.
        return fields + [
            (setting, Any if default is None else type(default), default) for setting, default in self.options.values()
        ]
