"""Full-sort retrieval metrics in the style of IRRA's `rank`: the reference that `bench/eval_metrics.py` times.

IRRA (Jiang & Ye, CVPR 2023) ranks the whole query-gallery matrix at once; TBPS-CLIP and PERSON_RLF run the same
algorithm. This module re-implements it step for step so that its time and memory are what users of those repos pay:

1. ``argsort`` of the full (Q, G) matrix (int64 indices, kept alive as IRRA returns them);
2. ``gallery_pids[indices]``, the gathered labels (int64, Q x G) and ``matches`` (bool, Q x G);
3. CMC from ``matches[:, :max_rank].cumsum(1)`` clipped to 1;
4. INP from ``matches.cumsum(1)`` (int64, Q x G) with a Python loop over the Q queries;
5. AP from precision@k built with a Python loop over the G columns, ``torch.stack``-ed into a (Q, G) tensor and
   multiplied by ``matches``.

Two deliberate differences keep its numbers equal to ``utils.metrics.rank_metrics``: the sort is stable (equal scores
keep gallery order, IRRA's unstable ``argsort`` leaves their order unspecified), and precision, CMC and INP are
float64 where IRRA uses float32. The precision column list and its stack therefore take 8 instead of 4 bytes per
entry each; the product with ``matches`` is taken in place (IRRA allocates a third tensor), so the peak is about 4
bytes per entry above IRRA's (about 49 bytes per entry measured on the CPU, beyond the similarity itself). Everything
runs on the similarity's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def reference_rank(
    similarity: Tensor, query_pids: Tensor, gallery_pids: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Return CMC@k, mAP and mINP in percent by fully sorting every row, as IRRA's ``rank`` does.

    Args:
        similarity: Query-gallery scores.
        query_pids: Person id of each query.
        gallery_pids: Person id of each gallery item.
        ks: Cut-offs for CMC; each gives a key ``f"R{k}"``.

    Returns:
        ``{"R1": ..., "R5": ..., "R10": ..., "mAP": ..., "mINP": ...}`` as Python floats.

    Shapes:
        similarity: (Q, G); query_pids: (Q,); gallery_pids: (G,).
    """
    query_pids, gallery_pids = query_pids.to(similarity.device), gallery_pids.to(similarity.device)
    indices = torch.argsort(similarity, dim=1, descending=True, stable=True)  # (Q, G)
    pred_labels = gallery_pids[indices]  # (Q, G)
    matches = pred_labels.eq(query_pids.view(-1, 1))  # (Q, G)

    all_cmc = matches[:, : max(ks)].cumsum(1)
    all_cmc[all_cmc > 1] = 1
    cmc = all_cmc.double().mean(0) * 100

    num_rel = matches.sum(1)
    tmp_cmc = matches.cumsum(1)  # (Q, G) hits up to each rank
    inp = []
    for i, match_row in enumerate(matches):
        last = match_row.nonzero()[-1]  # 0-based rank of the hardest relevant item
        inp.append(tmp_cmc[i][last].double() / (last + 1))
    mean_inp = torch.cat(inp).mean() * 100

    # Reassigning the name frees each previous tensor at the same point as in IRRA.
    tmp_cmc = [tmp_cmc[:, i].double() / (i + 1) for i in range(tmp_cmc.shape[1])]  # G precision columns, (Q,)
    tmp_cmc = torch.stack(tmp_cmc, 1).mul_(matches)  # (Q, G) precision at every relevant rank, 0 elsewhere
    mean_ap = (tmp_cmc.sum(1) / num_rel).mean() * 100

    metrics = {f"R{k}": cmc[k - 1].item() for k in ks}
    metrics["mAP"] = mean_ap.item()
    metrics["mINP"] = mean_inp.item()
    return metrics
