"""Loss functions of TBPS, as pure functions over precomputed similarities and masks, and their registry.

Conventions: features are L2-normalised before they reach a loss, `sim` holds cosine similarities with query rows
and gallery columns, and `pos_mask[i, j]` says whether row i and column j show the same person. Losses compute in
float32 (AMP hands them fp16/bf16 matrices) and return a scalar.
"""

from collections.abc import Callable

from torch import Tensor

from model.objectives.circle import cross_modal_circle_loss, in_modal_circle_loss, intrinsic_nitc_loss
from model.objectives.contrastive import (
    cosine_similarity,
    cyclic_itc_loss,
    identity_mask,
    reverse_itc_loss,
    sigmoid_nitc_loss,
)
from model.objectives.irra import cmpm_loss, id_loss, itc_loss, mlm_loss, sdm_loss, softmax_nitc_loss
from model.objectives.selfsup import simclr_loss

LossFn = Callable[..., Tensor]

#: Every loss of the menu, by the name used in logs (`<name>_loss`).
LOSSES: dict[str, LossFn] = {
    "nitc": sigmoid_nitc_loss,
    "nitc_softmax": softmax_nitc_loss,
    "intrinsic": intrinsic_nitc_loss,
    "circle_in_modal": in_modal_circle_loss,
    "circle_cross_modal": cross_modal_circle_loss,
    "ss": simclr_loss,
    "citc": cyclic_itc_loss,
    "ritc": reverse_itc_loss,
    "itc": itc_loss,
    "sdm": sdm_loss,
    "cmpm": cmpm_loss,
    "id": id_loss,
    "mlm": mlm_loss,
}

__all__ = [
    "LOSSES",
    "LossFn",
    "cmpm_loss",
    "cosine_similarity",
    "cross_modal_circle_loss",
    "cyclic_itc_loss",
    "id_loss",
    "identity_mask",
    "in_modal_circle_loss",
    "intrinsic_nitc_loss",
    "itc_loss",
    "mlm_loss",
    "reverse_itc_loss",
    "sdm_loss",
    "sigmoid_nitc_loss",
    "simclr_loss",
    "softmax_nitc_loss",
]
