"""Which matching losses a training step uses: the loss settings and the strategy table.

A *strategy* (`loss.strategy`) decides the main contrastive terms:

| strategy          | terms                                                                  |
| ----------------- | ---------------------------------------------------------------------- |
| `baseline`        | N-ITC                                                                  |
| `auxiliary`       | N-ITC + in-modal Circle on image and on text features (averaged)       |
| `intrinsic`       | NC-ITC: N-ITC whose logits are circle-reweighted (replaces N-ITC)      |
| `circle_only`     | cross-modal Circle (replaces N-ITC, weighted by `nitc_loss_weight`)    |
| `auxiliary_cross` | N-ITC + cross-modal Circle                                             |

Multi-view supervision (`MVS`) averages every cross-modal term over the original and the augmented image view.
*Auxiliary terms* (SimCLR, C-ITC, R-ITC, ITC, SDM, CMPM, ID, MLM) are switched on by upper-case flags (the
original project's names) and added in every strategy by `model.objective.Objective`. Both tables are looked up
once, when the objective is built, so the training step never branches on names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from model.features import TrainFeatures
from model.objectives import (
    CIRCLE_REDUCTIONS,
    INTRINSIC_NORMALIZATIONS,
    LOSSES,
    cosine_similarity,
    cross_modal_circle_loss,
    identity_mask,
    in_modal_circle_loss,
    intrinsic_nitc_loss,
    sigmoid_nitc_loss,
    softmax_nitc_loss,
)


@dataclass(frozen=True)
class StepContext:
    """Where training is: `epoch` = the current epoch plus the fraction of its batches already trained."""

    epoch: float = 0.0


def _views(feats: TrainFeatures, settings: LossSettings) -> list[Tensor]:
    """Image views a cross-modal term is averaged over: the original, plus the augmented one under MVS."""
    return [feats.image_feats, feats.aug_image_feats] if settings.MVS else [feats.image_feats]


def _mean_over_views(loss_of_view: Callable[[Tensor], Tensor], views: list[Tensor]) -> Tensor:
    return sum(loss_of_view(image) for image in views) / len(views)


def _nitc_views(feats: TrainFeatures, settings: LossSettings) -> list[tuple[Tensor, Tensor]]:
    """(image view the loss is computed on, image view its soft-label teacher is computed from), per N-ITC term.

    `nitc_mvs_mode=seed`: the second term is computed on the original view again, its teacher on the augmented one
    (docs/seed_differences.md).
    """
    if settings.MVS and settings.nitc_mvs_mode == "seed":
        return [(feats.image_feats, feats.image_feats), (feats.image_feats, feats.aug_image_feats)]
    return [(image, image) for image in _views(feats, settings)]


def _nitc(feats: TrainFeatures, settings: LossSettings, context: StepContext, *, use_sigmoid: bool) -> Tensor:
    pos_mask = identity_mask(feats.pids, feats.pids)
    alpha = settings.softlabel_alpha(context.epoch)
    # The soft-label teacher is a constant: no gradient through its features nor through the temperature and bias.
    scale, bias = feats.logit_scale.detach(), feats.logit_bias.detach()

    def loss_of_view(image: Tensor, teacher_image: Tensor) -> Tensor:
        sim = cosine_similarity(feats.text_feats, image)
        teacher_logits = scale * cosine_similarity(feats.text_feats, teacher_image).detach() if alpha > 0 else None
        if use_sigmoid:
            soft = signs = None
            if teacher_logits is not None:  # teacher = the batch's current match probabilities (TBPS-CLIP)
                teacher = torch.sigmoid(teacher_logits + bias)
                if settings.softlabel_form == "seed":
                    signs = alpha * teacher + (1 - alpha) * (pos_mask.float() * 2 - 1)
                else:
                    soft = alpha * teacher + (1 - alpha) * pos_mask.float()
            return sigmoid_nitc_loss(
                sim,
                pos_mask,
                logit_scale=feats.logit_scale,
                logit_bias=feats.logit_bias,
                soft_targets=soft,
                soft_signs=signs,
            )
        soft_t2i = soft_i2t = None
        if teacher_logits is not None:
            targets = pos_mask.float()
            soft_t2i = alpha * teacher_logits.softmax(1) + (1 - alpha) * targets / targets.sum(1, keepdim=True)
            soft_i2t = alpha * teacher_logits.T.softmax(1) + (1 - alpha) * targets.T / targets.T.sum(1, keepdim=True)
        return softmax_nitc_loss(
            sim, pos_mask, logit_scale=feats.logit_scale, soft_targets_t2i=soft_t2i, soft_targets_i2t=soft_i2t
        )

    pairs = _nitc_views(feats, settings)
    return sum(loss_of_view(image, teacher) for image, teacher in pairs) / len(pairs)


def _cross_circle(feats: TrainFeatures, settings: LossSettings) -> Tensor:
    return _mean_over_views(
        lambda image: cross_modal_circle_loss(
            image,
            feats.text_feats,
            feats.pids,
            margin=settings.circle_margin,
            gamma=settings.circle_gamma,
            reduction=settings.circle_reduction,
        ),
        _views(feats, settings),
    )


def _in_modal_circle(feats: TrainFeatures, settings: LossSettings) -> Tensor:
    kwargs = dict(margin=settings.circle_margin, gamma=settings.circle_gamma, reduction=settings.circle_reduction)
    return (
        in_modal_circle_loss(feats.image_feats, feats.pids, **kwargs)
        + in_modal_circle_loss(feats.text_feats, feats.pids, **kwargs)
    ) / 2


def _with_nitc(circle: Callable[[TrainFeatures, LossSettings], Tensor] | None) -> Callable[..., dict[str, Tensor]]:
    """N-ITC (if `NITC`) plus an auxiliary circle term weighted by the curriculum."""

    def strategy(feats: TrainFeatures, settings: LossSettings, context: StepContext, *, use_sigmoid: bool):
        terms = {}
        if settings.nitc_term:
            terms["nitc_loss"] = settings.nitc_loss_weight * _nitc(feats, settings, context, use_sigmoid=use_sigmoid)
        if circle is not None and settings.circle_term:
            terms["circle_loss"] = settings.circle_weight(context.epoch) * circle(feats, settings)
        return terms

    return strategy


def _intrinsic(feats: TrainFeatures, settings: LossSettings, context: StepContext, *, use_sigmoid: bool):
    pos_mask = identity_mask(feats.pids, feats.pids)
    loss = _mean_over_views(
        lambda image: intrinsic_nitc_loss(
            cosine_similarity(feats.text_feats, image),
            pos_mask,
            margin=settings.circle_margin,
            gamma=settings.circle_gamma,
            normalization=settings.intrinsic_normalization,
        ),
        _views(feats, settings),
    )
    return {"nitc_loss": settings.nitc_loss_weight * loss}


def _circle_only(feats: TrainFeatures, settings: LossSettings, context: StepContext, *, use_sigmoid: bool):
    # Replaces N-ITC, so it takes N-ITC's weight; it is logged as what it is.
    return {"circle_loss": settings.nitc_loss_weight * _cross_circle(feats, settings)}


@dataclass(frozen=True)
class Strategy:
    """One `loss.strategy`: the function giving its main matching terms and what it builds on.

    Attributes:
        terms: `(feats, settings, context, *, use_sigmoid) -> {"<name>_loss": weighted term}`.
        builds_on_nitc: Trains plain N-ITC when `loss.NITC` is on (otherwise the strategy replaces N-ITC).
        auxiliary_circle: Adds a separate Circle term weighted by `circle_loss_weight` (switched by `loss.CIR`).
        needs_sigmoid: Only defined for sigmoid (SigLIP) backbones.
        summary: What it trains, for the log.
    """

    terms: Callable[..., dict[str, Tensor]]
    builds_on_nitc: bool
    auxiliary_circle: bool
    needs_sigmoid: bool
    summary: str


#: Every `loss.strategy`; the first is the default.
STRATEGIES: dict[str, Strategy] = {
    "baseline": Strategy(_with_nitc(None), True, False, False, "N-ITC"),
    "auxiliary": Strategy(_with_nitc(_in_modal_circle), True, True, False, "N-ITC + in-modal Circle"),
    "intrinsic": Strategy(_intrinsic, False, False, True, "NC-ITC (circle-reweighted N-ITC, replaces N-ITC)"),
    "circle_only": Strategy(_circle_only, False, False, False, "cross-modal Circle (replaces N-ITC)"),
    "auxiliary_cross": Strategy(_with_nitc(_cross_circle), True, True, False, "N-ITC + cross-modal Circle"),
}
#: The strategy training N-ITC alone, proposed when a setting would cancel another strategy's defining term.
NITC_ONLY = next(name for name, record in STRATEGIES.items() if record.builds_on_nitc and not record.auxiliary_circle)


#: Valid values of the loss settings that name a variant.
CHOICES: dict[str, tuple[str, ...]] = {
    "nitc_mvs_mode": ("augmented", "seed"),
    "softlabel_form": ("probability", "seed"),
    "circle_reduction": tuple(CIRCLE_REDUCTIONS),
    "intrinsic_normalization": tuple(INTRINSIC_NORMALIZATIONS),
}


@dataclass
class _StrategySettings:
    """The settings of the strategies; `LossSettings` adds those of the registry's auxiliary losses."""

    strategy: str = next(iter(STRATEGIES))  # the table's first entry: N-ITC alone
    # N-ITC: image-text matching with person-id targets (sigmoid for SigLIP, softmax for CLIP backbones). Strategies
    # that replace N-ITC (intrinsic, circle_only) do not read this flag.
    NITC: bool = True
    nitc_loss_weight: float = 1.0
    MVS: bool = True  # multi-view supervision: cross-modal terms are also computed on a second augmented view
    nitc_mvs_mode: str = "augmented"  # "seed": N-ITC's second view is the original again (docs/seed_differences.md)
    softlabel_ratio: float = 0.0  # alpha of TBPS-CLIP soft targets, ramped from 0 over the first epoch
    softlabel_form: str = "probability"  # sigmoid soft targets mixed as probabilities; "seed": mixed with +-1 signs
    # Circle Loss (arXiv 2002.10857). CIR switches the auxiliary Circle term of `auxiliary` / `auxiliary_cross`;
    # null follows the strategy, and an explicit value that contradicts it is refused.
    CIR: bool | None = None
    circle_loss_weight: float = 0.1
    circle_margin: float = 0.25
    circle_gamma: float = 64.0
    circle_reduction: str = "global"  # "global": one batch-pooled loss; "per_anchor": the paper's per-anchor mean
    circle_start_epoch: int = 0  # curriculum (TBPS-mSigLIP-CLoRA): weight 0 before this epoch,
    circle_ramp_epochs: int = 0  # then a linear ramp to circle_loss_weight over this many epochs
    intrinsic_normalization: str = "row"  # NC-ITC: "row" (1/B like N-ITC) or "pairs" (1/B^2)
    # Read when an MLM loss is on: the data masks this fraction of caption tokens; the head has cmt_depth layers.
    mlm_probability: float = 0.15
    cmt_depth: int = 4  # layers of the MLM cross-modal transformer
    # Distributed training: every contrastive / Circle term sees the features of all ranks (TBPS-CLIP, OpenCLIP).
    gather_features: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> _StrategySettings:
        """Build from a config mapping; unknown keys raise ValueError listing the valid ones."""
        valid = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"Unknown loss setting(s) {unknown}; valid keys: {sorted(valid)}.")
        return cls(**dict(values))

    @property
    def record(self) -> Strategy:
        return STRATEGIES[self.strategy]

    @property
    def circle_term(self) -> bool:
        """Whether the strategy's auxiliary Circle term is trained (`CIR` null follows the strategy)."""
        return self.record.auxiliary_circle and self.CIR is not False

    @property
    def nitc_term(self) -> bool:
        """Whether plain N-ITC is trained (only strategies built on N-ITC read the `NITC` flag)."""
        return self.record.builds_on_nitc and self.NITC

    def problems(self, *, use_sigmoid: bool = True) -> list[str]:
        """Every inconsistency in the settings (empty when valid)."""
        if self.strategy not in STRATEGIES:
            return [f"loss.strategy={self.strategy!r} is unknown; valid strategies: {list(STRATEGIES)}."]
        issues = self._strategy_problems(use_sigmoid)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_weight") and value < 0:
                issues.append(f"loss.{field.name} must be >= 0, got {value}.")
        for key, valid in CHOICES.items():
            if getattr(self, key) not in valid:
                issues.append(f"loss.{key}={getattr(self, key)!r} is unknown; valid: {list(valid)}.")
        if not 0 <= self.softlabel_ratio <= 1:
            issues.append(f"loss.softlabel_ratio must be in [0, 1], got {self.softlabel_ratio}.")
        if not 0 < self.mlm_probability < 1:
            issues.append(f"loss.mlm_probability must be in (0, 1), got {self.mlm_probability}.")
        for key in ("simclr_temperature", "circle_gamma"):
            if getattr(self, key) <= 0:
                issues.append(f"loss.{key} must be > 0, got {getattr(self, key)}.")
        if self.circle_start_epoch < 0 or self.circle_ramp_epochs < 0:
            issues.append("loss.circle_start_epoch and loss.circle_ramp_epochs must be >= 0.")
        return issues

    def _strategy_problems(self, use_sigmoid: bool) -> list[str]:
        """Flags and values that the chosen strategy would silently ignore or cancel."""
        name, record, issues = self.strategy, self.record, []
        if record.needs_sigmoid and not use_sigmoid:
            issues.append(f"loss.strategy={name} re-weights the sigmoid N-ITC: it needs a SigLIP backbone.")
        if self.CIR is True and not record.auxiliary_circle:
            with_circle = [n for n, r in STRATEGIES.items() if r.auxiliary_circle]
            issues.append(
                f"loss.CIR=true asks for an auxiliary Circle term, which loss.strategy={name} does not have: choose "
                f"loss.strategy from {with_circle}, or drop loss.CIR (null follows the strategy)."
            )
        if record.auxiliary_circle and (self.CIR is False or self.circle_loss_weight == 0):
            cancel = "loss.CIR=false" if self.CIR is False else "loss.circle_loss_weight=0"
            issues.append(
                f"loss.strategy={name} is defined by its Circle term, which {cancel} removes: use "
                f"loss.strategy={NITC_ONLY} for N-ITC alone, or drop the override."
            )
        if self.nitc_loss_weight == 0 and (not record.builds_on_nitc or self.nitc_term):
            main = "N-ITC" if record.builds_on_nitc else record.summary
            issues.append(
                f"loss.nitc_loss_weight=0 removes the main term of loss.strategy={name} ({main}); set it > 0, or "
                "loss.NITC=false to train without N-ITC."
            )
        if not record.auxiliary_circle and (self.circle_start_epoch or self.circle_ramp_epochs):
            issues.append(
                f"loss.circle_start_epoch/circle_ramp_epochs schedule the auxiliary Circle term, which "
                f"loss.strategy={name} does not have; set them to 0."
            )
        if self.softlabel_ratio > 0 and not self.nitc_term:
            issues.append(
                f"loss.softlabel_ratio={self.softlabel_ratio} softens N-ITC's targets, but loss.strategy={name} with "
                f"loss.NITC={self.NITC} trains no N-ITC; set loss.softlabel_ratio=0."
            )
        matching = [loss.flag for loss in LOSSES.values() if loss.flag and loss.matching]
        if record.builds_on_nitc and not self.nitc_term and not any(getattr(self, flag) for flag in matching):
            issues.append(
                f"loss.strategy={name} with loss.NITC=false trains no image-text matching loss; enable loss.NITC "
                f"or one of {['loss.' + flag for flag in matching]}."
            )
        return issues

    def circle_weight(self, epoch: float) -> float:
        """Circle weight at a (fractional) epoch under the curriculum: 0, then a linear ramp, then constant."""
        completed = int(epoch)
        if completed < self.circle_start_epoch:
            return 0.0
        if self.circle_ramp_epochs == 0:
            return self.circle_loss_weight
        ramp = min((completed - self.circle_start_epoch + 1) / self.circle_ramp_epochs, 1.0)
        return self.circle_loss_weight * ramp

    def softlabel_alpha(self, epoch: float) -> float:
        """Soft-target mixing ratio, ramped linearly over the first epoch (TBPS-CLIP)."""
        return self.softlabel_ratio * min(epoch, 1.0)


LossSettings = dataclasses.make_dataclass(
    "LossSettings",
    [setting for loss in LOSSES.values() for setting in loss.settings()],
    bases=(_StrategySettings,),
    namespace={
        "__doc__": "The `loss` config group: the strategy's settings, then each auxiliary loss's flag, weight and "
        "options (from `model.objectives.LOSSES`). Field names are the original project's, so its YAML files "
        "and commands keep working."
    },
)
LossSettings.__module__ = __name__

#: Clear names for the settings whose original names mislead: `loss.simclr=true` on the command line is
#: `loss.SS=true` (config_schema.with_original_names). The original names stay the keys, so config files, saved
#: configs and messages use one name each, and the last override on the command line wins.
CLEAR_NAMES = {
    "nitc": "NITC",  # train the N-ITC matching loss
    "simclr": "SS",  # SimCLR on two strong image views ("SS": self-supervision)
    "auxiliary_circle": "CIR",  # the auxiliary Circle term of auxiliary / auxiliary_cross
    "id_classifier": "ID",  # identity classification of both embeddings
    "mlm_depth": "cmt_depth",  # layers of the MLM cross-modal transformer
}
