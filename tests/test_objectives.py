"""Losses against slow loop references and against transformers' own SigLIP loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import SiglipConfig, SiglipModel

from model.objectives import (
    LOSSES,
    cosine_similarity,
    cyclic_itc_loss,
    identity_mask,
    reverse_itc_loss,
    sigmoid_nitc_loss,
    simclr_loss,
)


def _feats(batch: int = 8, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_nitc_equals_transformers_siglip_loss_when_pids_are_distinct():
    config = SiglipConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
        ),
        vision_config=dict(
            image_size=16,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
    )
    torch.manual_seed(0)
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(7.0))
        model.logit_bias.fill_(-3.0)
    input_ids = torch.randint(0, 64, (6, 8))
    pixels = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        reference = model(input_ids=input_ids, pixel_values=pixels, return_loss=True).loss
        text = model.get_text_features(input_ids=input_ids).pooler_output
        image = model.get_image_features(pixel_values=pixels).pooler_output
    ours = sigmoid_nitc_loss(
        cosine_similarity(text, image),
        identity_mask(torch.arange(6), torch.arange(6)),
        logit_scale=model.logit_scale.exp(),
        logit_bias=model.logit_bias,
    )
    torch.testing.assert_close(ours, reference)


def test_nitc_matches_loop_reference_with_shared_pids():
    text, image = _feats()
    pids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    expected = 0.0
    for i in range(8):
        for j in range(8):
            z = 1.0 if pids[i] == pids[j] else -1.0
            expected -= _log_sigmoid(z * (10.0 * _cos(text[i].tolist(), image[j].tolist()) - 5.0))
    expected /= 8
    sim = cosine_similarity(text, image)
    ours = sigmoid_nitc_loss(sim, identity_mask(pids, pids), logit_scale=scale, logit_bias=bias)
    assert ours.item() == pytest.approx(expected, rel=1e-5)
    # Symmetric: the image->text direction gives the same value.
    transposed = sigmoid_nitc_loss(sim.T, identity_mask(pids, pids).T, logit_scale=scale, logit_bias=bias)
    torch.testing.assert_close(ours, transposed)


def test_simclr_matches_loop_reference():
    a, b = _feats(batch=5)
    tau = 0.1
    a_list = [F.normalize(x, dim=0).tolist() for x in a]
    b_list = [F.normalize(x, dim=0).tolist() for x in b]

    def anchor_loss(anchors, others):
        total = 0.0
        for i, anchor in enumerate(anchors):
            logits = [sum(p * q for p, q in zip(anchor, o)) / tau for o in others]
            logits += [sum(p * q for p, q in zip(anchor, o)) / tau for k, o in enumerate(anchors) if k != i]
            total += math.log(sum(math.exp(x) for x in logits)) - logits[i]
        return total / len(anchors)

    expected = (anchor_loss(a_list, b_list) + anchor_loss(b_list, a_list)) / 2
    assert simclr_loss(a, b, temperature=tau).item() == pytest.approx(expected, rel=1e-5)


def test_cyclic_itc_matches_loop_reference():
    image, text = _feats(batch=4)
    v, t = image.tolist(), text.tolist()
    n = 4
    inmodal = sum((_cos(v[i], v[j]) - _cos(t[i], t[j])) ** 2 for i in range(n) for j in range(n)) / n**2
    cross = sum((_cos(v[i], t[j]) - _cos(v[j], t[i])) ** 2 for i in range(n) for j in range(n)) / n**2
    expected = 0.3 * inmodal + 0.2 * cross
    ours = cyclic_itc_loss(image, text, inmodal_weight=0.3, intermodal_weight=0.2)
    assert ours.item() == pytest.approx(expected, rel=1e-5)


def test_reverse_itc_matches_loop_reference():
    text, image = _feats(batch=5)
    pids = torch.tensor([0, 1, 1, 2, 3])
    scale, eps = 5.0, 0.01
    sim = cosine_similarity(text, image).tolist()

    def direction(matrix):
        total = 0.0
        for i, row in enumerate(matrix):
            positives = [1.0 if pids[i] == pids[j] else 0.0 for j in range(5)]
            target = [p / sum(positives) for p in positives]
            smoothed = [(x + eps) / (1 + eps * 5) for x in target]
            z = sum(math.exp(scale * s) for s in row)
            probs = [math.exp(scale * s) / z for s in row]
            total += sum(p * (math.log(p) - math.log(q)) for p, q in zip(probs, smoothed))
        return total / len(matrix)

    transposed = [list(col) for col in zip(*sim)]
    expected = (direction(sim) + direction(transposed)) / 2
    ours = reverse_itc_loss(torch.tensor(sim), identity_mask(pids, pids), logit_scale=torch.tensor(scale), eps=eps)
    assert ours.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_are_finite_float32_scalars_under_low_precision(dtype):
    text, image = _feats()
    text, image = text.to(dtype).requires_grad_(), image.to(dtype).requires_grad_()
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    mask = identity_mask(pids, pids)
    sim = cosine_similarity(text, image)
    values = [
        sigmoid_nitc_loss(sim, mask, logit_scale=torch.tensor(100.0), logit_bias=torch.tensor(-10.0)),
        simclr_loss(text, image),
        cyclic_itc_loss(image, text),
        reverse_itc_loss(sim, mask, logit_scale=torch.tensor(100.0)),
    ]
    for value in values:
        assert value.dtype == torch.float32 and value.ndim == 0 and torch.isfinite(value)
    sum(values).backward()
    assert torch.isfinite(text.grad.float()).all() and torch.isfinite(image.grad.float()).all()


def test_registry_covers_the_seed_loss_menu():
    seed_menu = {
        "nitc",
        "ss",
        "citc",
        "ritc",
        "itc",
        "sdm",
        "cmpm",
        "id",
        "mlm",
        "circle_in_modal",
        "circle_cross_modal",
        "intrinsic",
    }
    assert seed_menu <= set(LOSSES)
    assert all(callable(fn) and fn.__doc__ and "Shapes" in fn.__doc__ for fn in LOSSES.values())


def test_soft_targets_equal_to_the_hard_mask_leave_nitc_unchanged_and_mix_in_probability_space():
    text, image = _feats()
    pids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    mask = identity_mask(pids, pids)
    sim = cosine_similarity(text, image)
    kwargs = dict(logit_scale=torch.tensor(10.0), logit_bias=torch.tensor(-5.0))
    hard = sigmoid_nitc_loss(sim, mask, **kwargs)
    torch.testing.assert_close(sigmoid_nitc_loss(sim, mask, soft_targets=mask.float(), **kwargs), hard)
    targets = torch.full((8, 8), 0.3)
    expected = 0.0
    for i in range(8):
        for j in range(8):
            logit = 10.0 * sim[i, j].item() - 5.0
            expected -= 0.3 * _log_sigmoid(logit) + 0.7 * _log_sigmoid(-logit)
    soft = sigmoid_nitc_loss(sim, mask, soft_targets=targets, **kwargs)
    assert soft.item() == pytest.approx(expected / 8, rel=1e-5)
