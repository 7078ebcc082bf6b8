"""Retrieval metrics for text-based person search: CMC (R@k), mAP and mINP.

Definitions follow IRRA's `rank` (Jiang & Ye, CVPR 2023, arXiv:2303.12501), which TBPS-CLIP and PERSON_RLF share:
a gallery item is relevant to a query when both carry the same person id, and every relevant item counts (no junk or
same-camera filtering). Unlike IRRA, ties are broken deterministically: among equal scores the lower gallery index
ranks first, so results do not depend on the device or on the sort implementation.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

_CHUNK_BYTES = 256 * 1024**2
# Temporaries per (query, gallery) entry of a chunk: a float32 copy of fp16/bf16 scores, the NaN mask, sorted values,
# int64 sort indices, two bool relevance masks and the sort's workspace. Measured about 34-38 bytes on an H100.
_BYTES_PER_ENTRY = 40


class NoRelevantGalleryError(ValueError):
    """Raised when a query has no gallery item with its person id, so AP and INP are undefined."""


def rank_metrics(
    similarity: Tensor,
    query_pids: Tensor,
    gallery_pids: Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Rank the gallery for every query and return CMC@k, mAP and mINP in percent.

    The gallery is ranked by descending similarity; equal scores keep gallery order (stable sort). For a query with
    relevant items at 1-based ranks r_1 < ... < r_n:

    - CMC@k = 1 if r_1 <= k else 0;
    - AP = (1/n) * sum_i i / r_i (non-interpolated, over the whole ranking);
    - INP = n / r_n (Ye et al., "Deep Learning for Person Re-identification", TPAMI 2021, arXiv:2001.04193).

    Each metric is averaged over queries and multiplied by 100. Queries are processed ``chunk_size`` rows at a time
    on the similarity's device, so peak extra memory is about ``chunk_size * G * 40`` bytes.

    Args:
        similarity: Query-gallery scores; for text-to-image pass ``text_feats @ image_feats.T``, for image-to-text
            pass its transpose. float16/bfloat16 scores are ranked in float32.
        query_pids: Person id of each query.
        gallery_pids: Person id of each gallery item.
        ks: Cut-offs for CMC; each gives a key ``f"R{k}"``.
        chunk_size: Query rows ranked at once; None picks the largest chunk whose temporaries stay under ~256 MB.

    Returns:
        ``{"R1": ..., "R5": ..., "R10": ..., "mAP": ..., "mINP": ...}`` (one ``R`` key per k) as Python floats.

    Raises:
        ValueError: On shape mismatches, an empty or non-floating similarity, NaN scores, k outside [1, G], or a
            non-positive chunk size.
        NoRelevantGalleryError: If some query pid does not occur in ``gallery_pids``.

    Shapes:
        similarity: (Q, G); query_pids: (Q,); gallery_pids: (G,).
    """
    num_queries, num_gallery = _check_inputs(similarity, query_pids, gallery_pids, ks, chunk_size)
    device = similarity.device
    query_pids, gallery_pids = query_pids.to(device), gallery_pids.to(device)
    _check_every_query_has_a_match(query_pids, gallery_pids)
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_BYTES // (_BYTES_PER_ENTRY * num_gallery))

    first_ranks, ap_sums, inp_sums = [], [], []
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        first_rank, ap, inp = _rank_chunk(similarity[start:stop], query_pids[start:stop], gallery_pids, start)
        first_ranks.append(first_rank)
        ap_sums.append(ap.sum())
        inp_sums.append(inp.sum())

    first_rank = torch.cat(first_ranks)  # (Q,) 1-based rank of the best-ranked relevant item
    metrics = {f"R{k}": 100.0 * (first_rank <= k).sum().item() / num_queries for k in ks}
    metrics["mAP"] = 100.0 * torch.stack(ap_sums).sum().item() / num_queries
    metrics["mINP"] = 100.0 * torch.stack(inp_sums).sum().item() / num_queries
    return metrics


def _rank_chunk(scores: Tensor, query_pids: Tensor, gallery_pids: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """Return the first relevant rank, AP and INP of each query in one chunk of rows.

    Shapes:
        scores: (c, G); query_pids: (c,); gallery_pids: (G,); returns three (c,) tensors (int64, float64, float64).
    """
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()
    nan_rows = scores.isnan().any(dim=1).nonzero()
    if len(nan_rows):
        raise ValueError(
            f"similarity row {offset + nan_rows[0].item()} contains NaN; check the encoded features for NaN/overflow "
            "(for example fp16 encoding without autocast) before ranking."
        )
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (c, G) gallery index at each rank
    relevant = query_pids[:, None] == gallery_pids[None, :]  # (c, G)
    ranked_relevant = relevant.gather(1, order)  # (c, G) is the item at rank k+1 relevant?
    del order, relevant  # free two (c, G) tensors before nonzero allocates

    # Row-major nonzero lists each query's relevant ranks in increasing order, so the i-th hit of a query (1-based
    # ordinal i) sits at position i - 1 after that query's first entry.
    query_idx, position = ranked_relevant.nonzero(as_tuple=True)  # (n_hits,) each
    rank = position + 1
    num_rel = ranked_relevant.sum(dim=1)  # (c,)
    row_start = torch.cumsum(num_rel, 0) - num_rel  # (c,) offset of each query's first hit
    ordinal = torch.arange(len(rank), device=rank.device) - row_start[query_idx] + 1

    num_rows = scores.shape[0]
    ap = torch.zeros(num_rows, dtype=torch.float64, device=rank.device)
    ap.index_add_(0, query_idx, ordinal.double() / rank.double())
    ap /= num_rel
    first_rank = torch.full((num_rows,), scores.shape[1] + 1, dtype=torch.long, device=rank.device)
    first_rank.scatter_reduce_(0, query_idx, rank, reduce="amin")
    last_rank = torch.zeros(num_rows, dtype=torch.long, device=rank.device)
    last_rank.scatter_reduce_(0, query_idx, rank, reduce="amax")
    inp = num_rel.double() / last_rank.double()
    return first_rank, ap, inp


def _check_inputs(
    similarity: Tensor, query_pids: Tensor, gallery_pids: Tensor, ks: Sequence[int], chunk_size: int | None
) -> tuple[int, int]:
    """Validate shapes and options; return (Q, G)."""
    if similarity.ndim != 2 or 0 in similarity.shape:
        raise ValueError(f"similarity must be a non-empty (Q, G) matrix, got shape {tuple(similarity.shape)}.")
    if not similarity.is_floating_point():
        raise ValueError(f"similarity must be a floating-point tensor, got {similarity.dtype}.")
    num_queries, num_gallery = similarity.shape
    if query_pids.shape != (num_queries,):
        raise ValueError(
            f"query_pids must have shape ({num_queries},) to match similarity rows, got {tuple(query_pids.shape)}; "
            "for image-to-text pass similarity.T with the image pids as queries."
        )
    if gallery_pids.shape != (num_gallery,):
        raise ValueError(
            f"gallery_pids must have shape ({num_gallery},) to match similarity columns, "
            f"got {tuple(gallery_pids.shape)}."
        )
    bad_ks = [k for k in ks if not 1 <= k <= num_gallery]
    if bad_ks:
        raise ValueError(f"ks {bad_ks} must lie in [1, {num_gallery}] (the gallery size); pass smaller ks.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of query rows or None, got {chunk_size}.")
    return num_queries, num_gallery


def _check_every_query_has_a_match(query_pids: Tensor, gallery_pids: Tensor) -> None:
    """Raise NoRelevantGalleryError listing the queries whose pid is absent from the gallery."""
    missing = (~torch.isin(query_pids, gallery_pids)).nonzero().flatten()
    if len(missing):
        shown = missing[:5]
        raise NoRelevantGalleryError(
            f"{len(missing)} of {len(query_pids)} queries have no gallery item with the same pid "
            f"(first query indices {shown.tolist()}, pids {query_pids[shown].tolist()}); AP/INP are undefined. "
            "Check that queries and gallery come from the same split and share one pid mapping."
        )
