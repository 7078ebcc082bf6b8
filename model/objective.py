"""The objective of a training step: the strategy's terms plus the auxiliary losses of the registry.

An auxiliary loss (`model.objectives.LOSSES`, an entry with a `flag`) is added in every strategy when its flag is on;
the objective hands its function the inputs the entry names, and derives from them what the model and the data must
produce (the SimCLR views, the raw embeddings, the identity classifier, the masked captions) and which logit
parameters receive a gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from model.features import TrainFeatures
from model.objectives import LOSSES, Loss, cosine_similarity, identity_mask
from model.strategies import LossSettings, StepContext

#: Inputs a loss can name besides the fields of TrainFeatures, computed once per step when some loss asks.
DERIVED_INPUTS: dict[str, Callable[[TrainFeatures], Tensor]] = {
    "sim": lambda feats: cosine_similarity(feats.text_feats, feats.image_feats),  # (B_text, B_image)
    "pos_mask": lambda feats: identity_mask(feats.pids, feats.pids),
}
KNOWN_INPUTS = frozenset(field.name for field in dataclasses.fields(TrainFeatures)) | set(DERIVED_INPUTS)


class Objective:
    """Callable `(TrainFeatures, StepContext) -> {"<name>_loss": weighted term}` for one `LossSettings`."""

    def __init__(self, settings: LossSettings, *, use_sigmoid: bool = True):
        problems = settings.problems(use_sigmoid=use_sigmoid)
        if problems:
            raise ValueError("Invalid loss settings:\n  " + "\n  ".join(problems))
        self.settings = settings
        self.use_sigmoid = use_sigmoid
        self._strategy = settings.record.terms
        self._auxiliary: dict[str, Loss] = {
            name: loss for name, loss in LOSSES.items() if loss.flag and getattr(settings, loss.flag)
        }
        self._inputs = {feature for loss in self._auxiliary.values() for feature in loss.inputs.values()}
        if unknown := unknown_inputs(self._auxiliary):
            raise ValueError(
                f"LOSSES entries name inputs no feature provides: {unknown}; valid: {sorted(KNOWN_INPUTS)}"
            )

    @property
    def needs_aug_view(self) -> bool:
        return self.settings.MVS

    @property
    def needs_ss_views(self) -> bool:
        """Some loss reads the two SimCLR views (and so the SimCLR projection head)."""
        return bool({"ss_feats_a", "ss_feats_b"} & self._inputs)

    @property
    def needs_raw_features(self) -> bool:
        """Some loss reads the unnormalised embeddings (`raw_image_feats`, `raw_text_feats`)."""
        return bool({"raw_image_feats", "raw_text_feats"} & self._inputs)

    @property
    def needs_classifier(self) -> bool:
        """Some loss reads identity logits: the model needs a classifier over the training identities."""
        return bool({"id_logits_image", "id_logits_text"} & self._inputs)

    @property
    def needs_masked_captions(self) -> bool:
        """Some loss reads MLM logits: the data masks captions and the model adds its cross-modal MLM head."""
        return bool({"mlm_logits", "mlm_labels"} & self._inputs)

    @property
    def uses_logit_scale(self) -> bool:
        """Some term reads the learnable temperature (N-ITC, or an auxiliary loss naming `logit_scale`)."""
        return self.settings.nitc_term or "logit_scale" in self._inputs

    @property
    def uses_logit_bias(self) -> bool:
        """Some term reads SigLIP's learnable bias: the sigmoid N-ITC (it cancels in every softmax)."""
        return (self.settings.nitc_term and self.use_sigmoid) or "logit_bias" in self._inputs

    def describe(self) -> str:
        """The terms this objective trains, with their weights, for the log."""
        s = self.settings
        parts = [f"strategy {s.strategy}: {s.record.summary}"]
        if s.record.builds_on_nitc and not s.NITC:
            parts.append("N-ITC off (loss.NITC=false)")
        if s.circle_term:
            parts.append(f"Circle weight {s.circle_loss_weight} (m {s.circle_margin}, gamma {s.circle_gamma})")
        parts += [f"{name}_loss x {getattr(s, loss.weight_key)}" for name, loss in self._auxiliary.items()]
        return "; ".join(parts)

    def __call__(self, feats: TrainFeatures, context: StepContext = StepContext()) -> dict[str, Tensor]:
        # Losses run in float32 with autocast off: under AMP every matmul inside them (similarities, SimCLR logits)
        # would otherwise come back in fp16/bf16, where gamma-scaled circle logits and finfo masks overflow.
        feats = _float32(feats)
        with torch.autocast(feats.image_feats.device.type, enabled=False):
            terms = self._strategy(feats, self.settings, context, use_sigmoid=self.use_sigmoid)
            derived = {name: compute(feats) for name, compute in DERIVED_INPUTS.items() if name in self._inputs}
            for name, loss in self._auxiliary.items():
                arguments = {arg: derived[f] if f in derived else getattr(feats, f) for arg, f in loss.inputs.items()}
                options = {arg: getattr(self.settings, setting) for arg, (setting, _) in loss.options.items()}
                value = loss.fn(**arguments, **options)
                value = value[0] if isinstance(value, tuple) else value
                terms[f"{name}_loss"] = getattr(self.settings, loss.weight_key) * value
        return terms


def _float32(feats: TrainFeatures) -> TrainFeatures:
    """Floating-point fields as float32 (pids and MLM labels keep their integer dtype)."""
    changes = {
        field.name: value.float()
        for field in dataclasses.fields(feats)
        if isinstance(value := getattr(feats, field.name), Tensor) and value.is_floating_point()
    }
    return dataclasses.replace(feats, **changes)


def unknown_inputs(losses: dict[str, Loss] = LOSSES) -> list[str]:
    """Inputs named by registry entries that no feature provides (a typo in an entry); empty when all resolve."""
    named = [(name, feature) for name, loss in losses.items() for feature in loss.inputs.values()]
    return [f"{name}: {feature}" for name, feature in named if feature not in KNOWN_INPUTS]
