"""The strategy table: every strategy and auxiliary term trains a step on the tiny model; curriculum; MVS modes."""

import dataclasses

import pytest
import torch
from transformers import AutoConfig

from data.mlm import mask_tokens
from model.backbone import load_backbone
from model.build import build_model
from model.features import TrainFeatures
from model.objective import Objective, unknown_inputs
from model.objectives import LOSSES, cosine_similarity, identity_mask, sigmoid_nitc_loss
from model.strategies import STRATEGIES, LossSettings, StepContext
from model.tbps import TBPS, HeadSpec

SEED_STRATEGY_TERMS = {
    "baseline": {"nitc_loss"},
    "auxiliary": {"nitc_loss", "circle_loss"},
    "intrinsic": {"nitc_loss"},
    "circle_only": {"circle_loss"},
    "auxiliary_cross": {"nitc_loss", "circle_loss"},
}


def _batch(vocab: int, size=(32, 16), batch=6, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, 16), generator=g)
    ids[:, -4:] = 1  # </s> padding on the right
    images = lambda: torch.randn(batch, 3, *size, generator=g)  # noqa: E731
    return {
        "images": images(),
        "aug_images": images(),
        "ss_images1": images(),
        "ss_images2": images(),
        "caption_input_ids": ids,
        "pids": torch.tensor([0, 0, 1, 1, 2, 3])[:batch],
    }


def _train_step(checkpoint, settings: LossSettings, num_classes: int = 4) -> dict[str, torch.Tensor]:
    use_sigmoid = AutoConfig.from_pretrained(checkpoint).model_type == "siglip"  # SigLIP's sigmoid, else CLIP
    objective = Objective(dataclasses.replace(settings, cmt_depth=1), use_sigmoid=use_sigmoid)
    model = build_model({"path": checkpoint, "image_size": (32, 16)}, objective, num_classes=num_classes)
    vocab = int(model.backbone.config.text_config.vocab_size)
    assert hasattr(model.backbone, "logit_bias") == use_sigmoid
    batch = _batch(vocab)
    if settings.MLM:
        batch["mlm_input_ids"], batch["mlm_labels"] = mask_tokens(
            batch["caption_input_ids"], mask_token_id=vocab - 1, vocab_size=vocab, special_token_ids=[0, 1, 2]
        )
    feats = model(
        batch,
        aug_view=objective.needs_aug_view,
        ss_views=objective.needs_ss_views,
        raw_features=objective.needs_raw_features,
    )
    terms = objective(feats, StepContext(epoch=3.0))
    total = sum(terms.values())
    total.backward()
    # DDP without find_unused_parameters needs a gradient for every trainable parameter at every step.
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"trainable parameters without a gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(total)
    return terms


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_trains_a_step_with_the_seed_terms(tiny_checkpoint, strategy):
    terms = _train_step(tiny_checkpoint, LossSettings(strategy=strategy))
    assert set(terms) == SEED_STRATEGY_TERMS[strategy]


def test_strategy_table_matches_the_seed():
    assert set(STRATEGIES) == set(SEED_STRATEGY_TERMS)


AUXILIARY = {loss.flag: f"{name}_loss" for name, loss in LOSSES.items() if loss.flag}


def test_the_registry_holds_the_original_auxiliary_terms():
    assert AUXILIARY == {
        "SS": "ss_loss",
        "CITC": "citc_loss",
        "RITC": "ritc_loss",
        "ITC": "itc_loss",
        "SDM": "sdm_loss",
        "CMPM": "cmpm_loss",
        "ID": "id_loss",
        "MLM": "mlm_loss",
    }
    assert unknown_inputs() == []


@pytest.mark.parametrize("flag", sorted(AUXILIARY))
def test_every_auxiliary_term_trains_a_step(tiny_checkpoint, flag):
    terms = _train_step(tiny_checkpoint, LossSettings(**{flag: True}))
    assert AUXILIARY[flag] in terms and "nitc_loss" in terms


def test_softmax_backbone_trains_every_strategy_it_supports(tiny_clip_checkpoint):
    for strategy in ("baseline", "auxiliary", "circle_only", "auxiliary_cross"):
        _train_step(tiny_clip_checkpoint, LossSettings(strategy=strategy, SDM=True, RITC=True))
    assert "SigLIP" in " ".join(LossSettings(strategy="intrinsic").problems(use_sigmoid=False))


def _feats(seed=0, batch=6, dim=8) -> TrainFeatures:
    g = torch.Generator().manual_seed(seed)
    unit = lambda: torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1)  # noqa: E731
    return TrainFeatures(
        image_feats=unit(),
        text_feats=unit(),
        aug_image_feats=unit(),
        pids=torch.tensor([0, 0, 1, 1, 2, 3]),
        logit_scale=torch.tensor(10.0),
        logit_bias=torch.tensor(-3.0),
    )


def test_mvs_averages_over_the_augmented_view_and_seed_mode_reproduces_the_no_op():
    feats = _feats()
    mask = identity_mask(feats.pids, feats.pids)

    def nitc(image):
        return sigmoid_nitc_loss(
            cosine_similarity(feats.text_feats, image), mask, logit_scale=feats.logit_scale, logit_bias=feats.logit_bias
        )

    augmented = Objective(LossSettings(MVS=True))(feats)["nitc_loss"]
    torch.testing.assert_close(augmented, (nitc(feats.image_feats) + nitc(feats.aug_image_feats)) / 2)
    seed = Objective(LossSettings(MVS=True, nitc_mvs_mode="seed"))(feats)["nitc_loss"]
    torch.testing.assert_close(seed, nitc(feats.image_feats))


def test_circle_curriculum_is_zero_then_ramps_then_constant():
    settings = LossSettings(CIR=True, circle_loss_weight=0.1, circle_start_epoch=6, circle_ramp_epochs=15)
    assert [settings.circle_weight(e) for e in (0, 5.9)] == [0.0, 0.0]
    assert settings.circle_weight(6) == pytest.approx(0.1 / 15)
    assert settings.circle_weight(13.5) == pytest.approx(0.1 * 8 / 15)
    assert settings.circle_weight(20) == pytest.approx(0.1) and settings.circle_weight(59) == pytest.approx(0.1)
    terms = Objective(dataclasses.replace(settings, strategy="auxiliary_cross"))(_feats(), StepContext(epoch=2))
    assert terms["circle_loss"].item() == 0.0


def test_soft_labels_ramp_over_the_first_epoch():
    settings = LossSettings(softlabel_ratio=0.5)
    assert [settings.softlabel_alpha(e) for e in (0.0, 0.5, 1.0, 7.0)] == [0.0, 0.25, 0.5, 0.5]
    feats = _feats()
    hard = Objective(LossSettings())(feats)["nitc_loss"]
    soft = Objective(settings)(feats, StepContext(epoch=2.0))["nitc_loss"]
    at_start = Objective(settings)(feats, StepContext(epoch=0.0))["nitc_loss"]
    torch.testing.assert_close(at_start, hard)
    assert not torch.allclose(soft, hard)


def test_unknown_loss_key_and_bad_choices_are_reported():
    with pytest.raises(ValueError, match="Unknown loss setting"):
        LossSettings.from_mapping({"strategy": "baseline", "CIRCLE": True})
    problems = LossSettings(circle_reduction="mean", nitc_mvs_mode="x", NITC=False).problems()
    assert len(problems) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_term_is_finite_float32_under_autocast_with_gamma_256(tiny_checkpoint, dtype):
    """AMP returns fp16/bf16 from every matmul; the objective must still compute its losses in float32."""
    settings = LossSettings(
        strategy="auxiliary_cross",
        CIR=True,
        circle_gamma=256.0,
        SS=True,
        CITC=True,
        RITC=True,
        SDM=True,
        ITC=True,
        CMPM=True,
    )
    backbone = load_backbone(tiny_checkpoint, image_size=(32, 16))
    model = TBPS(backbone, HeadSpec(simclr=True))
    objective = Objective(settings)
    with torch.autocast("cpu", dtype=dtype):
        feats = model(
            _batch(int(backbone.config.text_config.vocab_size)), aug_view=True, ss_views=True, raw_features=True
        )
        terms = objective(feats, StepContext(epoch=1.0))
    for name, value in terms.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    sum(terms.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
