"""The objective of a training step: the auxiliary terms and the callable that adds them to the strategy's terms.

Auxiliary terms (SimCLR, C-ITC, R-ITC, ITC, SDM, CMPM, ID, MLM) are switched on by upper-case flags of `LossSettings`
and added in every strategy (`model.strategies` holds the strategy table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from model.features import TrainFeatures
from model.objectives import (
    cmpm_loss,
    cosine_similarity,
    cyclic_itc_loss,
    id_loss,
    identity_mask,
    itc_loss,
    mlm_loss,
    reverse_itc_loss,
    sdm_loss,
    simclr_loss,
)
from model.strategies import LossSettings, StepContext


def _t2i(feats: TrainFeatures) -> tuple[Tensor, Tensor]:
    return cosine_similarity(feats.text_feats, feats.image_feats), identity_mask(feats.pids, feats.pids)


def _ss(feats: TrainFeatures, s: LossSettings) -> Tensor:
    return simclr_loss(feats.ss_feats_a, feats.ss_feats_b, temperature=s.simclr_temperature)


def _citc(feats: TrainFeatures, s: LossSettings) -> Tensor:
    return cyclic_itc_loss(
        feats.image_feats,
        feats.text_feats,
        inmodal_weight=s.citc_inmodal_weight,
        intermodal_weight=s.citc_intermodal_weight,
    )


def _ritc(feats: TrainFeatures, s: LossSettings) -> Tensor:
    sim, pos_mask = _t2i(feats)
    return reverse_itc_loss(sim, pos_mask, logit_scale=feats.logit_scale, eps=s.ritc_eps)


def _itc(feats: TrainFeatures, s: LossSettings) -> Tensor:
    return itc_loss(_t2i(feats)[0], logit_scale=feats.logit_scale)


def _sdm(feats: TrainFeatures, s: LossSettings) -> Tensor:
    sim, pos_mask = _t2i(feats)
    return sdm_loss(sim, pos_mask, logit_scale=feats.logit_scale)


def _cmpm(feats: TrainFeatures, s: LossSettings) -> Tensor:
    # CMPM projects raw image features onto normalised text features (and back): it needs the unnormalised ones.
    return cmpm_loss(feats.raw_image_feats, feats.raw_text_feats, feats.pids)


def _id(feats: TrainFeatures, s: LossSettings) -> Tensor:
    return id_loss(feats.id_logits_image, feats.id_logits_text, feats.pids)


def _mlm(feats: TrainFeatures, s: LossSettings) -> Tensor:
    return mlm_loss(feats.mlm_logits, feats.mlm_labels)[0]


#: Upper-case flag -> (log key, weight field, unweighted term). Added in every strategy when the flag is on.
AUXILIARY_TERMS: dict[str, tuple[str, str, Callable[[TrainFeatures, LossSettings], Tensor]]] = {
    "SS": ("ss_loss", "ss_loss_weight", _ss),
    "CITC": ("citc_loss", "citc_loss_weight", _citc),
    "RITC": ("ritc_loss", "ritc_loss_weight", _ritc),
    "ITC": ("itc_loss", "itc_loss_weight", _itc),
    "SDM": ("sdm_loss", "sdm_loss_weight", _sdm),
    "CMPM": ("cmpm_loss", "cmpm_loss_weight", _cmpm),
    "ID": ("id_loss", "id_loss_weight", _id),
    "MLM": ("mlm_loss", "mlm_loss_weight", _mlm),
}


class Objective:
    """Callable `(TrainFeatures, StepContext) -> {"<name>_loss": weighted term}` for one `LossSettings`."""

    def __init__(self, settings: LossSettings, *, use_sigmoid: bool = True):
        problems = settings.problems(use_sigmoid=use_sigmoid)
        if problems:
            raise ValueError("Invalid loss settings:\n  " + "\n  ".join(problems))
        self.settings = settings
        self.use_sigmoid = use_sigmoid
        self._strategy = settings.record.terms
        self._auxiliary = [entry for flag, entry in AUXILIARY_TERMS.items() if getattr(settings, flag)]

    @property
    def needs_aug_view(self) -> bool:
        return self.settings.MVS

    @property
    def needs_ss_views(self) -> bool:
        return self.settings.SS

    @property
    def needs_raw_features(self) -> bool:
        """Some term reads the unnormalised embeddings (`raw_image_feats`, `raw_text_feats`)."""
        return self.settings.CMPM

    @property
    def uses_logit_scale(self) -> bool:
        """Some term reads the learnable temperature (N-ITC, R-ITC, ITC, SDM)."""
        s = self.settings
        return s.nitc_term or s.RITC or s.ITC or s.SDM

    @property
    def uses_logit_bias(self) -> bool:
        """Some term reads SigLIP's learnable bias: only the sigmoid N-ITC (it cancels in every softmax)."""
        return self.settings.nitc_term and self.use_sigmoid

    def describe(self) -> str:
        """The terms this objective trains, with their weights, for the log."""
        s = self.settings
        parts = [f"strategy {s.strategy}: {s.record.summary}"]
        if s.record.builds_on_nitc and not s.NITC:
            parts.append("N-ITC off (loss.NITC=false)")
        if s.circle_term:
            parts.append(f"Circle weight {s.circle_loss_weight} (m {s.circle_margin}, gamma {s.circle_gamma})")
        parts += [f"{name} x {getattr(s, weight)}" for name, weight, _ in self._auxiliary]
        return "; ".join(parts)

    def __call__(self, feats: TrainFeatures, context: StepContext = StepContext()) -> dict[str, Tensor]:
        # Losses run in float32 with autocast off: under AMP every matmul inside them (similarities, SimCLR logits)
        # would otherwise come back in fp16/bf16, where gamma-scaled circle logits and finfo masks overflow.
        feats = _float32(feats)
        with torch.autocast(feats.image_feats.device.type, enabled=False):
            terms = self._strategy(feats, self.settings, context, use_sigmoid=self.use_sigmoid)
            for name, weight_field, term in self._auxiliary:
                terms[name] = getattr(self.settings, weight_field) * term(feats, self.settings)
        return terms


def _float32(feats: TrainFeatures) -> TrainFeatures:
    """Floating-point fields as float32 (pids and MLM labels keep their integer dtype)."""
    changes = {
        field.name: value.float()
        for field in dataclasses.fields(feats)
        if isinstance(value := getattr(feats, field.name), Tensor) and value.is_floating_point()
    }
    return dataclasses.replace(feats, **changes)
