"""Circle losses against numeric test vectors computed by hand from the paper's formula, and slow loop references."""

import math

import pytest
import torch

from model.objectives.circle import (
    _pooled_circle,
    circle_logits,
    cross_modal_circle_loss,
    in_modal_circle_loss,
    intrinsic_nitc_loss,
)
from model.objectives.contrastive import cosine_similarity, identity_mask

PIDS = [0, 0, 1, 1, 1, 2, 3, 3]  # pid 2 has no positive in-modal: the per-anchor mean must skip it
REDUCTIONS = ["global", "per_anchor"]

# Hand-computed from the paper's formula: flat s_p, flat s_n, margin, gamma -> batch-global loss.
VECTORS = [
    ([0.8], [0.3], 0.25, 64.0, 0.865893),
    ([0.8, 0.6], [0.3, 0.1, -0.2], 0.25, 64.0, 8.046461),
    ([0.8, 0.6], [0.3, 0.1, -0.2], 0.25, 256.0, 32.000003),
    ([0.8, 0.6], [0.3, 0.1, -0.2], 0.4, 80.0, 0.003765),
]
SINGLE_PAIR_LOSS = VECTORS[0][-1]  # s_p = 0.8, s_n = 0.3, m = 0.25, gamma = 64


# --- slow references -------------------------------------------------------------------------------------------------


def _logsumexp(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _log_sigmoid(x: float) -> float:
    return -_softplus(-x)


def _ref_pooled(sps: list[float], sns: list[float], margin: float, gamma: float) -> float:
    if not sps or not sns:
        return 0.0
    logits_p = [-gamma * max(1 + margin - s, 0.0) * (s - (1 - margin)) for s in sps]
    logits_n = [gamma * max(s + margin, 0.0) * (s - margin) for s in sns]
    return _softplus(_logsumexp(logits_p) + _logsumexp(logits_n))


def _cos_matrix(a: torch.Tensor, b: torch.Tensor) -> list[list[float]]:
    rows, cols = a.double().tolist(), b.double().tolist()
    norm = lambda v: math.sqrt(sum(x * x for x in v))  # noqa: E731
    return [[sum(x * y for x, y in zip(u, v)) / (norm(u) * norm(v)) for v in cols] for u in rows]


def _ref_rows(sim: list[list[float]], is_pos, is_neg, margin: float, gamma: float, reduction: str) -> float:
    """Loop Circle loss over a similarity matrix; is_pos(i, j) / is_neg(i, j) select the pairs."""
    pairs = [(i, j) for i in range(len(sim)) for j in range(len(sim[0]))]
    if reduction == "global":
        sps = [sim[i][j] for i, j in pairs if is_pos(i, j)]
        sns = [sim[i][j] for i, j in pairs if is_neg(i, j)]
        return _ref_pooled(sps, sns, margin, gamma)
    losses = []
    for i in range(len(sim)):
        sps = [sim[i][j] for j in range(len(sim[0])) if is_pos(i, j)]
        sns = [sim[i][j] for j in range(len(sim[0])) if is_neg(i, j)]
        if sps and sns:
            losses.append(_ref_pooled(sps, sns, margin, gamma))
    return sum(losses) / len(losses) if losses else 0.0


def _ref_in_modal(feats, pids, margin, gamma, reduction) -> float:
    sim = _cos_matrix(feats, feats)
    return _ref_rows(
        sim, lambda i, j: i != j and pids[i] == pids[j], lambda i, j: pids[i] != pids[j], margin, gamma, reduction
    )


def _ref_cross_modal(image, text, pids, margin, gamma, reduction) -> float:
    same, other = (lambda i, j: pids[i] == pids[j]), (lambda i, j: pids[i] != pids[j])
    image_to_text = _ref_rows(_cos_matrix(image, text), same, other, margin, gamma, reduction)
    text_to_image = _ref_rows(_cos_matrix(text, image), same, other, margin, gamma, reduction)
    return (image_to_text + text_to_image) / 2


def _ref_intrinsic(sim: list[list[float]], pos: list[list[bool]], margin, gamma, normalization) -> float:
    row_sums = []
    for sim_row, pos_row in zip(sim, pos):
        total = 0.0
        for s, is_pos in zip(sim_row, pos_row):
            if is_pos:
                total -= _log_sigmoid(gamma * max(1 + margin - s, 0.0) * (s - (1 - margin)))
            else:
                total -= _log_sigmoid(-gamma * max(s + margin, 0.0) * (s - margin))
        row_sums.append(total)
    mean_row = sum(row_sums) / len(row_sums)
    return mean_row if normalization == "row" else mean_row / len(sim[0])


def _feats(batch: int = 8, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)


def _close(actual: torch.Tensor, expected: float) -> None:
    assert actual.dtype == torch.float32 and actual.shape == ()
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)


# --- numeric test vectors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sps", "sns", "margin", "gamma", "expected"), VECTORS)
def test_pooled_circle_matches_anchor_vectors(sps, sns, margin, gamma, expected):
    sim = torch.tensor(sps + sns)
    pos = torch.tensor([True] * len(sps) + [False] * len(sns))
    _close(_pooled_circle(sim, pos, ~pos, margin=margin, gamma=gamma), expected)
    assert _ref_pooled(sps, sns, margin, gamma) == pytest.approx(expected, abs=1e-6)


def _unit(*angles: float) -> torch.Tensor:
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles])


def test_cross_modal_realises_single_pair_vector():
    # 2-D unit vectors: cos(image_i, text_i) = 0.8 (matched), cos(image_i, text_j) = 0.3 (i != j).
    a, b = math.acos(0.8), math.acos(0.3)
    image, text, pids = _unit(0.0, a + b), _unit(a, b), torch.tensor([0, 1])
    torch.testing.assert_close(cosine_similarity(image, text), torch.tensor([[0.8, 0.3], [0.3, 0.8]]))
    # Global pools 2 copies of s_p and 2 of s_n: the sum inside the log is 4 times the single-pair one.
    expected_global = math.log1p(4 * math.expm1(SINGLE_PAIR_LOSS))
    _close(cross_modal_circle_loss(image, text, pids, gamma=64.0), expected_global)
    _close(cross_modal_circle_loss(image, text, pids, gamma=64.0, reduction="per_anchor"), SINGLE_PAIR_LOSS)


def test_in_modal_realises_single_pair_vector():
    # x0, x1 (same pid) at cosine 0.8; x2 (other pid) at cosine 0.3 with both.
    half = math.acos(0.8) / 2
    c = 0.3 / math.cos(half)
    feats = torch.tensor(
        [[math.cos(half), math.sin(half), 0.0], [math.cos(half), -math.sin(half), 0.0], [c, 0.0, math.sqrt(1 - c * c)]]
    )
    pids = torch.tensor([0, 0, 1])
    # Ordered pairs: 2 positives at 0.8, 4 negatives at 0.3 -> factor 8 inside the log.
    _close(in_modal_circle_loss(feats, pids), math.log1p(8 * math.expm1(SINGLE_PAIR_LOSS)))
    # Anchors 0 and 1 each see one positive and one negative; anchor 2 has no positive and is skipped.
    _close(in_modal_circle_loss(feats, pids, reduction="per_anchor"), SINGLE_PAIR_LOSS)


# --- loop references -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("margin", "gamma"), [(0.25, 64.0), (0.4, 80.0)])
def test_in_modal_matches_loop_reference(reduction, margin, gamma):
    feats, _ = _feats()
    loss = in_modal_circle_loss(feats, torch.tensor(PIDS), margin=margin, gamma=gamma, reduction=reduction)
    _close(loss, _ref_in_modal(feats, PIDS, margin, gamma, reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("margin", "gamma"), [(0.25, 128.0), (0.4, 80.0)])
def test_cross_modal_matches_loop_reference(reduction, margin, gamma):
    image, text = _feats(seed=1)
    loss = cross_modal_circle_loss(image, text, torch.tensor(PIDS), margin=margin, gamma=gamma, reduction=reduction)
    _close(loss, _ref_cross_modal(image, text, PIDS, margin, gamma, reduction))


def test_cross_modal_per_anchor_averages_both_directions():
    image, text = _feats(seed=2)
    same, other = (lambda i, j: PIDS[i] == PIDS[j]), (lambda i, j: PIDS[i] != PIDS[j])
    one_way = _ref_rows(_cos_matrix(image, text), same, other, 0.25, 128.0, "per_anchor")
    both_ways = cross_modal_circle_loss(image, text, torch.tensor(PIDS), reduction="per_anchor")
    assert abs(both_ways.item() - one_way) > 1e-3
    _close(both_ways, _ref_cross_modal(image, text, PIDS, 0.25, 128.0, "per_anchor"))


@pytest.mark.parametrize("normalization", ["row", "pairs"])
def test_intrinsic_matches_loop_reference(normalization):
    text, image = _feats(batch=6, seed=3)
    image = image[:4]  # non-square: B_t = 6 texts, B_i = 4 images
    text_pids, image_pids = torch.tensor([0, 0, 1, 2, 3, 3]), torch.tensor([0, 1, 2, 2])
    sim, pos = cosine_similarity(text, image), identity_mask(text_pids, image_pids)
    loss = intrinsic_nitc_loss(sim, pos, margin=0.25, gamma=64.0, normalization=normalization)
    _close(loss, _ref_intrinsic(_cos_matrix(text, image), pos.tolist(), 0.25, 64.0, normalization))


def test_intrinsic_pairs_is_row_divided_by_columns():
    text, image = _feats(batch=8, seed=4)
    sim, pos = cosine_similarity(text, image), identity_mask(torch.tensor(PIDS), torch.tensor(PIDS))
    row = intrinsic_nitc_loss(sim, pos, normalization="row")
    torch.testing.assert_close(intrinsic_nitc_loss(sim, pos, normalization="pairs"), row / 8)


def test_circle_logits_formulas_and_detached_weights():
    sim = torch.tensor([0.8, 0.3, -0.5], requires_grad=True)
    logit_p, logit_n = circle_logits(sim, margin=0.25, gamma=64.0)
    torch.testing.assert_close(logit_p.detach(), torch.tensor([-1.44, 64 * 0.95 * 0.45, 64 * 1.75 * 1.25]))
    torch.testing.assert_close(logit_n.detach(), torch.tensor([64 * 1.05 * 0.55, 64 * 0.55 * 0.05, 0.0]))
    # With [.]_+ weights treated as constants, d logit_p / ds = -gamma * alpha_p and d logit_n / ds = gamma * alpha_n.
    (grad_p,) = torch.autograd.grad(logit_p.sum(), sim)
    torch.testing.assert_close(grad_p, torch.tensor([-64 * 0.45, -64 * 0.95, -64 * 1.75]))
    (grad_n,) = torch.autograd.grad(circle_logits(sim, margin=0.25, gamma=64.0)[1].sum(), sim)
    torch.testing.assert_close(grad_n, torch.tensor([64 * 1.05, 64 * 0.55, 0.0]))


# --- pair selection and empty cases ----------------------------------------------------------------------------------


def test_self_pairs_are_never_positives_in_modal():
    feats, _ = _feats()
    distinct = torch.arange(8)
    # Were a feature its own positive (s = 1), every anchor would have a positive and the loss would be > 0.
    for reduction in REDUCTIONS:
        assert in_modal_circle_loss(feats, distinct, reduction=reduction).item() == 0.0


def test_diagonal_is_a_positive_cross_modal():
    image, text = _feats(seed=5)
    sim = _cos_matrix(image, text)
    diagonal = [sim[i][i] for i in range(8)]
    off_diagonal = [sim[i][j] for i in range(8) for j in range(8) if i != j]
    loss = cross_modal_circle_loss(image, text, torch.arange(8))
    assert loss.item() > 0
    _close(loss, _ref_pooled(diagonal, off_diagonal, 0.25, 128.0))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    ("modal", "pids"),
    [("in", torch.arange(8)), ("in", torch.zeros(8, dtype=torch.long)), ("cross", torch.zeros(8, dtype=torch.long))],
    ids=["in-no-positive", "in-no-negative", "cross-no-negative"],
)
def test_no_valid_pair_gives_connected_zero(modal, pids, reduction):
    image, text = (f.requires_grad_() for f in _feats(seed=6))
    if modal == "in":
        loss = in_modal_circle_loss(image, pids, reduction=reduction)
    else:
        loss = cross_modal_circle_loss(image, text, pids, reduction=reduction)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert image.grad is not None and torch.equal(image.grad, torch.zeros_like(image))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_modal_is_symmetric_in_image_and_text(reduction):
    image, text = _feats(seed=7)
    pids = torch.tensor(PIDS)
    forward = cross_modal_circle_loss(image, text, pids, reduction=reduction)
    torch.testing.assert_close(cross_modal_circle_loss(text, image, pids, reduction=reduction), forward)


def test_unknown_options_raise():
    feats, _ = _feats()
    with pytest.raises(ValueError, match="per_anchor"):
        in_modal_circle_loss(feats, torch.tensor(PIDS), reduction="mean")
    with pytest.raises(ValueError, match="pairs"):
        intrinsic_nitc_loss(cosine_similarity(feats, feats), torch.eye(8, dtype=torch.bool), normalization="all")


# --- gradients and numerics ------------------------------------------------------------------------------------------


def test_gradient_mines_hard_pairs():
    # One easy and one hard negative, one easy and one hard positive.
    sim = torch.tensor([0.9, 0.4, 0.5, -0.1], requires_grad=True)
    pos = torch.tensor([True, True, False, False])
    _pooled_circle(sim, pos, ~pos, margin=0.25, gamma=64.0).backward()
    easy_p, hard_p, hard_n, easy_n = sim.grad.tolist()
    assert hard_n > easy_n > 0 and hard_p < easy_p < 0
    sim.grad = None
    intrinsic_nitc_loss(sim.view(1, 4), pos.view(1, 4)).backward()
    easy_p, hard_p, hard_n, easy_n = sim.grad.tolist()
    assert hard_n > easy_n >= 0 and hard_p < easy_p <= 0


def test_single_pair_gradient_uses_detached_weights():
    sim = torch.tensor([0.8, 0.3], requires_grad=True)
    pos = torch.tensor([True, False])
    _pooled_circle(sim, pos, ~pos, margin=0.25, gamma=64.0).backward()
    weight = 1 / (1 + math.exp(-0.32))  # softplus'(logit_p + logit_n)
    torch.testing.assert_close(sim.grad, torch.tensor([-weight * 64 * 0.45, weight * 64 * 0.55]))


def _antipodal_feats(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Rows i and i + 4 are opposite but share a pid: cosine -1 positives give logits near gamma * 2.25 * 1.75.
    half, _ = _feats(batch=4, seed=8)
    return torch.cat([half, -half]).to(dtype).requires_grad_(), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])


def _all_losses(feats: torch.Tensor, pids: torch.Tensor, reduction: str) -> list[torch.Tensor]:
    return [
        in_modal_circle_loss(feats, pids, gamma=256.0, reduction=reduction),
        cross_modal_circle_loss(feats, feats.flip(0), pids.flip(0), gamma=256.0, reduction=reduction),
        intrinsic_nitc_loss(cosine_similarity(feats, feats), identity_mask(pids, pids), gamma=256.0),
    ]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_with_large_gamma_stay_finite(dtype, reduction):
    feats, pids = _antipodal_feats(dtype)
    for loss in _all_losses(feats, pids, reduction):
        assert loss.dtype == torch.float32 and loss.shape == () and torch.isfinite(loss) and loss.item() > 100
        (grad,) = torch.autograd.grad(loss, feats)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bf16_autocast_with_large_gamma_stays_finite(reduction):
    feats, pids = _antipodal_feats(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _all_losses(feats, pids, reduction)
    for loss in losses:
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, feats)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
