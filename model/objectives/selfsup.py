"""Self-supervised image losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def simclr_loss(view_a: Tensor, view_b: Tensor, *, temperature: float = 0.1) -> Tensor:
    """NT-Xent of SimCLR (arXiv 2002.05709) between two augmented views of the same images.

    For anchor `a_i` the positive is `b_i`; negatives are every other `b_j` and every other `a_j`. Averaged over
    both views as anchors.

    Shapes:
        view_a: (B, D), view_b: (B, D) -> ()
    """
    a, b = F.normalize(view_a.float(), dim=-1), F.normalize(view_b.float(), dim=-1)
    self_mask = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
    targets = torch.arange(a.shape[0], device=a.device)
    loss = 0.0
    for anchor, other in ((a, b), (b, a)):
        cross = anchor @ other.T / temperature  # (B, B): column i is the positive of row i
        within = anchor @ anchor.T / temperature  # (B, B)
        within = within.masked_fill(self_mask, torch.finfo(within.dtype).min)  # self excluded, in any dtype
        loss = loss + F.cross_entropy(torch.cat([cross, within], dim=1), targets)
    return loss / 2
