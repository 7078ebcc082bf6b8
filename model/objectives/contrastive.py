"""Image-text contrastive losses: N-ITC (SigLIP sigmoid), C-ITC and R-ITC (conventions in `__init__`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity matrix in float32.

    Shapes:
        a: (N, D), b: (M, D) -> (N, M)
    """
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def identity_mask(pids_a: Tensor, pids_b: Tensor) -> Tensor:
    """`mask[i, j] = pids_a[i] == pids_b[j]`.

    Shapes:
        pids_a: (N,), pids_b: (M,) -> (N, M) bool
    """
    return pids_a.view(-1, 1) == pids_b.view(1, -1)


def sigmoid_nitc_loss(
    sim: Tensor,
    pos_mask: Tensor,
    *,
    logit_scale: Tensor,
    logit_bias: Tensor,
    soft_targets: Tensor | None = None,
    soft_signs: Tensor | None = None,
) -> Tensor:
    """N-ITC with SigLIP's sigmoid loss and person-id targets (arXiv 2303.15343, TBPS-CLIP arXiv 2308.10045).

    Every same-person pair in the batch is a positive, not only the diagonal. With all pids distinct this is exactly
    SigLIP's loss: `-(1/B) sum_i sum_j log sigmoid(z_ij (t * sim_ij + b))`, z = +1 for positives and -1 otherwise.
    The loss is symmetric: `sim.T` with `pos_mask.T` gives the same value.

    Args:
        sim: Cosine similarities (text rows, image columns).
        pos_mask: Same-person pairs.
        logit_scale: Temperature t = exp(t') (already exponentiated).
        logit_bias: Bias b.
        soft_targets: Match probabilities in [0, 1] replacing the hard 0/1 targets (TBPS-CLIP soft labels, mixed by
            the caller in probability space). With `soft_targets = pos_mask` the loss is unchanged.
        soft_signs: Multipliers replacing the +-1 signs z, `-log sigmoid(soft_signs * logits)` per pair: the
            original project's soft labels, probabilities mixed with signs (docs/seed_differences.md). Exclusive
            with `soft_targets`.

    Shapes:
        sim: (B_t, B_i), pos_mask: (B_t, B_i) bool, logit_scale: () or (1,), logit_bias: () or (1,),
        soft_targets: (B_t, B_i) float, soft_signs: (B_t, B_i) float -> ()
    """
    if soft_targets is not None and soft_signs is not None:
        raise ValueError("sigmoid_nitc_loss takes soft_targets or soft_signs, not both.")
    logits = logit_scale.float() * sim.float() + logit_bias.float()
    if soft_targets is not None:
        # -[y log s(l) + (1 - y) log s(-l)] per pair; equals -log s(z l) for y in {0, 1}.
        per_pair = F.binary_cross_entropy_with_logits(logits, soft_targets.float(), reduction="none")
        return per_pair.sum(dim=1).mean()
    signs = pos_mask.float() * 2 - 1 if soft_signs is None else soft_signs.float()
    return -F.logsigmoid(signs * logits).sum(dim=1).mean()


def cyclic_itc_loss(
    image_feats: Tensor, text_feats: Tensor, *, inmodal_weight: float = 0.25, intermodal_weight: float = 0.25
) -> Tensor:
    """C-ITC of CyCLIP (arXiv 2205.14459) in cosine space.

    In-modal term: image-image and text-text similarity matrices should agree. Cross-modal term: the image-text
    matrix should be symmetric. Computing both on scaled logits and dividing by the squared scale gives the same
    quantity.

    Shapes:
        image_feats: (B, D), text_feats: (B, D) -> ()
    """
    sim_ii = cosine_similarity(image_feats, image_feats)
    sim_tt = cosine_similarity(text_feats, text_feats)
    sim_it = cosine_similarity(image_feats, text_feats)
    inmodal = (sim_ii - sim_tt).pow(2).mean()
    intermodal = (sim_it - sim_it.T).pow(2).mean()
    return inmodal_weight * inmodal + intermodal_weight * intermodal


def reverse_itc_loss(sim: Tensor, pos_mask: Tensor, *, logit_scale: Tensor, eps: float = 0.01) -> Tensor:
    """R-ITC of TBPS-CLIP: reverse KL from the predicted matching distribution to the identity targets.

    Rows are softmax distributions over `logit_scale * sim` (a bias would cancel, so the loss works with sigmoid
    and softmax backbones alike); targets are the pid-normalised positives smoothed by `eps` and renormalised
    (docs/seed_differences.md). Averaged over both retrieval directions.

    Shapes:
        sim: (B_t, B_i), pos_mask: (B_t, B_i) bool, logit_scale: () -> ()
    """
    logits = logit_scale.float() * sim.float()
    loss = 0.0
    for direction_logits, direction_mask in ((logits, pos_mask), (logits.T, pos_mask.T)):
        targets = direction_mask.float() / direction_mask.float().sum(dim=1, keepdim=True).clamp_min(1)
        log_targets = torch.log((targets + eps) / (1 + eps * targets.shape[1]))
        log_probs = F.log_softmax(direction_logits, dim=1)
        loss = loss + (log_probs.exp() * (log_probs - log_targets)).sum(dim=1).mean()
    return loss / 2
