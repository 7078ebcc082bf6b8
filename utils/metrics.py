"""Retrieval metrics for text-based person search: CMC (R@k), mAP and mINP, exact at any size in bounded memory.

Definitions follow IRRA's `rank` (Jiang & Ye, CVPR 2023, arXiv:2303.12501), which TBPS-CLIP and PERSON_RLF share:
a gallery item is relevant to a query when both carry the same person id, and every relevant item counts (no junk or
same-camera filtering). Unlike IRRA, ties are broken deterministically: among equal scores the lower gallery index
ranks first, so results do not depend on the device or on the sort implementation.

Only the ranks of relevant items enter the metrics, and the rank of relevant item j of a query is
``1 + #{g : s_g > s_j} + #{g < j : s_g == s_j}``: a count, so rows are never sorted in full (unless all their
scores tie). Per chunk of queries:

1. Every score goes into one of ``B + 2`` bins of its row (``B`` about G / 8, see ``_num_bins``): ``B`` equal-width
   bins spanning the row's relevant scores plus one bin below and one above them. The score -> bin map is a chain of
   correctly rounded, monotone operations, so an item in a higher bin than a relevant item scores strictly higher,
   and one in a lower bin strictly lower. A relevant item's bin is read from the same map, never recomputed.
2. One histogram of the chunk's (row, bin) keys counts the items in each bin: a suffix sum over a row then gives the
   items ranked above a whole bin. This is the only work done for most items: a few dense passes, whatever the
   scores (for an untrained model half the gallery scores above a query's lowest relevant item).
3. Items sharing a bin with a relevant item (the relevant items, their ties and a few neighbours: about P * G / B
   per row for P relevant items) are ranked exactly by a stable sort of just those items, so ties keep gallery
   order. Rank = 1 + (items in higher bins without a relevant item) + (position among the exactly ranked ones).

The cost is about ten passes over the chunk plus work proportional to the exactly ranked items; memory is bounded by
a budget (``BYTES_PER_ENTRY`` per query-gallery entry of a chunk, whatever the scores: if every score of a row is
tied, every item of it is ranked exactly, a sort of the whole row).
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from utils.errors import InputError

#: The ranks of the CMC (R@k) every evaluation reports.
RANKS = (1, 5, 10)
#: Default budget for the temporaries of one chunk of queries, per device type (others use the CPU's). On the CPU,
#: chunks of about 100 rows of a 20,000-item gallery measured fastest (their passes stay in cache); GPUs get larger
#: chunks: each chunk costs a fixed few milliseconds of kernel launches and host synchronisations there.
DEFAULT_MEMORY_BUDGET_BYTES = {"cpu": 128 * 1024**2, "cuda": 1024**3}
#: Bound on the temporaries per (query, gallery) entry of a chunk. The worst case is every item being ranked exactly
#: (all scores tied) for queries whose every gallery item is relevant (a single pid): each entry then holds a
#: relevant-item index and key, an int32 bin key, a flat position, row and column, a score, a slot, relevance flags
#: and a sort index at some point. Measured CPU peak: 49 bytes (any dtype); the rest is margin for the GPU
#: sort's workspace. Realistic and random scores use about 10 bytes per entry.
BYTES_PER_ENTRY = 64
#: Step 1 of the module doc uses one bin per ``_ITEMS_PER_BIN`` gallery items, at least ``_MIN_BINS``: more bins leave
#: fewer items to rank exactly but cost more per row (measured best between G / 16 and G / 4 on the CPU).
_ITEMS_PER_BIN = 8
_MIN_BINS = 256
# Per bin and query row: an int64 count, its cumulative sum and suffix sum, and a bool flag.
_BYTES_PER_BIN = 25


class NoRelevantGalleryError(InputError):
    """Raised when a query has no gallery item with its person id, so AP and INP are undefined."""


def rank_metrics(
    similarity: Tensor,
    query_pids: Tensor,
    gallery_pids: Tensor,
    *,
    ks: Sequence[int] = RANKS,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
) -> dict[str, float]:
    """Rank the gallery for every query and return CMC@k, mAP and mINP in percent.

    The gallery is ranked by descending similarity; equal scores keep gallery order (as a stable sort would). For a
    query with relevant items at 1-based ranks r_1 < ... < r_n:

    - CMC@k = 1 if r_1 <= k else 0;
    - AP = (1/n) * sum_i i / r_i (non-interpolated, over the whole ranking);
    - INP = n / r_n (Ye et al., "Deep Learning for Person Re-identification", TPAMI 2021, arXiv:2001.04193).

    Each metric is averaged over queries and multiplied by 100. Queries are processed in chunks on the similarity's
    device (pass GPU scores to rank on the GPU); a chunk of c queries needs at most ``c * G * BYTES_PER_ENTRY``
    bytes of temporaries plus per-bin tables (about 3 bytes per gallery item and row, at least 6.5 KB a row), beyond
    the inputs and O(Q + G) bookkeeping.

    Args:
        similarity: Query-gallery scores; for text-to-image pass ``text_feats @ image_feats.T``, for image-to-text
            pass its transpose. float16/bfloat16 scores are ranked in float32 (exactly).
        query_pids: Person id of each query.
        gallery_pids: Person id of each gallery item.
        ks: Cut-offs for CMC; each gives a key ``f"R{k}"``.
        chunk_size: Query rows ranked at once; overrides ``memory_budget_bytes``.
        memory_budget_bytes: Bound on the chunk temporaries, from which the chunk size is derived (see
            ``rank_chunk_rows``); None means ``DEFAULT_MEMORY_BUDGET_BYTES`` for the similarity's device type.

    Returns:
        ``{"R1": ..., "R5": ..., "R10": ..., "mAP": ..., "mINP": ...}`` (one ``R`` key per k) as Python floats.

    Raises:
        ValueError: On shape mismatches, an empty or non-floating similarity, NaN scores, k outside [1, G], a
            non-positive chunk size, or a budget too small for one query row.
        NoRelevantGalleryError: If some query pid does not occur in ``gallery_pids``.

    Shapes:
        similarity: (Q, G); query_pids: (Q,); gallery_pids: (G,).
    """
    num_queries, num_gallery = _check_inputs(similarity, query_pids, gallery_pids, ks, chunk_size)
    device = similarity.device
    if chunk_size is None:
        default_budget = DEFAULT_MEMORY_BUDGET_BYTES.get(device.type, DEFAULT_MEMORY_BUDGET_BYTES["cpu"])
        budget = default_budget if memory_budget_bytes is None else memory_budget_bytes
        chunk_size = rank_chunk_rows(num_gallery, budget)
    query_pids, gallery_pids = query_pids.to(device), gallery_pids.to(device)
    _check_every_query_has_a_match(query_pids, gallery_pids)
    groups = _group_gallery_by_pid(query_pids, gallery_pids)

    first_ranks, ap_sums, inp_sums = [], [], []
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        first_rank, ap, inp = _rank_chunk(similarity[start:stop], query_pids, gallery_pids, groups, start)
        first_ranks.append(first_rank)
        ap_sums.append(ap.sum())
        inp_sums.append(inp.sum())

    first_rank = torch.cat(first_ranks)  # (Q,) 1-based rank of the best-ranked relevant item
    metrics = {f"R{k}": 100.0 * (first_rank <= k).sum().item() / num_queries for k in ks}
    metrics["mAP"] = 100.0 * torch.stack(ap_sums).sum().item() / num_queries
    metrics["mINP"] = 100.0 * torch.stack(inp_sums).sum().item() / num_queries
    return metrics


def rank_chunk_rows(num_gallery: int, memory_budget_bytes: int) -> int:
    """Return the most query rows per chunk whose worst-case temporaries fit in the budget.

    A row needs ``num_gallery * BYTES_PER_ENTRY`` bytes plus ``_BYTES_PER_BIN`` per bin (about 3 bytes per gallery
    item, at least 6.5 KB).

    Raises:
        ValueError: If the budget cannot hold a single query row.
    """
    row_bytes = num_gallery * BYTES_PER_ENTRY + (_num_bins(num_gallery) + 2) * _BYTES_PER_BIN
    if memory_budget_bytes < row_bytes:
        raise ValueError(
            f"memory_budget_bytes={memory_budget_bytes} cannot hold one query row of a {num_gallery}-item gallery "
            f"({row_bytes} bytes); raise the budget or pass chunk_size."
        )
    return memory_budget_bytes // row_bytes


class _PidGroups(NamedTuple):
    """Gallery indices grouped by pid, and where each query's relevant items sit in that grouping."""

    grouped: Tensor  # (G,) gallery indices sorted by pid, ascending within a pid
    start: Tensor  # (Q,) offset of the query's pid group in ``grouped``
    size: Tensor  # (Q,) number of relevant items of the query
    max_size: int

    def relevant_items(self, rows: slice) -> Tensor:
        """Gallery indices of the relevant items of queries ``rows``, padded by repeating each query's last one.

        Shapes:
            returns (rows, max_size) int64.
        """
        size = self.size[rows, None]
        slots = torch.minimum(torch.arange(self.max_size, device=size.device), size - 1)
        return self.grouped[self.start[rows, None] + slots]


def _group_gallery_by_pid(query_pids: Tensor, gallery_pids: Tensor) -> _PidGroups:
    """Group the gallery by pid; every query pid must occur in it (checked before)."""
    grouped = torch.argsort(gallery_pids, stable=True)
    pids, counts = torch.unique_consecutive(gallery_pids[grouped], return_counts=True)
    group = torch.searchsorted(pids, query_pids)
    return _PidGroups(grouped, (torch.cumsum(counts, 0) - counts)[group], counts[group], int(counts.max()))


def _rank_chunk(
    scores: Tensor, query_pids: Tensor, gallery_pids: Tensor, groups: _PidGroups, offset: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Return the first relevant rank, AP and INP of each query in one chunk of rows.

    Shapes:
        scores: (c, G), rows ``offset:offset + c`` of the similarity; query_pids: (Q,); gallery_pids: (G,); returns
        three (c,) tensors (int64, float64, float64).
    """
    _raise_on_nan(scores, offset)
    rows = slice(offset, offset + scores.shape[0])
    num_bins = _num_bins(scores.shape[1])
    relevant_items = groups.relevant_items(rows)
    key = _bin_keys(scores, relevant_items, num_bins)
    above, exact, exact_key = _count_bins(key, relevant_items, num_bins)
    del key, relevant_items
    query_idx, rank = _rank_exactly(scores, exact, exact_key, above, query_pids[rows], gallery_pids)
    return _summarise(query_idx, rank, groups.size[rows], scores.shape[1])


def _num_bins(num_gallery: int) -> int:
    """Bins spanning a row's relevant scores in step 1 of the module doc."""
    return max(_MIN_BINS, num_gallery // _ITEMS_PER_BIN)


def _summarise(
    query_idx: Tensor, rank: Tensor, num_relevant: Tensor, num_gallery: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Return the first relevant rank, AP and INP of each query from the ranks of its relevant items.

    Shapes:
        query_idx, rank: (n,) sorted by query, then by rank; num_relevant: (c,); returns three (c,) tensors.
    """
    # The i-th hit of a query (1-based ordinal i) sits at position i - 1 after that query's first entry.
    row_start = torch.cumsum(num_relevant, 0) - num_relevant
    precision = torch.arange(1, len(rank) + 1, device=rank.device).sub_(row_start[query_idx]).double().div_(rank)
    num_rows = len(num_relevant)
    ap = torch.zeros(num_rows, dtype=torch.float64, device=rank.device)
    ap.index_add_(0, query_idx, precision)
    del precision
    ap /= num_relevant
    first_rank = torch.full((num_rows,), num_gallery + 1, dtype=torch.long, device=rank.device)
    first_rank.scatter_reduce_(0, query_idx, rank, reduce="amin")
    last_rank = torch.zeros(num_rows, dtype=torch.long, device=rank.device)
    last_rank.scatter_reduce_(0, query_idx, rank, reduce="amax")
    inp = num_relevant.double() / last_rank.double()
    return first_rank, ap, inp


def _bin_keys(scores: Tensor, relevant_items: Tensor, num_bins: int) -> Tensor:
    """Return the flat (row, bin) key of every entry of a chunk (step 1 of the module doc).

    Bin ``b`` of row ``r`` has key ``r * (num_bins + 2) + b + 1``: bin -1 holds the items below the row's lowest
    relevant score, bins 0 to ``num_bins - 1`` span its relevant scores, and bin ``num_bins`` holds the items above
    them. Subtract, multiply by a positive scale, clamp and truncate are each correctly rounded and monotone in the
    score, so ``a <= b`` implies ``key(a) <= key(b)`` within a row, whichever kernel path (vector or scalar) computed
    each; none is fused with another, so no step rounds differently in different lanes. float16/bfloat16 scores are
    binned in float32 (exactly converted).

    Shapes:
        scores: (c, G); relevant_items: (c, P) gallery indices; returns (c, G) int32 (int64 beyond 2**31 keys),
        contiguous whatever the strides of ``scores``.
    """
    num_rows = scores.shape[0]
    compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    finfo = torch.finfo(compute_dtype)
    relevant_scores = scores.gather(1, relevant_items).to(compute_dtype)
    # Finite bounds keep score - low free of NaN (inf - inf) and the scale finite and positive.
    low = relevant_scores.amin(1, keepdim=True).clamp(-finfo.max, finfo.max)
    high = relevant_scores.amax(1, keepdim=True).clamp(-finfo.max, finfo.max)
    scale = ((num_bins - 1) / (high.double() - low.double())).clamp(finfo.tiny, finfo.max).to(compute_dtype)
    # An explicit contiguous output keeps keys row-major (columns increasing within a row) for transposed inputs.
    scaled = torch.empty(scores.shape, dtype=compute_dtype, device=scores.device)
    torch.sub(scores, low, out=scaled).mul_(scale).clamp_(-1, num_bins)
    bins_per_row = num_bins + 2
    key_dtype = torch.int32 if num_rows * bins_per_row < 2**31 else torch.int64
    key = scaled.to(key_dtype)  # truncation, monotone: (-1, 1) -> 0
    del scaled
    key += torch.arange(1, num_rows * bins_per_row, bins_per_row, dtype=key_dtype, device=key.device)[:, None]
    return key


def _count_bins(key: Tensor, relevant_items: Tensor, num_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Count the items per bin and pick the items ranked exactly (steps 2-3 of the module doc).

    Returns:
        ``above``: for every flat (row, bin) key, the items of that row in higher bins that hold no relevant item;
        ``exact``: flat ``row * G + column`` positions of the items in bins holding a relevant item, row-major;
        ``exact_key``: their keys.

    Shapes:
        key: (c, G) from ``_bin_keys``; relevant_items: (c, P); returns (c * (num_bins + 2),) int64, (n,) int64 and
        (n,) of key's dtype.
    """
    num_keys = key.shape[0] * (num_bins + 2)
    flat_key = key.view(-1)
    has_relevant = torch.zeros(num_keys, dtype=torch.bool, device=key.device)
    has_relevant[key.gather(1, relevant_items).view(-1).long()] = True
    counts = _count(flat_key, num_keys).masked_fill_(has_relevant, False).view(-1, num_bins + 2)
    above = (counts.sum(1, keepdim=True) - counts.cumsum(1)).view(-1)
    del counts
    exact = has_relevant.index_select(0, flat_key).nonzero().squeeze(1)
    return above, exact, flat_key[exact]


def _rank_exactly(
    scores: Tensor, exact: Tensor, exact_key: Tensor, above: Tensor, query_pids: Tensor, gallery_pids: Tensor
) -> tuple[Tensor, Tensor]:
    """Return (query index, 1-based rank) of every relevant item, by query then by rank (step 3 of the module doc).

    Only the items in bins holding a relevant item are sorted, stably, so that ties keep gallery order. ``del``
    statements free each temporary as soon as possible: they keep the peak under ``BYTES_PER_ENTRY`` when every item
    is ranked exactly (all scores tied). ``exact`` is overwritten with column indices.

    Shapes:
        scores: (c, G); exact, exact_key: (n,) from ``_count_bins``; above: (c * bins,); query_pids: (c,);
        gallery_pids: (G,); returns two (n_relevant,) int64 tensors.
    """
    num_rows, num_gallery = scores.shape
    device = scores.device
    exact_rows = torch.div(exact, num_gallery, rounding_mode="floor")
    exact_cols = exact.sub_(exact_rows * num_gallery)
    exact_relevant = gallery_pids[exact_cols] == query_pids[exact_rows]
    exact_scores = scores[exact_rows, exact_cols]
    per_row = _count(exact_rows, num_rows)
    exact_start = torch.cumsum(per_row, 0) - per_row
    slot = torch.arange(len(exact_rows), device=device).sub_(exact_start[exact_rows])
    # Stable sort, laid out left-aligned in a (c, width) matrix; float16/bfloat16 sort in float32 (exactly).
    width = int(per_row.max())
    sort_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    padded = torch.full((num_rows, width), -torch.inf, dtype=sort_dtype, device=device)
    padded[exact_rows, slot] = exact_scores.to(sort_dtype)
    del exact_scores
    is_relevant = torch.zeros(num_rows, width, dtype=torch.bool, device=device)
    is_relevant[exact_rows, slot] = exact_relevant
    del exact_rows, slot, exact_relevant
    # Padding sits right of every real entry, so the stable sort keeps it after real -inf scores.
    order = torch.sort(padded, dim=1, descending=True, stable=True).indices
    del padded
    ranked_relevant = is_relevant.gather(1, order)
    del is_relevant
    # Flat positions, so that query index and rank own separate storage (a 2-D nonzero would pin both).
    flat = ranked_relevant.view(-1).nonzero().squeeze(1)
    del ranked_relevant
    entry = order.view(-1)[flat]  # slot of each relevant item among its row's exactly ranked items
    del order
    query_idx = torch.div(flat, width, rounding_mode="floor")
    position = flat.sub_(query_idx * width)
    entry += exact_start[query_idx]
    rank = above.index_select(0, exact_key[entry])
    return query_idx, rank.add_(position).add_(1)


def _count(index: Tensor, size: int) -> Tensor:
    """Occurrences (int64) of each value in [0, size) of the 1-D integer tensor `index`.

    ``torch.bincount`` is the fastest histogram on the CPU (``index_add_`` is several times slower there); on other
    devices it waits for the device to size its output, which ``index_add_`` does not.
    """
    if index.device.type == "cpu":
        return torch.bincount(index, minlength=size)
    ones = torch.ones((), dtype=torch.long, device=index.device).expand_as(index)
    return torch.zeros(size, dtype=torch.long, device=index.device).index_add_(0, index, ones)


def _raise_on_nan(scores: Tensor, offset: int) -> None:
    """Raise on the first row holding a NaN; a row sum is NaN for any NaN, so clean rows cost one reduction."""
    suspect = scores.sum(dim=1).isnan()
    if not suspect.any():
        return
    nan_rows = scores[suspect].isnan().any(dim=1)  # a suspect row may only hold +inf and -inf
    if nan_rows.any():
        row = suspect.nonzero().flatten()[nan_rows][0].item()
        raise ValueError(
            f"similarity row {offset + row} contains NaN; check the encoded features for NaN/overflow "
            "(for example fp16 encoding without autocast) before ranking."
        )


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


def chance_rank1(query_pids: Sequence[int], gallery_pids: Sequence[int]) -> float:
    """R1 (percent) of a random ranking: the mean over queries of |relevant gallery items| / |gallery|.

    Counts gallery items per pid, so it costs O(Q + G) rather than a Q x G comparison.
    """
    per_pid: dict[int, int] = {}
    for pid in gallery_pids:
        per_pid[int(pid)] = per_pid.get(int(pid), 0) + 1
    hits = sum(per_pid.get(int(pid), 0) for pid in query_pids)
    return 100.0 * hits / (len(query_pids) * len(gallery_pids))
