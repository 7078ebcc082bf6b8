"""Softmax-family alignment losses of CLIP, TBPS-CLIP and IRRA: N-ITC (softmax), ITC, SDM, CMPM, ID and MLM.

Same conventions as `model.objectives.contrastive`: `sim` holds cosine similarities with text rows and image
columns, `pos_mask[i, j]` says whether text i and image j show the same person, everything is computed in float32
and a scalar is returned. Every softmax here is taken over `logit_scale * sim`; an additive bias (SigLIP's
`logit_bias`) shifts a whole row by a constant and cancels, so these losses work with sigmoid backbones too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _scaled(sim: Tensor, logit_scale: Tensor | float) -> Tensor:
    """`logit_scale * sim` in float32, keeping the graph of a learnable scale."""
    return sim.float() * torch.as_tensor(logit_scale, device=sim.device).float()


def _row_normalised(pos_mask: Tensor) -> Tensor:
    """`y_ij = P_ij / sum_k P_ik`; a row without positives stays all zero instead of dividing by zero."""
    mask = pos_mask.float()
    return mask / mask.sum(dim=1, keepdim=True).clamp_min(1)


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Batch mean of `-sum_j y_ij log softmax_j(logits_i)`."""
    return -(targets.float() * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _kl_to_targets(logits: Tensor, targets: Tensor, epsilon: float) -> Tensor:
    """Batch mean of `KL(softmax(logits_i) || y_i) = sum_j p_ij (log p_ij - log(y_ij + epsilon))`."""
    log_probs = F.log_softmax(logits, dim=1)
    return (log_probs.exp() * (log_probs - torch.log(targets + epsilon))).sum(dim=1).mean()


def softmax_nitc_loss(
    sim: Tensor,
    pos_mask: Tensor,
    *,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float | None = None,
    soft_targets_t2i: Tensor | None = None,
    soft_targets_i2t: Tensor | None = None,
) -> Tensor:
    """N-ITC of TBPS-CLIP (arXiv 2308.10045) for softmax (CLIP) backbones.

    Logits `l = logit_scale * sim + logit_bias`. Targets are the row-normalised positives `y_ij = P_ij / sum_k P_ik`
    (every same-person pair counts, not only the diagonal) and the loss is
    `1/2 [mean_i -sum_j y_ij log softmax_j(l_ij) + mean_j -sum_i y'_ji log softmax_i(l_ij)]`, text-to-image rows
    plus image-to-text rows (`y'` normalises `P^T`). With all pids distinct it equals `itc_loss`.

    Args:
        sim: Cosine similarities (text rows, image columns).
        pos_mask: Same-person pairs.
        logit_scale: Temperature t = exp(t') (already exponentiated).
        logit_bias: Optional bias; it cancels inside each softmax and is accepted so that callers can pass the
            backbone's logits unchanged.
        soft_targets_t2i: Targets replacing `y` for the text rows, already mixed by the caller (TBPS-CLIP's
            `alpha * softmax(stopped logits) + (1 - alpha) * y`).
        soft_targets_i2t: Targets replacing `y'` for the image rows, mixed likewise.

    Shapes:
        sim: (B_t, B_i), pos_mask: (B_t, B_i) bool, logit_scale: () or (1,), logit_bias: () or (1,),
        soft_targets_t2i: (B_t, B_i), soft_targets_i2t: (B_i, B_t) -> ()
    """
    logits = _scaled(sim, logit_scale)
    if logit_bias is not None:
        logits = logits + torch.as_tensor(logit_bias, device=sim.device).float()
    targets_t2i = _row_normalised(pos_mask) if soft_targets_t2i is None else soft_targets_t2i
    targets_i2t = _row_normalised(pos_mask.T) if soft_targets_i2t is None else soft_targets_i2t
    return (_soft_cross_entropy(logits, targets_t2i) + _soft_cross_entropy(logits.T, targets_i2t)) / 2


def itc_loss(sim: Tensor, *, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE of CLIP (arXiv 2103.00020): pair i matches only pair i, whatever the pids.

    Raises:
        ValueError: If `sim` is not square (diagonal labels need one text per image).

    Shapes:
        sim: (B, B), logit_scale: () or (1,) -> ()
    """
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(
            f"itc_loss needs a square (B, B) similarity matrix of paired texts and images, got "
            f"{tuple(sim.shape)}; use softmax_nitc_loss with a pos_mask for unpaired batches."
        )
    logits = _scaled(sim, logit_scale)
    labels = torch.arange(sim.shape[0], device=sim.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def sdm_loss(sim: Tensor, pos_mask: Tensor, *, logit_scale: Tensor | float, epsilon: float = 1e-8) -> Tensor:
    """Similarity Distribution Matching of IRRA (arXiv 2303.12501).

    `L = sum_{dir in (t2i, i2t)} mean_i sum_j p_ij (log p_ij - log(y_ij + epsilon))` with `p` the row softmax of
    `logit_scale * sim` (of its transpose for i2t) and `y` the row-normalised positives of that direction. The two
    directions are summed, as in IRRA. Each direction normalises its own rows, and any backbone works because a bias
    would cancel in the softmax (sigmoid backbones included, as in the original project: docs/seed_differences.md).

    Shapes:
        sim: (B_t, B_i), pos_mask: (B_t, B_i) bool, logit_scale: () or (1,) -> ()
    """
    logits = _scaled(sim, logit_scale)
    t2i = _kl_to_targets(logits, _row_normalised(pos_mask), epsilon)
    i2t = _kl_to_targets(logits.T, _row_normalised(pos_mask.T), epsilon)
    return t2i + i2t


def cmpm_loss(image_feats: Tensor, text_feats: Tensor, pids: Tensor, *, epsilon: float = 1e-8) -> Tensor:
    """Cross-Modal Projection Matching (Zhang & Lu, ECCV 2018) on raw (un-normalised) features.

    Image-to-text scores are scalar projections of each image feature onto the normalised text features,
    `s_ij = x_i . z_j / |z_j|`; text-to-image scores project text onto normalised images, `s'_ij = z_i . x_j / |x_j|`.
    With `p = softmax_row(s)` and `q_ij = P_ij / sum_k P_ik` (image i and text j of the same person),
    `L = mean_i sum_j p_ij log(p_ij / (q_ij + epsilon)) + (the same for s')`: both directions summed. The features
    must be the raw embeddings: on normalised ones the softmax runs over cosines at temperature 1 and cannot approach
    its minimum.

    Shapes:
        image_feats: (B, D), text_feats: (B, D), pids: (B,) -> ()
    """
    image, text = image_feats.float(), text_feats.float()
    targets = _row_normalised(pids.view(-1, 1) == pids.view(1, -1))
    image_to_text = image @ F.normalize(text, dim=-1).T
    text_to_image = text @ F.normalize(image, dim=-1).T
    return _kl_to_targets(image_to_text, targets, epsilon) + _kl_to_targets(text_to_image, targets, epsilon)


def id_loss(image_logits: Tensor, text_logits: Tensor, pids: Tensor) -> Tensor:
    """Identity classification loss of IRRA: `1/2 [CE(image_logits, pids) + CE(text_logits, pids)]`.

    Both logits come from one shared `IdentityClassifier` over un-normalised features.

    Shapes:
        image_logits: (B, C), text_logits: (B, C), pids: (B,) long in [0, C) -> ()
    """
    return (F.cross_entropy(image_logits.float(), pids) + F.cross_entropy(text_logits.float(), pids)) / 2


def mlm_loss(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Masked-language-modelling cross-entropy and accuracy over the selected tokens.

    Positions whose label is `ignore_index` do not count. Without any selected token both values are 0 (the loss
    still carries a graph, so every parameter receives a gradient, as distributed training expects).

    Shapes:
        logits: (..., V), labels: (...) long -> ((), ())
    """
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    selected = flat_labels != ignore_index
    count = selected.sum().clamp_min(1)
    token_losses = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="none")
    loss = token_losses.sum() / count
    correct = (flat_logits.argmax(dim=-1) == flat_labels) & selected
    return loss, correct.sum().float() / count
