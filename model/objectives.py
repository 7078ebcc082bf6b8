"""Loss functions of TBPS, as pure functions over precomputed similarities and masks.

Conventions: every feature is L2-normalised before it reaches a loss, `sim` holds cosine similarities with query
rows and gallery columns, `pos_mask[i, j]` says whether row i and column j show the same person. Losses compute in
float32 (AMP hands them fp16/bf16 matrices) and return a scalar.
"""

from __future__ import annotations

from collections.abc import Callable

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


def sigmoid_nitc_loss(sim: Tensor, pos_mask: Tensor, *, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """N-ITC with SigLIP's sigmoid loss and person-id targets (arXiv 2303.15343, TBPS-CLIP arXiv 2308.10045).

    Every same-person pair in the batch is a positive, not only the diagonal. With all pids distinct this is exactly
    SigLIP's loss: `-(1/B) sum_i sum_j log sigmoid(z_ij (t * sim_ij + b))`, z = +1 for positives and -1 otherwise.
    The loss is symmetric: `sim.T` with `pos_mask.T` gives the same value.

    Args:
        sim: Cosine similarities (text rows, image columns).
        pos_mask: Same-person pairs.
        logit_scale: Temperature t = exp(t') (already exponentiated).
        logit_bias: Bias b.

    Shapes:
        sim: (B_t, B_i), pos_mask: (B_t, B_i) bool, logit_scale: () or (1,), logit_bias: () or (1,) -> ()
    """
    logits = logit_scale.float() * sim.float() + logit_bias.float()
    signs = pos_mask.float() * 2 - 1
    return -F.logsigmoid(signs * logits).sum(dim=1).mean()


def simclr_loss(view_a: Tensor, view_b: Tensor, *, temperature: float = 0.1) -> Tensor:
    """NT-Xent of SimCLR (arXiv 2002.05709) between two augmented views of the same images.

    For anchor `a_i` the positive is `b_i`; negatives are every other `b_j` and every other `a_j`. Averaged over
    both views as anchors.

    Shapes:
        view_a: (B, D), view_b: (B, D) -> ()
    """
    a, b = F.normalize(view_a.float(), dim=-1), F.normalize(view_b.float(), dim=-1)
    self_mask = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
    min_value = torch.finfo(torch.float32).min
    targets = torch.arange(a.shape[0], device=a.device)
    loss = 0.0
    for anchor, other in ((a, b), (b, a)):
        cross = anchor @ other.T / temperature  # (B, B): column i is the positive of row i
        within = (anchor @ anchor.T / temperature).masked_fill(self_mask, min_value)  # (B, B): self excluded
        loss = loss + F.cross_entropy(torch.cat([cross, within], dim=1), targets)
    return loss / 2


def cyclic_itc_loss(
    image_feats: Tensor, text_feats: Tensor, *, inmodal_weight: float = 0.25, intermodal_weight: float = 0.25
) -> Tensor:
    """C-ITC of CyCLIP (arXiv 2205.14459) in cosine space.

    In-modal term: image-image and text-text similarity matrices should agree. Cross-modal term: the image-text
    matrix should be symmetric. The seed computes both on scaled logits and divides by the squared scale, which is
    the same quantity.

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
    and softmax backbones alike); targets are the pid-normalised positives smoothed by `eps` and renormalised (the
    seed left them unnormalised and ignored `eps`). Averaged over both retrieval directions.

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


LossFn = Callable[..., Tensor]

#: Every loss of the menu, by the name used in configs and logs.
LOSSES: dict[str, LossFn] = {
    "nitc": sigmoid_nitc_loss,
    "ss": simclr_loss,
    "citc": cyclic_itc_loss,
    "ritc": reverse_itc_loss,
}
