"""IRRA/CLIP-family losses against pure-Python loop references and hand-computed cases."""

import math

import pytest
import torch

from model.objectives.contrastive import cosine_similarity, identity_mask
from model.objectives.irra import cmpm_loss, id_loss, itc_loss, mlm_loss, sdm_loss, softmax_nitc_loss

PIDS = torch.tensor([0, 1, 1, 2, 0, 3])  # repeated pids: rows with one and with two positives


def _feats(batch: int = 6, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)


def _sim(seed: int = 0) -> torch.Tensor:
    image, text = _feats(seed=seed)
    return cosine_similarity(text, image)


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_norm = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - log_norm for x in row]


def _transpose(matrix: list[list[float]]) -> list[list[float]]:
    return [list(column) for column in zip(*matrix)]


def _normalised_targets(pids_rows: list[int], pids_cols: list[int]) -> list[list[float]]:
    targets = []
    for p in pids_rows:
        row = [1.0 if p == q else 0.0 for q in pids_cols]
        total = sum(row)
        targets.append([x / total if total else 0.0 for x in row])
    return targets


def _ref_soft_ce(logits: list[list[float]], targets: list[list[float]]) -> float:
    total = 0.0
    for row, target in zip(logits, targets):
        total += -sum(y * lp for y, lp in zip(target, _log_softmax(row)))
    return total / len(logits)


def _ref_kl(logits: list[list[float]], targets: list[list[float]], epsilon: float) -> float:
    total = 0.0
    for row, target in zip(logits, targets):
        log_p = _log_softmax(row)
        total += sum(math.exp(lp) * (lp - math.log(y + epsilon)) for lp, y in zip(log_p, target))
    return total / len(logits)


def _ref_nitc(sim: torch.Tensor, pids: torch.Tensor, scale: float, bias: float = 0.0) -> float:
    logits = [[scale * c + bias for c in row] for row in sim.tolist()]
    p = pids.tolist()
    t2i = _ref_soft_ce(logits, _normalised_targets(p, p))
    i2t = _ref_soft_ce(_transpose(logits), _normalised_targets(p, p))
    return (t2i + i2t) / 2


def _ref_sdm(sim: torch.Tensor, pids: torch.Tensor, scale: float, bias: float = 0.0, epsilon: float = 1e-8) -> float:
    logits = [[scale * c + bias for c in row] for row in sim.tolist()]
    targets = _normalised_targets(pids.tolist(), pids.tolist())
    return _ref_kl(logits, targets, epsilon) + _ref_kl(_transpose(logits), targets, epsilon)


def _ref_cmpm(image: torch.Tensor, text: torch.Tensor, pids: torch.Tensor, epsilon: float = 1e-8) -> float:
    x, z = image.tolist(), text.tolist()

    def norm(v: list[float]) -> float:
        return math.sqrt(sum(a * a for a in v))

    def dot(a: list[float], b: list[float]) -> float:
        return sum(p * q for p, q in zip(a, b))

    image_to_text = [[dot(xi, zj) / norm(zj) for zj in z] for xi in x]
    text_to_image = [[dot(zi, xj) / norm(xj) for xj in x] for zi in z]
    targets = _normalised_targets(pids.tolist(), pids.tolist())
    return _ref_kl(image_to_text, targets, epsilon) + _ref_kl(text_to_image, targets, epsilon)


def _ref_ce(logits: list[list[float]], labels: list[int]) -> float:
    return -sum(_log_softmax(row)[y] for row, y in zip(logits, labels)) / len(labels)


def test_softmax_nitc_matches_loop_reference_with_repeated_pids():
    sim = _sim()
    loss = softmax_nitc_loss(sim, identity_mask(PIDS, PIDS), logit_scale=torch.tensor(20.0))
    assert loss.item() == pytest.approx(_ref_nitc(sim, PIDS, 20.0), rel=1e-5)


def test_softmax_nitc_bias_cancels():
    sim, mask = _sim(), identity_mask(PIDS, PIDS)
    with_bias = softmax_nitc_loss(sim, mask, logit_scale=torch.tensor(20.0), logit_bias=torch.tensor(-7.0))
    assert with_bias.item() == pytest.approx(_ref_nitc(sim, PIDS, 20.0, bias=-7.0), rel=1e-5)
    assert with_bias.item() == pytest.approx(softmax_nitc_loss(sim, mask, logit_scale=20.0).item(), rel=1e-5)


def test_softmax_nitc_with_distinct_pids_equals_itc():
    sim, pids = _sim(seed=3), torch.arange(6)
    nitc = softmax_nitc_loss(sim, identity_mask(pids, pids), logit_scale=torch.tensor(30.0))
    assert nitc.item() == pytest.approx(itc_loss(sim, logit_scale=torch.tensor(30.0)).item(), rel=1e-6)


def test_softmax_nitc_soft_targets_replace_pid_targets():
    sim, mask = _sim(), identity_mask(PIDS, PIDS)
    g = torch.Generator().manual_seed(1)
    soft_t2i = torch.softmax(torch.randn(6, 6, generator=g), dim=1)
    soft_i2t = torch.softmax(torch.randn(6, 6, generator=g), dim=1)
    loss = softmax_nitc_loss(sim, mask, logit_scale=10.0, soft_targets_t2i=soft_t2i, soft_targets_i2t=soft_i2t)
    logits = [[10.0 * c for c in row] for row in sim.tolist()]
    expected = (_ref_soft_ce(logits, soft_t2i.tolist()) + _ref_soft_ce(_transpose(logits), soft_i2t.tolist())) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_softmax_nitc_on_rectangular_batches_normalises_each_direction():
    g = torch.Generator().manual_seed(2)
    text_pids, image_pids = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1])
    sim = cosine_similarity(torch.randn(4, 8, generator=g), torch.randn(3, 8, generator=g))
    loss = softmax_nitc_loss(sim, identity_mask(text_pids, image_pids), logit_scale=5.0)
    logits = [[5.0 * c for c in row] for row in sim.tolist()]
    t2i = _ref_soft_ce(logits, _normalised_targets(text_pids.tolist(), image_pids.tolist()))
    i2t = _ref_soft_ce(_transpose(logits), _normalised_targets(image_pids.tolist(), text_pids.tolist()))
    assert loss.item() == pytest.approx((t2i + i2t) / 2, rel=1e-5)


def test_itc_matches_loop_reference_and_ignores_pids():
    sim = _sim(seed=4)
    logits = [[12.0 * c for c in row] for row in sim.tolist()]
    labels = list(range(6))
    expected = (_ref_ce(logits, labels) + _ref_ce(_transpose(logits), labels)) / 2
    assert itc_loss(sim, logit_scale=torch.tensor(12.0)).item() == pytest.approx(expected, rel=1e-5)


def test_itc_rejects_non_square_similarity():
    with pytest.raises(ValueError, match="square"):
        itc_loss(torch.zeros(3, 4), logit_scale=1.0)


def test_sdm_matches_loop_reference_with_repeated_pids():
    sim = _sim(seed=5)
    loss = sdm_loss(sim, identity_mask(PIDS, PIDS), logit_scale=torch.tensor(50.0))
    assert loss.item() == pytest.approx(_ref_sdm(sim, PIDS, 50.0), rel=1e-5)


def test_sdm_hand_case_uniform_similarities():
    # All similarities equal -> p uniform (1/4); pids [0, 0, 1, 1] -> y = 1/2 on two columns, 0 on two.
    pids = torch.tensor([0, 0, 1, 1])
    sim = torch.full((4, 4), 0.3)
    per_row = 0.5 * (math.log(0.25) - math.log(0.5 + 1e-8)) + 0.5 * (math.log(0.25) - math.log(1e-8))
    loss = sdm_loss(sim, identity_mask(pids, pids), logit_scale=10.0)
    assert loss.item() == pytest.approx(2 * per_row, rel=1e-6)


def test_sdm_works_for_sigmoid_backbones_because_the_bias_cancels():
    # A SigLIP-like scale/bias pair: the loss over scale*sim equals the reference over scale*sim + bias.
    sim = _sim(seed=6)
    loss = sdm_loss(sim, identity_mask(PIDS, PIDS), logit_scale=torch.tensor(10.0))
    assert loss.item() == pytest.approx(_ref_sdm(sim, PIDS, 10.0, bias=-10.0), rel=1e-5)


def test_sdm_is_near_zero_when_prediction_matches_targets():
    pids = torch.arange(4)
    sim = torch.eye(4)
    assert sdm_loss(sim, identity_mask(pids, pids), logit_scale=100.0).item() < 1e-6


def test_cmpm_matches_loop_reference_on_raw_features():
    image, text = _feats(seed=7)
    loss = cmpm_loss(3 * image, 0.5 * text, PIDS)
    assert loss.item() == pytest.approx(_ref_cmpm(3 * image, 0.5 * text, PIDS), rel=1e-5)


def test_cmpm_scores_image_against_text_not_image():
    # Two identical texts make every image->text row uniform (p = 1/2), whatever the images are.
    image = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    pids = torch.tensor([0, 1])
    eps = 1e-8
    i2t_row = 0.5 * (math.log(0.5) - math.log(1 + eps)) + 0.5 * (math.log(0.5) - math.log(eps))
    # text->image scores are z_i . x_j / |x_j| = [1, 0] for both texts.
    p0, p1 = math.e / (math.e + 1), 1 / (math.e + 1)
    t2i_row0 = p0 * (math.log(p0) - math.log(1 + eps)) + p1 * (math.log(p1) - math.log(eps))
    t2i_row1 = p0 * (math.log(p0) - math.log(eps)) + p1 * (math.log(p1) - math.log(1 + eps))
    expected = i2t_row + (t2i_row0 + t2i_row1) / 2
    assert cmpm_loss(image, text, pids, epsilon=eps).item() == pytest.approx(expected, rel=1e-6)

    # The seed's image.image^T scores would give a non-uniform first term: a different value.
    image_to_image = [[9.0, 0.0], [0.0, 2.0]]
    targets = [[1.0, 0.0], [0.0, 1.0]]
    seed_value = _ref_kl(image_to_image, targets, eps) + (t2i_row0 + t2i_row1) / 2
    assert abs(seed_value - expected) > 1.0


def test_id_loss_matches_loop_reference():
    g = torch.Generator().manual_seed(8)
    image_logits, text_logits = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    labels = [0, 1, 1, 2, 0, 4]
    expected = (_ref_ce(image_logits.tolist(), labels) + _ref_ce(text_logits.tolist(), labels)) / 2
    loss = id_loss(image_logits.half(), text_logits.half(), torch.tensor(labels))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=2e-3)


def test_mlm_loss_and_accuracy_match_loop_reference():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 4, 7, generator=g)
    labels = torch.tensor([[-100, 3, -100, 5], [1, -100, -100, -100]])
    labels[1, 0] = logits[1, 0].argmax()  # one guaranteed hit
    loss, acc = mlm_loss(logits, labels)
    picked = [(b, i) for b in range(2) for i in range(4) if labels[b, i] != -100]
    expected = -sum(_log_softmax(logits[b, i].tolist())[labels[b, i]] for b, i in picked) / len(picked)
    hits = sum(int(logits[b, i].argmax() == labels[b, i]) for b, i in picked)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert acc.item() == pytest.approx(hits / len(picked))
    assert 1 <= hits


def test_mlm_loss_without_selected_tokens_is_zero_with_a_graph():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss, acc = mlm_loss(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0 and acc.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_are_finite_float32_on_half_precision_inputs(dtype):
    image, text = _feats(seed=10)
    sim, mask = cosine_similarity(text, image), identity_mask(PIDS, PIDS)
    scale = torch.tensor(100.0, dtype=dtype)
    pairs = [
        (softmax_nitc_loss(sim.to(dtype), mask, logit_scale=scale), softmax_nitc_loss(sim, mask, logit_scale=100.0)),
        (itc_loss(sim.to(dtype), logit_scale=scale), itc_loss(sim, logit_scale=100.0)),
        (sdm_loss(sim.to(dtype), mask, logit_scale=scale), sdm_loss(sim, mask, logit_scale=100.0)),
        (cmpm_loss(image.to(dtype), text.to(dtype), PIDS), cmpm_loss(image, text, PIDS)),
        (
            mlm_loss(
                torch.randn(2, 3, 9, generator=torch.Generator().manual_seed(0)).to(dtype) * 50,
                torch.tensor([[1, -100, 2], [0, 8, -100]]),
            )[0],
            None,
        ),
    ]
    for low, full in pairs:
        assert low.dtype == torch.float32 and torch.isfinite(low)
        if full is not None:
            # Half-precision rounding of sim is amplified by the scale of 100; only the order of magnitude is checked.
            assert low.item() == pytest.approx(full.item(), rel=0.1)


def test_gradients_reach_similarities_and_the_learnable_scale():
    sim = _sim(seed=11).requires_grad_()
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    mask = identity_mask(PIDS, PIDS)
    total = softmax_nitc_loss(sim, mask, logit_scale=log_scale.exp()) + sdm_loss(sim, mask, logit_scale=log_scale.exp())
    total.backward()
    assert sim.grad is not None and sim.grad.abs().sum() > 0
    assert log_scale.grad is not None and log_scale.grad != 0
