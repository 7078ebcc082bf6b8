"""Circle Loss (Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization", CVPR 2020,
arXiv 2002.10857): in-modal, cross-modal and inside N-ITC ("intrinsic", NC-ITC).

For a set of positive similarities s_p and negative similarities s_n, with margin m and scale gamma,

    L = log(1 + sum_n exp(gamma a_n (s_n - m)) * sum_p exp(-gamma a_p (s_p - (1 - m))))
      = softplus(LSE_n(logit_n) + LSE_p(logit_p)),

where the self-paced weights a_p = [1 + m - s_p]_+ and a_n = [s_n + m]_+ are constants in back-prop. The decision
boundary is the circle s_n^2 + (s_p - 1)^2 = 2 m^2, so training pushes s_p towards 1 and s_n towards 0.

Recommended values: the paper uses m = 0.25, gamma = 256 for face recognition and person re-ID, m = 0.4, gamma = 80
for fine-grained retrieval (pytorch-metric-learning's default); fast-reid uses m = 0.25, gamma = 128; the original
mSigLIP Circle-Loss project's code uses m = 0.25, gamma = 64 for every Circle term, its published result gamma 128.

Reductions: "global" pools every positive and every negative pair of the batch into one LSE each and returns one
softplus for the batch (the original project's form; docs/seed_differences.md); "per_anchor" is the paper's form,
one loss per anchor row over its own positives and negatives, averaged over the anchors that have both.

Everything computes in float32: with gamma up to 256 the logits reach about 1000, which logsumexp and softplus
handle but fp16 does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from model.objectives.contrastive import cosine_similarity, identity_mask

Reduction = Literal["global", "per_anchor"]


def circle_logits(sim: Tensor, *, margin: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Element-wise positive and negative circle logits of a similarity tensor (weights detached).

    logit_p = -gamma * [1 + m - s]_+ * (s - (1 - m)),  logit_n = gamma * [s + m]_+ * (s - m). Both are returned for
    every entry; the caller picks which one applies where. The loss grows with both logits.

    Args:
        sim: Cosine similarities.
        margin: Relaxation m: positives are pushed above 1 - m, negatives below m.
        gamma: Scale.

    Shapes:
        sim: any -> (logit_p, logit_n), each the shape of sim, float32
    """
    sim = sim.float()
    alpha_p = (1 + margin - sim.detach()).clamp_min(0)
    alpha_n = (sim.detach() + margin).clamp_min(0)
    return -gamma * alpha_p * (sim - (1 - margin)), gamma * alpha_n * (sim - margin)


def _masked_logsumexp(logits: Tensor, mask: Tensor) -> Tensor:
    """Logsumexp over the last dim, over the entries where `mask` holds.

    Masked entries are `finfo.min`, so exp() of them is exactly 0 next to any kept entry; a slice with no kept entry
    gives `finfo.min`, whose softplus is exactly 0 (log(1 + empty sum)), with zero gradient.
    """
    return torch.logsumexp(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), dim=-1)


def _pooled_circle(sim: Tensor, pos_mask: Tensor, neg_mask: Tensor, *, margin: float, gamma: float) -> Tensor:
    """Circle loss pooling, along the last dim, the entries of `pos_mask` as positives and of `neg_mask` as negatives.

    A slice with no positive or no negative gives exactly 0.

    Shapes:
        sim: (..., N), pos_mask: (..., N) bool, neg_mask: (..., N) bool -> (...)
    """
    logit_p, logit_n = circle_logits(sim, margin=margin, gamma=gamma)
    return F.softplus(_masked_logsumexp(logit_p, pos_mask) + _masked_logsumexp(logit_n, neg_mask))


def _global_circle(sim: Tensor, pos_mask: Tensor, neg_mask: Tensor, *, margin: float, gamma: float) -> Tensor:
    """One loss for the batch: all positive pairs in one LSE, all negative pairs in another. Shapes: (N, M) -> ()."""
    return _pooled_circle(sim.flatten(), pos_mask.flatten(), neg_mask.flatten(), margin=margin, gamma=gamma)


def _per_anchor_circle(sim: Tensor, pos_mask: Tensor, neg_mask: Tensor, *, margin: float, gamma: float) -> Tensor:
    """One loss per row, averaged over the rows with a positive and a negative. Shapes: (N, M) -> ()."""
    row_losses = _pooled_circle(sim, pos_mask, neg_mask, margin=margin, gamma=gamma)
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    # Dividing a sum avoids indexing by `valid`, which would sync with the GPU; with no valid row this is a zero that
    # is still connected to the graph, so backward() and DDP work.
    return row_losses.masked_fill(~valid, 0).sum() / valid.sum().clamp_min(1)


CIRCLE_REDUCTIONS: dict[str, Callable[..., Tensor]] = {"global": _global_circle, "per_anchor": _per_anchor_circle}


def _reduction_fn(reduction: str) -> Callable[..., Tensor]:
    if reduction not in CIRCLE_REDUCTIONS:
        raise ValueError(f"Unknown Circle Loss reduction {reduction!r}; choose one of {sorted(CIRCLE_REDUCTIONS)}.")
    return CIRCLE_REDUCTIONS[reduction]


def in_modal_circle_loss(
    features: Tensor, pids: Tensor, *, margin: float = 0.25, gamma: float = 64.0, reduction: Reduction = "global"
) -> Tensor:
    """Circle Loss among the features of one modality (Sun et al., CVPR 2020, arXiv 2002.10857).

    Features are L2-normalised and S = X X^T. Positives are the ordered pairs (i, j), i != j, of the same person (a
    feature is never its own positive); negatives are the pairs of different persons. Both orders of a pair are
    kept: under "global" this multiplies the sum inside the log by 4. Paper values: m = 0.25,
    gamma = 256 (re-ID); the mSigLIP projects use m = 0.25, gamma = 64 in-modal. With no positive or no negative
    (all pids distinct, or all equal) the loss is a zero with zero gradient.

    Args:
        features: Image or text embeddings (normalised here).
        pids: Person ids.
        margin: Relaxation m.
        gamma: Scale.
        reduction: "global" (one pooled loss for the batch) or "per_anchor" (the paper's form).

    Shapes:
        features: (B, D), pids: (B,) -> () float32
    """
    sim = cosine_similarity(features, features)
    same_person = identity_mask(pids, pids)
    not_self = ~torch.eye(len(pids), dtype=torch.bool, device=same_person.device)
    return _reduction_fn(reduction)(sim, same_person & not_self, ~same_person, margin=margin, gamma=gamma)


def cross_modal_circle_loss(
    image_features: Tensor,
    text_features: Tensor,
    pids: Tensor,
    *,
    margin: float = 0.25,
    gamma: float = 128.0,
    reduction: Reduction = "global",
) -> Tensor:
    """Circle Loss between images and texts (Sun et al., CVPR 2020, arXiv 2002.10857).

    S = V T^T on L2-normalised features (image rows, text columns). Positives are the same-person pairs, the matched
    diagonal included; negatives are all other pairs. "global" pools all pairs of S and is therefore the same for
    either direction; "per_anchor" averages the image->text loss (rows of S) and the text->image loss (rows of S^T).
    The learnable SigLIP scale and bias are not used. Paper values: m = 0.25, gamma = 256 (re-ID); fast-reid uses
    gamma = 128, as do the mSigLIP projects cross-modally.

    Args:
        image_features: Image embeddings (normalised here).
        text_features: Text embeddings of the same batch, row i describing image i (normalised here).
        pids: Person ids shared by the image and text of each row.
        margin: Relaxation m.
        gamma: Scale.
        reduction: "global" (one pooled loss for the batch) or "per_anchor" (the paper's form).

    Shapes:
        image_features: (B, D), text_features: (B, D), pids: (B,) -> () float32
    """
    loss_fn = _reduction_fn(reduction)
    sim = cosine_similarity(image_features, text_features)
    pos_mask = identity_mask(pids, pids)
    if reduction == "global":
        return loss_fn(sim, pos_mask, ~pos_mask, margin=margin, gamma=gamma)
    image_to_text = loss_fn(sim, pos_mask, ~pos_mask, margin=margin, gamma=gamma)
    text_to_image = loss_fn(sim.T, pos_mask.T, ~pos_mask.T, margin=margin, gamma=gamma)
    return (image_to_text + text_to_image) / 2


INTRINSIC_NORMALIZATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "row": lambda pair_losses: pair_losses.sum(dim=1).mean(),
    "pairs": lambda pair_losses: pair_losses.mean(),
}


def intrinsic_nitc_loss(
    sim: Tensor,
    pos_mask: Tensor,
    *,
    margin: float = 0.25,
    gamma: float = 64.0,
    normalization: Literal["row", "pairs"] = "row",
) -> Tensor:
    """N-ITC with circle logits in place of SigLIP's scaled similarities ("NC-ITC", strategy "intrinsic").

    Each pair gets a sigmoid loss on its circle logit (Sun et al., CVPR 2020, arXiv 2002.10857), weights detached:
    g_ij = gamma [1 + m - s_ij]_+ (s_ij - (1 - m)) for positives (same person, diagonal included) and
    g_ij = gamma [s_ij + m]_+ (s_ij - m) for negatives, then binary cross-entropy with logits g against pos_mask.
    The learnable SigLIP scale and bias are not used. Defaults: m = 0.25, gamma = 64.

    Normalisation: "row" sums over columns and averages over rows, SigLIP's 1/B, so the loss is on the scale of
    N-ITC. "pairs" averages over all B_t * B_i entries (the original project's, `parity=seed`), which makes the loss
    B_i times smaller than "row". The transposed direction has the same value (pos_mask is symmetric), so it is
    computed once.

    Args:
        sim: Cosine similarities (text rows, image columns).
        pos_mask: Same-person pairs.
        margin: Relaxation m.
        gamma: Scale.
        normalization: "row" or "pairs", see above.

    Shapes:
        sim: (B_t, B_i), pos_mask: (B_t, B_i) bool -> () float32
    """
    if normalization not in INTRINSIC_NORMALIZATIONS:
        choices = sorted(INTRINSIC_NORMALIZATIONS)
        raise ValueError(f"Unknown intrinsic N-ITC normalization {normalization!r}; choose one of {choices}.")
    logit_p, logit_n = circle_logits(sim, margin=margin, gamma=gamma)
    # circle_logits' logit_p is a loss-side logit (high when s_p is low); the BCE logit of a positive is its negative.
    match_logits = torch.where(pos_mask, -logit_p, logit_n)
    pair_losses = F.binary_cross_entropy_with_logits(match_logits, pos_mask.float(), reduction="none")
    return INTRINSIC_NORMALIZATIONS[normalization](pair_losses)
