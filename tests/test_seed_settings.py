"""Regression tests for the defects found at the seed's settings, one block per defect.

Every expected number is a literal derived independently of this code base from the published definitions and the
installed torch / torchvision / Lightning (an independent derivation; each literal names the definition it comes
from). None is computed by the code under test.

 1. temperature cap: value min(e^p, 100), gradient e^p (straight-through), also through the N-ITC loss
 2. random resized crops at the real size 384x128 (and SimCLR's 0.2-1 crop): the aspect range is relative
 3. soft-label teacher: a constant, no gradient through the temperature
 4. CMPM projects the raw (unnormalised) features
 5. curriculum epoch under gradient accumulation follows Lightning's real epochs
 6. identity sampler coverage ("chunks" and "all") and `dataset.sampler_coverage`
 7. the strategy alone switches its terms on; contradictory overrides are refused with the fix
 8. logit scale / bias that no loss reads are frozen
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

from data.samplers import IdentitySampler
from data.transforms import build_augmentation, build_simclr_transform
from lightning_models import TBPSLitModule
from model.backbone import load_backbone, needs_per_call_interpolation
from model.features import TrainFeatures
from model.objective import Objective
from model.objectives import cmpm_loss
from model.strategies import LossSettings, StepContext
from model.tbps import TBPS, HeadSpec
from tests.conftest import compose_config, demo_overrides
from utils.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _tiny_model(checkpoint: Path) -> TBPS:
    backbone = load_backbone(checkpoint, image_size=(32, 16))
    return TBPS(backbone, HeadSpec(), interpolate_pos_encoding=needs_per_call_interpolation(backbone, (32, 16)))


def _tiny_batch(model: TBPS, batch: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vocab = int(model.backbone.config.text_config.vocab_size)
    ids = torch.randint(3, vocab, (batch, 16), generator=g)
    ids[:, -4:] = 1
    return {
        "images": torch.randn(batch, 3, 32, 16, generator=g),
        "aug_images": torch.randn(batch, 3, 32, 16, generator=g),
        "caption_input_ids": ids,
        "pids": torch.tensor([0, 0, 1, 1, 2, 3])[:batch],
    }


# ---------------------------------------------------------------- 1. temperature: straight-through cap

# (p, value min(e^p, 100), d value / d p = e^p): derivations/README.md part a, "formula-level straight-through" table
# (float64).
TEMPERATURES = [
    (4.0, 54.598150033144236, 54.598150033144236),
    (4.6052, 100.0, 100.00298144563507),
    (4.7215, 100.0, 112.33663129921345),
]


@pytest.mark.parametrize(("p", "value", "gradient"), TEMPERATURES)
def test_1_temperature_is_capped_in_value_but_keeps_the_gradient_of_exp(tiny_checkpoint, p, value, gradient):
    model = _tiny_model(tiny_checkpoint)
    with torch.no_grad():
        model.backbone.logit_scale.fill_(p)
    temperature = model.logit_scale
    assert temperature.item() == pytest.approx(value, rel=1e-6)
    temperature.backward()
    # Clamping p (or exp(p)) before use would give 0 here above log 100 = 4.60517 (derivations/README.md part a, last
    # column).
    assert model.backbone.logit_scale.grad.item() == pytest.approx(gradient, rel=1e-5)


def test_1_nitc_training_loss_reaches_the_temperature_above_the_cap(tiny_checkpoint):
    model = _tiny_model(tiny_checkpoint)
    with torch.no_grad():
        model.backbone.logit_scale.fill_(4.7215)  # SigLIP's pre-trained value, above the cap
    objective = Objective(LossSettings())  # sigmoid N-ITC (+ MVS), the baseline strategy
    feats = model(_tiny_batch(model), aug_view=objective.needs_aug_view)
    # derivations/README.md part a: value capped at 100
    assert feats.logit_scale.item() == pytest.approx(100.0, rel=1e-6)
    sum(objective(feats, StepContext(epoch=1.0)).values()).backward()
    grad = model.backbone.logit_scale.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().item() > 0


# ---------------------------------------------------------------- 2. random resized crops at 384x128


def _windows(crop, height: int, width: int, draws: int = 300) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of `draws` crops of one image, after torch.manual_seed(0)."""
    image = torch.zeros(3, height, width)
    torch.manual_seed(0)
    windows = []
    for _ in range(draws):
        params = crop.make_params([image])
        windows.append((params["top"], params["left"], params["height"], params["width"]))
    return windows


def _assert_windows_follow_the_relative_ratio(windows, height, width, scale):
    """w/h in [1/4, 4/9] (3/4..4/3 of the image's 1/3) and area in `scale` of the image's, up to the integer rounding
    of w and h (one pixel each), or the whole image (the fallback).
    """
    for top, left, h, w in windows:
        assert 0 <= top <= height - h and 0 <= left <= width - w, (top, left, h, w)
        if (h, w) == (height, width):
            continue
        rounding = 1 / (w - 0.5) + 1 / (h - 0.5)  # relative error of w/h (and of w*h) from rounding each side
        low_ratio, high_ratio = 0.75 / 3, 4 / 3 / 3
        assert low_ratio * (1 - rounding) <= w / h <= high_ratio * (1 + rounding), (h, w)
        area = w * h / (height * width)
        assert scale[0] * (1 - rounding) <= area <= scale[1] * (1 + rounding), (h, w)


def test_2_random_resized_crop_varies_at_384x128_and_keeps_person_proportions():
    crop = build_augmentation("random_resized_crop", (384, 128), {"scale": (0.9, 1.0)})
    windows = _windows(crop, 384, 128)
    # derivations/README.md part b, case "384x128, scale (0.9,1), ratio (1/4, 4/9)": 262 distinct windows in 300 draws
    # (seed 0),
    # the whole image 33 times (32 fallbacks + 1 accepted full-size draw), w/h in [0.30366, 0.36994].
    assert len(set(windows)) == 262
    assert Counter(windows)[(0, 0, 384, 128)] == 33
    ratios = [w / h for _, _, h, w in windows]
    assert min(ratios) == pytest.approx(0.30366, abs=1e-5) and max(ratios) == pytest.approx(0.36994, abs=1e-5)
    _assert_windows_follow_the_relative_ratio(windows, 384, 128, (0.9, 1.0))


def test_2_torchvision_absolute_ratio_is_the_defect_one_fixed_stretched_window():
    """The control: torchvision's absolute 3/4..4/3 range cannot fit a 384x128 image at scale 0.9-1."""
    crop = v2.RandomResizedCrop((384, 128), scale=(0.9, 1.0))
    # derivations/README.md part b, case "384x128, scale (0.9,1), ratio (3/4,4/3)": every draw falls back to (106, 0,
    # 171, 128).
    assert set(_windows(crop, 384, 128)) == {(106, 0, 171, 128)}


def test_2_simclr_crop_is_relative_to_the_person_shape():
    crop = build_simclr_transform((384, 128), [0.5] * 3, [0.5] * 3).transforms[0]
    windows = _windows(crop, 300, 100)
    # derivations/README.md part b, case "300x100, scale (0.2,1), ratio (1/4, 4/9)": 300 distinct windows, no fallback,
    # w/h in [0.25000, 0.44162] (the absolute range would give [0.74490, 1.32000]).
    assert len(set(windows)) == 300
    ratios = [w / h for _, _, h, w in windows]
    assert 0.25 - 1e-9 <= min(ratios) and max(ratios) <= 4 / 9 + 1e-9
    assert max(ratios) == pytest.approx(0.44162, abs=1e-5)
    _assert_windows_follow_the_relative_ratio(windows, 300, 100, (0.2, 1.0))


# ---------------------------------------------------------------- 3. soft-label teacher is a constant

# derivations/README.md part g (g_soft.py): torch.manual_seed(1); text then image, normalize(randn(4, 8)) in float64;
# pids [0, 0, 1, 2]; s = e^p, p = log 10; b = -3; alpha = 0.4; loss = mean_i sum_j BCEwithLogits(s c + b, y).
SOFT_LOSS = 6.255918069795  # loss value (the same with and without the stop-gradient)
SOFT_GRAD_TEACHER_CONSTANT = 5.397549868880  # dL/dp, teacher constant (correct)
SOFT_GRAD_THROUGH_TEACHER = 5.044297695416  # dL/dp, gradient flowing through s inside the teacher (the defect)


def test_3_soft_label_teacher_passes_no_gradient_to_the_temperature():
    torch.manual_seed(1)
    text = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1)
    image = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1)
    p = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    feats = TrainFeatures(
        image_feats=image,
        text_feats=text,
        pids=torch.tensor([0, 0, 1, 2]),
        logit_scale=p.exp(),
        logit_bias=torch.tensor(-3.0, dtype=torch.float64),
    )
    objective = Objective(LossSettings(softlabel_ratio=0.4, MVS=False))
    terms = objective(feats, StepContext(epoch=1.0))  # alpha has ramped to the full 0.4 at epoch 1
    assert set(terms) == {"nitc_loss"}
    loss = terms["nitc_loss"]
    assert loss.item() == pytest.approx(SOFT_LOSS, rel=1e-5)
    loss.backward()
    assert p.grad.item() == pytest.approx(SOFT_GRAD_TEACHER_CONSTANT, rel=1e-5)
    assert p.grad.item() != pytest.approx(SOFT_GRAD_THROUGH_TEACHER, rel=1e-3)


# ---------------------------------------------------------------- 4. CMPM on raw features

# derivations/README.md part e (e_cmpm.py): torch.manual_seed(0); x = randn(4, 8) * 3; z = randn(4, 8) * 2 (float64);
# pids [0, 0, 1, 2]; L = L_i2t + L_t2i of Zhang & Lu 2018 with epsilon 1e-8.
CMPM_RAW = 19.110916129169  # on the raw x, z
CMPM_NORMALISED = 20.402373087096  # on x, z L2-normalised first (what a normalising caller would compute)


def _cmpm_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64) * 3
    z = torch.randn(4, 8, dtype=torch.float64) * 2
    return x, z, torch.tensor([0, 0, 1, 2])


def test_4_cmpm_loss_matches_the_paper_on_raw_features():
    x, z, pids = _cmpm_inputs()
    assert cmpm_loss(x, z, pids).item() == pytest.approx(CMPM_RAW, rel=1e-5)  # cast to float32 inside


def test_4_objective_feeds_cmpm_the_raw_features():
    x, z, pids = _cmpm_inputs()
    feats = TrainFeatures(
        image_feats=F.normalize(x, dim=1),
        text_feats=F.normalize(z, dim=1),
        pids=pids,
        logit_scale=torch.tensor(10.0),
        logit_bias=torch.tensor(-3.0),
        raw_image_feats=x,
        raw_text_feats=z,
    )
    objective = Objective(LossSettings(CMPM=True, MVS=False))
    assert objective.needs_raw_features
    value = objective(feats)["cmpm_loss"].item()  # cmpm_loss_weight 1
    assert value == pytest.approx(CMPM_RAW, rel=1e-5)
    assert value != pytest.approx(CMPM_NORMALISED, rel=1e-3)


# ---------------------------------------------------------------- 5. curriculum epoch under gradient accumulation


class _RecordingModule(L.LightningModule):
    """One weight; every training step records (global_step, the objective's fractional epoch)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.records: list[tuple[int, float]] = []

    def training_step(self, batch, batch_idx):
        self.records.append((self.trainer.global_step, self.fractional_epoch(batch_idx)))
        return (self.weight * batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def fractional_epoch(self, batch_idx: int) -> float:
        return TBPSLitModule.fractional_epoch(self, batch_idx)  # the real module's method, on this module


def test_5_circle_curriculum_starts_at_the_real_epoch_under_gradient_accumulation():
    module = _RecordingModule()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        accumulate_grad_batches=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(torch.ones(11, 1)), batch_size=1))
    # derivations/README.md part d: 11 micro-batches with accumulation 4 give 3 optimizer steps per epoch (0-3, 4-7,
    # 8-10).
    assert trainer.global_step == 6
    assert len(module.records) == 22
    settings = LossSettings(strategy="auxiliary_cross", circle_start_epoch=1)
    weights = [settings.circle_weight(epoch) for _, epoch in module.records]
    # derivations/README.md part d: first global micro-batch of real epoch 1 is 11; global_step // floor(11 / 4) gives
    # 8.
    first_on = next(i for i, weight in enumerate(weights) if weight > 0)
    assert first_on == 11
    assert first_on != 8
    assert all(weight > 0 for weight in weights[11:])


# ---------------------------------------------------------------- 6. identity sampler coverage

# derivations/README.md part c: n = [1, 2, 3, 4, 5, 6, 7, 8, 9, 13] samples per identity, K = 4, P = 2 (batch size 8).
IDENTITY_SIZES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 13]
K, BATCH = 4, 8


def _identity_dataset() -> tuple[list[int], list[int]]:
    pids = [pid for pid, n in enumerate(IDENTITY_SIZES) for _ in range(n)]
    return pids, list(range(len(pids)))  # one image per sample


def _sampler(coverage: str) -> IdentitySampler:
    pids, image_ids = _identity_dataset()
    return IdentitySampler(pids, image_ids, batch_size=BATCH, num_instance=K, seed=0, coverage=coverage)


def test_6_chunks_coverage_counts_what_an_epoch_uses_drops_and_repeats():
    sampler = _sampler("chunks")
    order = list(sampler)
    # derivations/README.md part c, "chunks": 7 batches, 56 indices, 50 distinct used, 8 dropped, 6 duplicates.
    assert len(sampler) // BATCH == 7 and len(order) == 56
    coverage = sampler.last_coverage
    assert (coverage.samples, coverage.used, coverage.dropped, coverage.duplicated) == (58, 50, 8, 6)
    assert len(set(order)) == 50


def test_6_chunks_pads_a_small_identity_only_after_all_its_samples():
    pids, _ = _identity_dataset()
    members = defaultdict(list)
    for index, pid in enumerate(pids):
        members[pid].append(index)
    sampler = _sampler("chunks")
    seen_small = set()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        chunks = [order[start : start + K] for start in range(0, len(order), K)]
        for chunk in chunks:
            assert len({pids[i] for i in chunk}) == 1, chunk  # a chunk is one identity
            n = IDENTITY_SIZES[pids[chunk[0]]]
            if n < K:
                seen_small.add(n)
                assert sorted(chunk[:n]) == members[pids[chunk[0]]], chunk  # every sample before any repeat
    assert seen_small == {1, 2, 3}


def test_6_all_coverage_draws_every_sample_every_epoch():
    sampler = _sampler("all")
    # derivations/README.md part c, "all": 5 balanced + 3 extra batches = 8, 64 yielded, 58 distinct, 6 duplicates.
    assert len(sampler) // BATCH == 8
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == 64
        assert set(order) == set(range(58)), epoch
        coverage = sampler.last_coverage
        assert (coverage.samples, coverage.used, coverage.dropped, coverage.duplicated) == (58, 58, 0, 6)


def _coverage_overrides(demo_root: Path, *extra: str) -> list[str]:
    return demo_overrides(
        demo_root, "dataset.sampler=identity", "dataset.num_instance=4", "dataset.batch_size=16", *extra
    )


def test_6_data_module_passes_the_sampler_coverage(demo_root):
    from lightning_data import build_datamodule

    cfg = compose_config("demo", _coverage_overrides(demo_root))
    assert build_datamodule(cfg).train_dataloader().sampler.sampler.coverage == "chunks"  # the default
    with open_dict(cfg):
        cfg.dataset.sampler_coverage = "all"
    sampler = build_datamodule(cfg).train_dataloader().sampler.sampler
    assert sampler.coverage == "all"
    assert set(sampler) == set(range(sampler.num_samples))


def test_6_sampler_coverage_all_composes_from_the_command_line(demo_root):
    from lightning_data import build_datamodule
    from trainer import validate_config

    cfg = compose_config("demo", _coverage_overrides(demo_root, "dataset.sampler_coverage=all"))
    validate_config(cfg)
    assert build_datamodule(cfg).train_dataloader().sampler.sampler.coverage == "all"


# ---------------------------------------------------------------- 7. the strategy alone is enough


def _random_feats(batch: int = 6, dim: int = 8) -> TrainFeatures:
    g = torch.Generator().manual_seed(0)
    unit = lambda: F.normalize(torch.randn(batch, dim, generator=g), dim=-1)  # noqa: E731
    return TrainFeatures(
        image_feats=unit(),
        text_feats=unit(),
        aug_image_feats=unit(),
        pids=torch.tensor([0, 0, 1, 1, 2, 3])[:batch],
        logit_scale=torch.tensor(10.0),
        logit_bias=torch.tensor(-3.0),
    )


def test_7_choosing_auxiliary_cross_trains_its_circle_term(demo_root):
    from trainer import validate_config

    cfg = compose_config("demo", demo_overrides(demo_root, "loss.strategy=auxiliary_cross"))
    validate_config(cfg)
    terms = Objective(LossSettings.from_mapping(cfg.loss))(_random_feats())
    assert {"nitc_loss", "circle_loss"} <= set(terms)
    assert terms["circle_loss"].item() > 0


CONTRADICTIONS = [
    # (overrides, text of the fix the message must name)
    (["loss.strategy=baseline", "loss.CIR=true"], "drop loss.CIR"),
    (["loss.strategy=auxiliary_cross", "loss.CIR=false"], "use loss.strategy=baseline"),
    (["loss.strategy=auxiliary", "loss.circle_loss_weight=0"], "use loss.strategy=baseline"),
    (["loss.strategy=intrinsic", "loss.softlabel_ratio=0.3"], "set loss.softlabel_ratio=0"),
    (["loss.strategy=circle_only", "loss.circle_start_epoch=2"], "set them to 0"),
    (["loss.strategy=intrinsic", "loss.nitc_loss_weight=0"], "set it > 0"),
    (["loss.strategy=baseline", "loss.nitc_loss_weight=0"], "loss.NITC=false"),
]


@pytest.mark.parametrize(("overrides", "fix"), CONTRADICTIONS, ids=[" ".join(case[0]) for case in CONTRADICTIONS])
def test_7_contradictory_strategy_overrides_are_refused_with_the_fix(overrides, fix):
    from trainer import validate_config

    with pytest.raises(ConfigError) as error:
        validate_config(compose_config("demo", overrides))
    message = str(error.value)
    assert fix in message, message
    assert overrides[1].split("=")[0] in message, message  # names the offending key


def _script_override_sets() -> dict[str, list[str]]:
    """Strategy -> the overrides scripts/run_strategies.sh (run_cir_loss.sh / run_cir_full.sh) gives its job."""
    text = (ROOT / "scripts" / "run_strategies.sh").read_text()
    strategies, common = (
        re.search(rf"^{name}=\((.*)\)$", text, flags=re.M).group(1).split() for name in ("strategies", "common")
    )
    return {strategy: [f"loss.strategy={strategy}", *common] for strategy in strategies}


def test_7_seed_script_override_sets_are_the_five_strategies():
    assert set(_script_override_sets()) == {"baseline", "auxiliary", "intrinsic", "circle_only", "auxiliary_cross"}


@pytest.mark.parametrize("tuning", [["lora=cir"], ["backbone.freeze.vision=false", "backbone.freeze.text=false"]])
@pytest.mark.parametrize("strategy", ["baseline", "auxiliary", "intrinsic", "circle_only", "auxiliary_cross"])
def test_7_seed_script_override_sets_validate(strategy, tuning):
    from trainer import validate_config

    overrides = _script_override_sets()[strategy]
    cfg = compose_config("cir_msiglip", [*overrides, *tuning])
    validate_config(cfg)
    assert cfg.loss.strategy == strategy


# ---------------------------------------------------------------- 8. unused logit parameters are frozen


@pytest.mark.parametrize(
    ("overrides", "scale_trainable", "bias_trainable"),
    [
        (["loss.strategy=intrinsic"], False, False),
        (["loss.strategy=circle_only"], False, False),
        (["loss.strategy=baseline"], True, True),
        (["loss.strategy=intrinsic", "loss.ITC=true"], True, False),
    ],
    ids=["intrinsic", "circle_only", "baseline", "intrinsic+ITC"],
)
def test_8_logit_parameters_no_loss_reads_are_frozen(demo_root, overrides, scale_trainable, bias_trainable):
    module = TBPSLitModule(compose_config("demo", demo_overrides(demo_root, *overrides)))
    backbone = module.model.backbone
    assert backbone.logit_scale.requires_grad is scale_trainable
    assert backbone.logit_bias.requires_grad is bias_trainable


# ---------------------------------------------------------------- 9. per-sample randomness, repeats included


def test_9_a_sample_drawn_twice_in_an_epoch_is_augmented_twice(demo_root):
    """An identity with fewer than K samples repeats them inside its chunk: each copy must be a new draw."""
    from lightning_data import build_datamodule

    # K = 8 exceeds the 4 to 6 captions of a demo identity: every chunk is padded with repeats.
    cfg = compose_config("demo", demo_overrides(demo_root, "dataset.num_instance=8", "dataset.batch_size=16"))
    loader = build_datamodule(cfg).train_dataloader()
    dataset = loader.dataset
    index = 0
    first, second = dataset[(3, index, 0)], dataset[(3, index, 1)]
    assert not torch.equal(first["images"], second["images"])
    assert torch.equal(first["images"], dataset[(3, index, 0)]["images"])  # the same key draws the same views
    tags = list(loader.sampler)  # (epoch, index, repeat) in yield order
    drawn = Counter(index for _, index, _ in tags)
    assert any(count > 1 for count in drawn.values())
    # The k-th draw of a sample is tagged k - 1: no two draws of one sample share a seed.
    assert len(set(tags)) == len(tags)
    assert {(index, repeat) for _, index, repeat in tags} == {(i, r) for i, n in drawn.items() for r in range(n)}


def test_9_mlm_masks_depend_on_the_sample_not_on_its_batch(demo_root):
    from lightning_data import build_datamodule, collate_train

    cfg = compose_config("demo", [*_coverage_overrides(demo_root), "loss.MLM=true"])
    datamodule = build_datamodule(cfg)
    dataset, tokenizer = datamodule.train_dataloader().dataset, datamodule.tokenizer
    items = [dataset[(0, index, 0)] for index in range(4)]
    alone = collate_train(items[:1], tokenizer, mlm_probability=0.5)
    together = collate_train(items[2:] + items[:1], tokenizer, mlm_probability=0.5)
    assert torch.equal(alone["mlm_input_ids"][0], together["mlm_input_ids"][2])
    assert torch.equal(alone["mlm_labels"][0], together["mlm_labels"][2])
