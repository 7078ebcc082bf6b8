"""Loss functions of TBPS, as pure functions over precomputed similarities and masks, and their registry.

Conventions: features are L2-normalised before they reach a loss, `sim` holds cosine similarities with query rows
and gallery columns, and `pos_mask[i, j]` says whether row i and column j show the same person. Losses compute in
float32 (AMP hands them fp16/bf16 matrices) and return a scalar.

`LOSSES` drives the wiring: an entry with a `flag` becomes the settings `loss.<FLAG>`, its weight and its options
(`model.strategies.LossSettings`), and the term `<name>_loss` of every strategy (`model.objective.Objective`), which
hands the function the inputs the entry names.
"""

from model.objectives.circle import (
    CIRCLE_REDUCTIONS,
    INTRINSIC_NORMALIZATIONS,
    cross_modal_circle_loss,
    in_modal_circle_loss,
    intrinsic_nitc_loss,
)
from model.objectives.contrastive import (
    cosine_similarity,
    cyclic_itc_loss,
    identity_mask,
    reverse_itc_loss,
    sigmoid_nitc_loss,
)
from model.objectives.irra import cmpm_loss, id_loss, itc_loss, mlm_loss, sdm_loss, softmax_nitc_loss
from model.objectives.registry import Loss
from model.objectives.selfsup import simclr_loss

#: Every loss of the menu, by the name used in logs (`<name>_loss`).
LOSSES: dict[str, Loss] = {
    # Computed by the strategies (model/strategies.py).
    "nitc": Loss(sigmoid_nitc_loss),
    "nitc_softmax": Loss(softmax_nitc_loss),
    "intrinsic": Loss(intrinsic_nitc_loss),
    "circle_in_modal": Loss(in_modal_circle_loss),
    "circle_cross_modal": Loss(cross_modal_circle_loss),
    # Auxiliary terms, added in every strategy by their flag (the original project's names).
    "ss": Loss(  # SimCLR on two strong views of each image
        simclr_loss,
        flag="SS",
        weight_key="ss_loss_weight",
        weight=0.4,
        inputs={"view_a": "ss_feats_a", "view_b": "ss_feats_b"},
        options={"temperature": ("simclr_temperature", 0.1)},
    ),
    "citc": Loss(  # cyclic consistency (CyCLIP)
        cyclic_itc_loss,
        flag="CITC",
        weight_key="citc_loss_weight",
        weight=0.1,
        inputs={"image_feats": "image_feats", "text_feats": "text_feats"},
        options={
            "inmodal_weight": ("citc_inmodal_weight", 0.25),
            "intermodal_weight": ("citc_intermodal_weight", 0.25),
        },
    ),
    "ritc": Loss(  # reverse KL to the identity targets (TBPS-CLIP)
        reverse_itc_loss,
        flag="RITC",
        weight_key="ritc_loss_weight",
        inputs={"sim": "sim", "pos_mask": "pos_mask", "logit_scale": "logit_scale"},
        options={"eps": ("ritc_eps", 0.01)},
        matching=True,
    ),
    "itc": Loss(  # plain InfoNCE with diagonal labels
        itc_loss,
        flag="ITC",
        weight_key="itc_loss_weight",
        inputs={"sim": "sim", "logit_scale": "logit_scale"},
        matching=True,
    ),
    "sdm": Loss(  # similarity distribution matching (IRRA)
        sdm_loss,
        flag="SDM",
        weight_key="sdm_loss_weight",
        inputs={"sim": "sim", "pos_mask": "pos_mask", "logit_scale": "logit_scale"},
        matching=True,
    ),
    "cmpm": Loss(  # projects raw image features onto normalised text features (and back): the unnormalised ones
        cmpm_loss,
        flag="CMPM",
        weight_key="cmpm_loss_weight",
        inputs={"image_feats": "raw_image_feats", "text_feats": "raw_text_feats", "pids": "pids"},
        matching=True,
    ),
    "id": Loss(  # identity classification of both embeddings
        id_loss,
        flag="ID",
        weight_key="id_loss_weight",
        inputs={"image_logits": "id_logits_image", "text_logits": "id_logits_text", "pids": "pids"},
    ),
    "mlm": Loss(  # masked language modelling through a cross-modal transformer (IRRA)
        mlm_loss,
        flag="MLM",
        weight_key="mlm_loss_weight",
        inputs={"logits": "mlm_logits", "labels": "mlm_labels"},
    ),
}

__all__ = [
    "CIRCLE_REDUCTIONS",
    "INTRINSIC_NORMALIZATIONS",
    "LOSSES",
    "Loss",
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
