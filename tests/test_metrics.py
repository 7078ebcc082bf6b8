"""Tests for utils.metrics.rank_metrics against hand-checked values and a slow pure-Python reference."""

import math

import pytest
import torch

from bench.reference_rank import reference_rank
from utils import metrics
from utils.metrics import BYTES_PER_ENTRY, NoRelevantGalleryError, rank_chunk_rows, rank_metrics

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]


def _reference(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor, ks) -> dict:
    """Full ranking per query, IRRA definitions, ties broken by gallery index."""
    sim, qp, gp = similarity.double().tolist(), query_pids.tolist(), gallery_pids.tolist()
    cmc, aps, inps = {k: 0 for k in ks}, [], []
    for row, pid in zip(sim, qp):
        order = sorted(range(len(gp)), key=lambda j: (-row[j], j))
        matches = [gp[j] == pid for j in order]
        for k in ks:
            cmc[k] += any(matches[:k])
        hits, precisions, last = 0, [], 0
        for position, is_match in enumerate(matches, start=1):
            if is_match:
                hits += 1
                precisions.append(hits / position)
                last = position
        aps.append(sum(precisions) / hits)
        inps.append(hits / last)
    out = {f"R{k}": 100.0 * cmc[k] / len(qp) for k in ks}
    out["mAP"] = 100.0 * sum(aps) / len(aps)
    out["mINP"] = 100.0 * sum(inps) / len(inps)
    return out


def _assert_metrics_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-9), key


def _random_case(num_queries: int, num_gallery: int, num_ids: int, decimals: int, seed: int):
    """Random scores rounded to `decimals` (forcing exact ties) and pids with several positives per query."""
    gen = torch.Generator().manual_seed(seed)
    extra_pids = torch.randint(0, num_ids, (num_gallery - num_ids,), generator=gen)
    gallery_pids = torch.cat([torch.arange(num_ids), extra_pids])  # every id occurs at least once
    gallery_pids = gallery_pids[torch.randperm(num_gallery, generator=gen)]
    query_pids = torch.randint(0, num_ids, (num_queries,), generator=gen)
    similarity = torch.round(torch.rand(num_queries, num_gallery, generator=gen) * 2 - 1, decimals=decimals)
    return similarity, query_pids, gallery_pids


def _structured_case(num_queries: int, num_gallery: int, seed: int, dtype: torch.dtype = torch.float32):
    """Scores shaped like a trained model's, with exact ties, and between 1 and ~num_gallery / 4 positives per query.

    Group sizes are skewed (many pids with one or two items, a few with dozens). Positives score higher on average,
    so most gallery items fall below a query's lowest positive and many candidates sit between its positives. Scores
    are quantised (ties between positives and negatives) and every tenth gallery item duplicates its neighbour's
    column (whole tied columns, as identical captions give).
    """
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.cat([torch.ones(num_gallery // 8, dtype=torch.long), torch.randint(2, 6, (num_gallery // 8,))])
    sizes = torch.cat([sizes, torch.tensor([num_gallery // 4])])
    gallery_pids = torch.repeat_interleave(torch.arange(len(sizes)), sizes)[:num_gallery]
    gallery_pids = torch.cat([gallery_pids, torch.randint(0, len(sizes), (num_gallery - len(gallery_pids),))])
    gallery_pids = gallery_pids[torch.randperm(num_gallery, generator=gen)]
    duplicated = torch.arange(1, num_gallery, 10)
    gallery_pids[duplicated] = gallery_pids[duplicated - 1]
    query_pids = gallery_pids[torch.randint(0, num_gallery, (num_queries,), generator=gen)]
    relevant = query_pids[:, None] == gallery_pids[None, :]
    similarity = torch.randn(num_queries, num_gallery, generator=gen) + 2.0 * relevant
    similarity = torch.round(similarity * 16) / 16
    similarity[:, duplicated] = similarity[:, duplicated - 1]
    return similarity.to(dtype), query_pids, gallery_pids


@pytest.mark.parametrize("device", DEVICES)
def test_hand_checked_example(device):
    similarity = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.2, 0.3, 0.9, 0.1]], device=device)
    metrics = rank_metrics(similarity, torch.tensor([0, 1]), torch.tensor([0, 1, 0, 2]), ks=(1, 2, 3, 4))
    _assert_metrics_equal(metrics, {"R1": 50.0, "R2": 100.0, "R3": 100.0, "R4": 100.0, "mAP": 62.5, "mINP": 50.0})


def test_default_keys_and_multiple_positives():
    # Query 0 (pid 7): relevant items at ranks 2, 3, 5 of 10. Query 1 (pid 3): relevant at ranks 1 and 10.
    scores = torch.linspace(1.0, 0.1, 10)  # gallery index j sits at rank j + 1
    similarity = torch.stack([scores, scores])
    gallery_pids = torch.tensor([3, 7, 7, 1, 7, 1, 1, 1, 1, 3])
    metrics = rank_metrics(similarity, torch.tensor([7, 3]), gallery_pids)
    ap_0, ap_1 = (1 / 2 + 2 / 3 + 3 / 5) / 3, (1 / 1 + 2 / 10) / 2
    expected = {"R1": 50.0, "R5": 100.0, "R10": 100.0, "mAP": 50.0 * (ap_0 + ap_1), "mINP": 50.0 * (3 / 5 + 2 / 10)}
    _assert_metrics_equal(metrics, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("gallery_pids", "expected"),
    [
        # Three-way tie at 0.5: the irrelevant index 0 ranks first, relevant 1 and 2 take ranks 2 and 3.
        ([0, 1, 1, 2], {"R1": 0.0, "R2": 100.0, "mAP": 100 * (1 / 2 + 2 / 3) / 2, "mINP": 100 * 2 / 3}),
        # Same scores, relevant items first in gallery order: they win the tie.
        ([1, 1, 0, 2], {"R1": 100.0, "R2": 100.0, "mAP": 100.0, "mINP": 100.0}),
    ],
)
def test_ties_broken_by_gallery_index(device, gallery_pids, expected):
    similarity = torch.tensor([[0.5, 0.5, 0.5, 0.2]], device=device)
    _assert_metrics_equal(rank_metrics(similarity, torch.tensor([1]), torch.tensor(gallery_pids), ks=(1, 2)), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_signed_zeros_tie(device):
    # -0.0 == 0.0, so the lower index (irrelevant) must rank first whatever the sign bits.
    similarity = torch.tensor([[-1.0, -0.0, 0.0], [-1.0, 0.0, -0.0]], device=device)
    metrics = rank_metrics(similarity, torch.tensor([1, 1]), torch.tensor([0, 2, 1]), ks=(1, 2))
    _assert_metrics_equal(metrics, {"R1": 0.0, "R2": 100.0, "mAP": 50.0, "mINP": 50.0})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [1, 4, 37, 1000, None])
@pytest.mark.parametrize("decimals", [1, 3])
def test_matches_reference_on_random_scores(device, chunk_size, decimals):
    similarity, query_pids, gallery_pids = _random_case(37, 53, 6, decimals, seed=decimals)
    ks = (1, 5, 10, 53)
    metrics = rank_metrics(similarity.to(device), query_pids, gallery_pids, ks=ks, chunk_size=chunk_size)
    _assert_metrics_equal(metrics, _reference(similarity, query_pids, gallery_pids, ks))


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_on_long_gallery_with_many_ties(device):
    # Long rows take different sort kernels (e.g. radix sort on CUDA) than the small cases above.
    similarity, query_pids, gallery_pids = _random_case(3, 4000, 50, 2, seed=7)
    metrics = rank_metrics(similarity.to(device), query_pids, gallery_pids, chunk_size=2)
    _assert_metrics_equal(metrics, _reference(similarity, query_pids, gallery_pids, (1, 5, 10)))


def _use_bins(monkeypatch, num_bins: int) -> None:
    """Make rank_metrics span every row's relevant scores with exactly `num_bins` bins, whatever the gallery size."""
    monkeypatch.setattr(metrics, "_MIN_BINS", num_bins)
    monkeypatch.setattr(metrics, "_ITEMS_PER_BIN", 10**9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_bins", [2, 3, 256])
@pytest.mark.parametrize(("chunk_size", "seed"), [(1, 0), (7, 1), (None, 2)])
def test_matches_reference_on_structured_scores(monkeypatch, device, num_bins, chunk_size, seed):
    # Two bins rank most items between the relevant scores exactly; 256 bins count most of them per bin instead.
    _use_bins(monkeypatch, num_bins)
    similarity, query_pids, gallery_pids = _structured_case(40, 400, seed)
    ks = (1, 5, 10, 400)
    actual = rank_metrics(similarity.to(device), query_pids, gallery_pids, ks=ks, chunk_size=chunk_size)
    _assert_metrics_equal(actual, _reference(similarity, query_pids, gallery_pids, ks))


def _normal_case(num_queries: int, num_gallery: int, num_ids: int, seed: int, dtype: torch.dtype = torch.float32):
    """Standard normal scores, as an untrained model gives, with every id at least twice in the gallery."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.randint(0, num_ids, (num_gallery - 2 * num_ids,), generator=gen)
    gallery_pids = torch.cat([torch.arange(num_ids), torch.arange(num_ids), spread])
    gallery_pids = gallery_pids[torch.randperm(num_gallery, generator=gen)]
    query_pids = gallery_pids[torch.randint(0, num_gallery, (num_queries,), generator=gen)]
    return torch.randn(num_queries, num_gallery, generator=gen).to(dtype), query_pids, gallery_pids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("num_ids", "chunk_size"), [(2, 7), (20, None), (250, 4)])
def test_matches_definition_on_standard_normal_scores(device, num_ids, chunk_size):
    # Half the gallery scores above a query's lowest relevant item: the case the dense bin counts exist for.
    similarity, query_pids, gallery_pids = _normal_case(24, 600, num_ids, seed=num_ids)
    ks = (1, 5, 10, 600)
    actual = rank_metrics(similarity.to(device), query_pids, gallery_pids, ks=ks, chunk_size=chunk_size)
    _assert_metrics_equal(actual, _reference(similarity, query_pids, gallery_pids, ks))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_bins", [2, 256])
@pytest.mark.parametrize(
    ("values", "num_ids"),
    [(3, 7), (2, 40), (1, 7), (1, 1), (3, 1)],
    ids=["three_values", "two_values", "all_equal", "all_equal_one_pid", "three_values_one_pid"],
)
def test_matches_definition_under_heavy_ties(monkeypatch, device, num_bins, values, num_ids):
    # Ties between relevant and irrelevant items everywhere: ranks then hinge on gallery order alone.
    _use_bins(monkeypatch, num_bins)
    gen = torch.Generator().manual_seed(values * 100 + num_ids)
    gallery_pids = torch.randint(0, num_ids, (300,), generator=gen)
    gallery_pids[:num_ids] = torch.arange(num_ids)
    query_pids = gallery_pids[torch.randint(0, 300, (20,), generator=gen)]
    similarity = torch.randint(0, values, (20, 300), generator=gen).float() / 4 - 0.25
    ks = (1, 5, 10, 300)
    actual = rank_metrics(similarity.to(device), query_pids, gallery_pids, ks=ks, chunk_size=6)
    _assert_metrics_equal(actual, _reference(similarity, query_pids, gallery_pids, ks))


@pytest.mark.parametrize("device", DEVICES)
def test_matches_definition_with_many_relevant_items_per_query(device):
    # Image-to-text layout: each image query has every caption of its person (here 30 to 120 of them) relevant,
    # next to one query whose person owns most of the gallery.
    gen = torch.Generator().manual_seed(9)
    caption_pids = torch.cat([torch.full((n,), pid) for pid, n in enumerate([30, 45, 60, 120, 400])])
    caption_pids = caption_pids[torch.randperm(len(caption_pids), generator=gen)]
    image_pids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 0, 2])
    centres = torch.randn(5, 8, generator=gen)
    captions = torch.nn.functional.normalize(centres[caption_pids] + torch.randn(655, 8, generator=gen), dim=1)
    images = torch.nn.functional.normalize(centres[image_pids] + torch.randn(10, 8, generator=gen), dim=1)
    similarity = (images @ captions.T).half().float()  # float16 grid: ties among the relevant items too
    ks = (1, 5, 10, 655)
    for chunk_size in (1, 3, None):
        actual = rank_metrics(similarity.to(device), image_pids, caption_pids, ks=ks, chunk_size=chunk_size)
        _assert_metrics_equal(actual, _reference(similarity, image_pids, caption_pids, ks))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_scores_of_an_untrained_model(device, dtype):
    # Normal scores on the float16/bfloat16 grid: thousands of exact ties per row, binned and sorted in float32.
    similarity, query_pids, gallery_pids = _normal_case(12, 3000, 300, seed=11, dtype=dtype)
    actual = rank_metrics(similarity.to(device), query_pids, gallery_pids, chunk_size=5)
    _assert_metrics_equal(actual, _reference(similarity, query_pids, gallery_pids, (1, 5, 10)))


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_boundaries_do_not_change_the_metrics(device):
    # Queries sorted by their number of relevant items: every chunk pads to a different maximum.
    similarity, query_pids, gallery_pids = _structured_case(45, 500, seed=12)
    relevant_counts = (query_pids[:, None] == gallery_pids[None, :]).sum(1)
    order = torch.argsort(relevant_counts, stable=True)
    similarity, query_pids = similarity[order], query_pids[order]
    expected = reference_rank(similarity, query_pids, gallery_pids, (1, 5, 10, 500))
    for chunk_size in (1, 2, 8, 44, 45, 46):
        actual = rank_metrics(
            similarity.to(device), query_pids, gallery_pids, ks=(1, 5, 10, 500), chunk_size=chunk_size
        )
        _assert_metrics_equal(actual, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_extreme_and_signed_zero_scores(device, dtype):
    finfo = torch.finfo(dtype)
    specials = torch.tensor([math.inf, -math.inf, finfo.max, -finfo.max, finfo.tiny, -finfo.tiny, 0.0, -0.0, 1.0])
    similarity, query_pids, gallery_pids = _structured_case(30, 200, seed=3, dtype=dtype)
    gen = torch.Generator().manual_seed(4)
    where = torch.rand(similarity.shape, generator=gen) < 0.3
    similarity[where] = specials[torch.randint(0, len(specials), (int(where.sum()),), generator=gen)].to(dtype)
    similarity[0] = math.inf  # a row tied at +inf throughout
    similarity[1, gallery_pids == query_pids[1]] = -math.inf  # every positive of a row at -inf
    actual = rank_metrics(similarity.to(device), query_pids, gallery_pids, ks=(1, 5))
    _assert_metrics_equal(actual, _reference(similarity, query_pids, gallery_pids, (1, 5)))


def test_non_contiguous_similarity():
    similarity, query_pids, gallery_pids = _structured_case(60, 300, seed=5)
    transposed_view = similarity.T.contiguous().T  # same values, column-major strides
    _assert_metrics_equal(
        rank_metrics(transposed_view, query_pids, gallery_pids, chunk_size=16),
        _reference(similarity, query_pids, gallery_pids, (1, 5, 10)),
    )


def test_bench_reference_rank_matches_plain_reference():
    similarity, query_pids, gallery_pids = _structured_case(50, 300, seed=6)
    ks = (1, 5, 10, 300)
    _assert_metrics_equal(
        reference_rank(similarity, query_pids, gallery_pids, ks), _reference(similarity, query_pids, gallery_pids, ks)
    )


@pytest.mark.parametrize("budget", [300_000, 1_000_000, 3_000_000])
def test_memory_budget_sets_chunk_rows(monkeypatch, budget):
    similarity, query_pids, gallery_pids = _structured_case(97, 400, seed=7)
    chunk_rows, worker = [], metrics._rank_chunk

    def recording_worker(scores, *args):
        chunk_rows.append(scores.shape[0])
        return worker(scores, *args)

    monkeypatch.setattr(metrics, "_rank_chunk", recording_worker)
    actual = rank_metrics(similarity, query_pids, gallery_pids, memory_budget_bytes=budget)
    row_bytes = 400 * BYTES_PER_ENTRY + (metrics._num_bins(400) + 2) * metrics._BYTES_PER_BIN
    assert rank_chunk_rows(400, budget) == budget // row_bytes
    assert chunk_rows[0] * row_bytes <= budget < (chunk_rows[0] + 1) * row_bytes  # the largest chunk that fits
    assert all(rows <= chunk_rows[0] for rows in chunk_rows) and sum(chunk_rows) == 97
    _assert_metrics_equal(actual, _reference(similarity, query_pids, gallery_pids, (1, 5, 10)))

    chunk_rows.clear()  # without a budget, the device type's default applies
    monkeypatch.setitem(metrics.DEFAULT_MEMORY_BUDGET_BYTES, "cpu", budget)
    rank_metrics(similarity, query_pids, gallery_pids)
    assert chunk_rows[0] == budget // row_bytes

    chunk_rows.clear()  # an explicit chunk size overrides the budget, even one too small for a row
    rank_metrics(similarity, query_pids, gallery_pids, chunk_size=50, memory_budget_bytes=1)
    assert chunk_rows == [50, 47]


def _peak_cpu_bytes(fn) -> int:
    """Peak of live CPU tensor memory allocated while `fn` runs, from the profiler's allocation events."""
    profiler = pytest.importorskip("torch.profiler")
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    allocations = sorted((event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]")
    assert allocations, "the profiler recorded no allocation"
    live = peak = 0
    for _, nbytes in allocations:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("case", "dtype"),
    [
        ("all_tied_one_pid", torch.float64),
        ("all_tied", torch.float16),
        ("random", torch.float32),
        ("normal_one_pid", torch.float32),
        ("normal", torch.bfloat16),
    ],
)
def test_peak_memory_within_budget(device, case, dtype):
    # Worst cases: every item ranked exactly (all tied), every item relevant (one pid), float64 scores.
    num_queries, num_gallery, budget = 60, 1000, 2_000_000
    gen = torch.Generator().manual_seed(8)
    gallery_pids = torch.arange(num_gallery) % (1 if case.endswith("one_pid") else 40)
    query_pids = gallery_pids[torch.randint(0, num_gallery, (num_queries,), generator=gen)].to(device)
    similarity = torch.rand(num_queries, num_gallery, generator=gen)
    if case.startswith("normal"):
        similarity = torch.randn(num_queries, num_gallery, generator=gen)
    if case.startswith("all_tied"):
        similarity.zero_()
    similarity, gallery_pids = similarity.to(device, dtype), gallery_pids.to(device)

    def run():
        rank_metrics(similarity, query_pids, gallery_pids, memory_budget_bytes=budget)

    if device == "cpu":
        peak = _peak_cpu_bytes(run)
    else:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        peak = torch.cuda.max_memory_allocated() - baseline
    assert rank_chunk_rows(num_gallery, budget) < num_queries  # several chunks, so the budget is what bounds memory
    assert 0 < peak <= budget


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_double_precision_inputs(dtype):
    similarity, query_pids, gallery_pids = _random_case(20, 30, 5, 2, seed=3)
    similarity = similarity.to(dtype)
    metrics = rank_metrics(similarity, query_pids, gallery_pids)
    _assert_metrics_equal(metrics, _reference(similarity, query_pids, gallery_pids, (1, 5, 10)))


def test_text_to_image_and_image_to_text():
    gen = torch.Generator().manual_seed(0)
    image_pids = torch.tensor([0, 0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9])
    text_pids = image_pids.repeat_interleave(2)  # two captions per image
    image_feats = torch.nn.functional.normalize(torch.randn(len(image_pids), 16, generator=gen), dim=1)
    text_feats = torch.nn.functional.normalize(
        image_feats.repeat_interleave(2, dim=0) + 0.8 * torch.randn(len(text_pids), 16, generator=gen), dim=1
    )
    sim_t2i = text_feats @ image_feats.T  # (24, 12)
    t2i = rank_metrics(sim_t2i, text_pids, image_pids)
    i2t = rank_metrics(sim_t2i.T, image_pids, text_pids)
    _assert_metrics_equal(t2i, _reference(sim_t2i, text_pids, image_pids, (1, 5, 10)))
    _assert_metrics_equal(i2t, _reference(sim_t2i.T, image_pids, text_pids, (1, 5, 10)))
    id_feats = torch.nn.functional.one_hot(image_pids).float()  # same pid <=> score 1, else 0
    perfect = rank_metrics(id_feats @ id_feats.T, image_pids, image_pids)
    _assert_metrics_equal(perfect, {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 100.0, "mINP": 100.0})
    with pytest.raises(ValueError, match="query_pids must have shape"):
        rank_metrics(sim_t2i.T, text_pids, image_pids)


def test_query_without_relevant_gallery_item_raises():
    similarity = torch.rand(4, 5)
    with pytest.raises(NoRelevantGalleryError, match=r"2 of 4 queries .*indices \[1, 3\], pids \[9, 8\]"):
        rank_metrics(similarity, torch.tensor([0, 9, 1, 8]), torch.tensor([0, 1, 0, 1, 2]), ks=(1,))


@pytest.mark.parametrize(
    ("similarity", "query_pids", "gallery_pids", "kwargs", "message"),
    [
        (torch.rand(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1, 0, 1]), {}, r"ks \[5, 10\] must lie in \[1, 4\]"),
        (torch.rand(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1, 0, 1]), {"ks": (0,)}, r"ks \[0\]"),
        (torch.rand(4), torch.tensor([0]), torch.tensor([0, 1, 0, 1]), {"ks": (1,)}, "non-empty \\(Q, G\\) matrix"),
        (torch.rand(0, 4), torch.tensor([]), torch.tensor([0, 1, 0, 1]), {"ks": (1,)}, "non-empty"),
        (torch.rand(2, 4), torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0, 1]), {"ks": (1,)}, "query_pids"),
        (torch.rand(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1, 0]), {"ks": (1,)}, "gallery_pids"),
        (torch.ones(2, 4, dtype=torch.long), torch.tensor([0, 1]), torch.tensor([0, 1, 0, 1]), {"ks": (1,)}, "float"),
        (torch.rand(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1, 0, 1]), {"ks": (1,), "chunk_size": 0}, "chunk"),
        (
            torch.rand(2, 4),
            torch.tensor([0, 1]),
            torch.tensor([0, 1, 0, 1]),
            {"ks": (1,), "memory_budget_bytes": 1000},
            r"memory_budget_bytes=1000 cannot hold one query row of a 4-item gallery",
        ),
        (
            torch.tensor([[0.1, 0.2], [math.nan, 0.3]]),
            torch.tensor([0, 1]),
            torch.tensor([0, 1]),
            {"ks": (1,)},
            "1 contains",
        ),
    ],
)
def test_invalid_inputs_raise(similarity, query_pids, gallery_pids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        rank_metrics(similarity, query_pids, gallery_pids, **kwargs)


def test_chance_rank1_is_the_mean_share_of_relevant_gallery_items():
    from utils.metrics import chance_rank1

    # Queries of pid 0 have 1 of 5 relevant items, pid 1 has 2 of 5, pid 2 has 1 of 5: mean (1+1+2+1)/4/5.
    assert chance_rank1([0, 0, 1, 2], [0, 1, 1, 3, 2]) == pytest.approx(25.0)
