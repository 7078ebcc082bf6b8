"""What one training forward pass produces, and its global batch under data parallelism."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class TrainFeatures:
    """What one forward pass of the training batch produces; image/text features are L2-normalised.

    `raw_*_feats` are the same embeddings before normalisation, present only when a loss asks for them (CMPM).

    Shapes: image_feats, text_feats, aug_image_feats, ss_feats_*, raw_*_feats: (B, D); pids: (B,); logit_scale,
    logit_bias: (); id_logits_*: (B, num_classes); mlm_logits: (B, L, vocab); mlm_labels: (B, L).
    """

    image_feats: Tensor
    text_feats: Tensor
    pids: Tensor
    logit_scale: Tensor
    logit_bias: Tensor
    aug_image_feats: Tensor | None = None
    ss_feats_a: Tensor | None = None
    ss_feats_b: Tensor | None = None
    id_logits_image: Tensor | None = None
    id_logits_text: Tensor | None = None
    mlm_logits: Tensor | None = None
    mlm_labels: Tensor | None = None
    raw_image_feats: Tensor | None = None
    raw_text_feats: Tensor | None = None


#: Per-sample fields a global batch is made of. MLM logits stay local: (B, L, vocab) is too large to gather and
#: masked-token prediction has no negatives to gain; its term is averaged across ranks by DDP like any local loss.
GATHERED_FIELDS = (
    "image_feats",
    "text_feats",
    "pids",
    "aug_image_feats",
    "ss_feats_a",
    "ss_feats_b",
    "id_logits_image",
    "id_logits_text",
    "raw_image_feats",
    "raw_text_feats",
)


def gathered(feats: TrainFeatures, all_gather: Callable[[Tensor], Tensor]) -> TrainFeatures:
    """The global batch: `all_gather` concatenates a (B, ...) tensor of every rank into (world * B, ...).

    With an autograd-aware gather (each rank's gradient summed back to its shard) and DDP's gradient averaging,
    the parameter update equals that of one process computing the loss on the concatenated batch.
    """
    changes = {name: all_gather(value) for name in GATHERED_FIELDS if (value := getattr(feats, name)) is not None}
    return dataclasses.replace(feats, **changes)
