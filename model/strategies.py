"""Which losses a training step adds up: the loss settings, the strategy table and the objective built from them.

A *strategy* decides the main contrastive terms (`loss.strategy`); *auxiliary terms* (SimCLR, C-ITC, R-ITC) are
switched on by the seed's upper-case flags and are added in every strategy. Both are looked up in a table once,
when the objective is built, so the training step never branches on names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from model.objectives import (
    cosine_similarity,
    cyclic_itc_loss,
    identity_mask,
    reverse_itc_loss,
    sigmoid_nitc_loss,
    simclr_loss,
)


@dataclass(frozen=True)
class LossSettings:
    """The `loss` config group. Field names are the seed's, so its YAML files and command lines keep working."""

    strategy: str = "baseline"
    NITC: bool = True
    nitc_loss_weight: float = 1.0
    MVS: bool = True  # multi-view supervision: N-ITC is also computed on a second augmented view and averaged
    softlabel_ratio: float = 0.0
    SS: bool = False  # SimCLR on two strong views of each image
    ss_loss_weight: float = 0.4
    simclr_temperature: float = 0.1
    CITC: bool = False
    citc_loss_weight: float = 0.1
    citc_inmodal_weight: float = 0.25
    citc_intermodal_weight: float = 0.25
    RITC: bool = False
    ritc_loss_weight: float = 1.0
    ritc_eps: float = 0.01

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LossSettings:
        """Build from a config mapping; unknown keys raise ValueError listing the valid ones."""
        valid = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"Unknown loss setting(s) {unknown}; valid keys: {sorted(valid)}.")
        return cls(**dict(values))

    def problems(self) -> list[str]:
        """Every inconsistency in the settings (empty when valid)."""
        issues = []
        if self.strategy not in STRATEGIES:
            issues.append(f"loss.strategy={self.strategy!r} is unknown; valid strategies: {sorted(STRATEGIES)}.")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_weight") and value < 0:
                issues.append(f"loss.{field.name} must be >= 0, got {value}.")
        if self.softlabel_ratio != 0:
            issues.append("loss.softlabel_ratio must be 0.0: soft N-ITC targets are not available yet.")
        if self.simclr_temperature <= 0:
            issues.append(f"loss.simclr_temperature must be > 0, got {self.simclr_temperature}.")
        return issues


@dataclass(frozen=True)
class TrainFeatures:
    """What one forward pass of the training batch produces, all features L2-normalised.

    Shapes: image_feats, text_feats, aug_image_feats, ss_feats_*: (B, D); pids: (B,); logit_scale, logit_bias: ().
    """

    image_feats: Tensor
    text_feats: Tensor
    pids: Tensor
    logit_scale: Tensor
    logit_bias: Tensor
    aug_image_feats: Tensor | None = None
    ss_feats_a: Tensor | None = None
    ss_feats_b: Tensor | None = None


def _views(feats: TrainFeatures, settings: LossSettings) -> list[Tensor]:
    """Image views a cross-modal term is averaged over: the original, plus the augmented one under MVS."""
    return [feats.image_feats, feats.aug_image_feats] if settings.MVS else [feats.image_feats]


def _nitc_terms(feats: TrainFeatures, settings: LossSettings) -> dict[str, Tensor]:
    if not settings.NITC:
        return {}
    pos_mask = identity_mask(feats.pids, feats.pids)
    views = _views(feats, settings)
    loss = sum(
        sigmoid_nitc_loss(
            cosine_similarity(feats.text_feats, image),
            pos_mask,
            logit_scale=feats.logit_scale,
            logit_bias=feats.logit_bias,
        )
        for image in views
    ) / len(views)
    return {"nitc_loss": settings.nitc_loss_weight * loss}


Strategy = Callable[[TrainFeatures, LossSettings], dict[str, Tensor]]

#: loss.strategy -> the main contrastive terms.
STRATEGIES: dict[str, Strategy] = {
    "baseline": _nitc_terms,
}


def _ss_term(feats: TrainFeatures, settings: LossSettings) -> Tensor:
    return settings.ss_loss_weight * simclr_loss(
        feats.ss_feats_a, feats.ss_feats_b, temperature=settings.simclr_temperature
    )


def _citc_term(feats: TrainFeatures, settings: LossSettings) -> Tensor:
    return settings.citc_loss_weight * cyclic_itc_loss(
        feats.image_feats,
        feats.text_feats,
        inmodal_weight=settings.citc_inmodal_weight,
        intermodal_weight=settings.citc_intermodal_weight,
    )


def _ritc_term(feats: TrainFeatures, settings: LossSettings) -> Tensor:
    sim = cosine_similarity(feats.text_feats, feats.image_feats)
    return settings.ritc_loss_weight * reverse_itc_loss(
        sim, identity_mask(feats.pids, feats.pids), logit_scale=feats.logit_scale, eps=settings.ritc_eps
    )


#: Upper-case flag -> (log key, term). Added in every strategy when the flag is on.
AUXILIARY_TERMS: dict[str, tuple[str, Callable[[TrainFeatures, LossSettings], Tensor]]] = {
    "SS": ("ss_loss", _ss_term),
    "CITC": ("citc_loss", _citc_term),
    "RITC": ("ritc_loss", _ritc_term),
}


class Objective:
    """Callable `TrainFeatures -> {"<name>_loss": weighted term}` for one `LossSettings`."""

    def __init__(self, settings: LossSettings):
        problems = settings.problems()
        if problems:
            raise ValueError("Invalid loss settings:\n  " + "\n  ".join(problems))
        self.settings = settings
        self._strategy = STRATEGIES[settings.strategy]
        self._auxiliary = [entry for flag, entry in AUXILIARY_TERMS.items() if getattr(settings, flag)]

    @property
    def needs_aug_view(self) -> bool:
        return self.settings.MVS

    @property
    def needs_ss_views(self) -> bool:
        return self.settings.SS

    def __call__(self, feats: TrainFeatures) -> dict[str, Tensor]:
        terms = self._strategy(feats, self.settings)
        for name, term in self._auxiliary:
            terms[name] = term(feats, self.settings)
        return terms
