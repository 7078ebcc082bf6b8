"""Parameter groups and learning-rate schedules."""

import math

import pytest
import torch
from torch import nn

from solver.build import build_optimizer, optimizer_problems, param_groups
from solver.lr_scheduler import DECAYS, build_scheduler, lr_at

GROUPS = {
    "default": {
        "lr": 1e-3,
        "weight_decay": 0.01,
        "weight_decay_bias": 0.0,
        "betas": [0.9, 0.98],
        "eps": 1e-8,
        "start_lr": 1e-5,
        "end_lr": 1e-4,
    },
    "backbone": {"lr_factor": 0.1, "weight_decay": 0.05},  # lr 1e-4, start 1e-6, end 1e-5
}


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_split_decay_and_skip_frozen():
    model = _Toy()
    groups = {g["name"]: g for g in param_groups(model, GROUPS)}
    assert set(groups) == {"backbone", "backbone/no_decay", "default", "default/no_decay"}
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(groups["backbone"]["params"]) == {id(model.backbone[0].weight)}
    assert ids(groups["backbone/no_decay"]["params"]) == ids(
        [model.backbone[0].bias, model.backbone[1].weight, model.backbone[1].bias]
    )
    assert groups["backbone/no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 0.05
    frozen = ids(model.frozen.parameters())
    assert not any(frozen & ids(g["params"]) for g in groups.values())


def test_build_optimizer_rejects_unknown_type_and_missing_default():
    assert "valid" in optimizer_problems({"type": "torch.optim.Nope", "param_groups": GROUPS})[0]
    assert optimizer_problems({"type": "torch.optim.AdamW", "param_groups": {"x": {}}})
    optimizer = build_optimizer({"type": "torch.optim.AdamW", "param_groups": GROUPS}, _Toy())
    assert isinstance(optimizer, torch.optim.AdamW)


def test_warmup_then_cosine_hits_its_key_points():
    kwargs = dict(base_lr=1e-3, start_lr=1e-5, end_lr=1e-4, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kwargs) == pytest.approx(1e-5)
    assert lr_at(5, **kwargs) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(10, **kwargs) == pytest.approx(1e-3)
    assert lr_at(60, **kwargs) == pytest.approx(1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kwargs) == pytest.approx(1e-4)


@pytest.mark.parametrize("mode", sorted(DECAYS))
def test_every_mode_starts_at_the_peak_after_warmup(mode):
    assert lr_at(10, base_lr=1e-3, start_lr=0.0, end_lr=1e-5, warmup_steps=10, total_steps=100, mode=mode) == (
        pytest.approx(1e-3)
    )


def test_scheduler_steps_each_group_on_its_own_schedule():
    model = _Toy()
    optimizer = build_optimizer({"type": "torch.optim.AdamW", "param_groups": GROUPS}, model)
    scheduler = build_scheduler(optimizer, {"mode": "cosine", "warmup_fraction": 0.1}, total_steps=100)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["default"] == pytest.approx(1e-5) and lrs["backbone"] == pytest.approx(1e-6)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["default"] == pytest.approx(1e-3) and lrs["backbone"] == pytest.approx(1e-4)


# ---------------------------------------------------------------- the original project's groups and schedules
# Expected values derived by hand from the original project's optimizer configs and schedule definition (heads at a
# constant 5x the backbone's rate: lr 5e-5, start 5e-6, end 2.5e-5; cosine after a linear warmup of 20 % of the
# steps), not from this code.

#: TBPS parameter name -> (group, lr, start_lr, end_lr, betas, weight_decay) under optimizer=tbps_clip.
SEED_TBPS_CLIP_GROUPS = {
    "backbone.text_model.embeddings.token_embedding.weight": ("backbone", 1e-5, 1e-6, 5e-6, (0.9, 0.95), 0.0),
    "simclr_mlp.0.weight": ("simclr", 5e-5, 5e-6, 2.5e-5, (0.9, 0.98), 0.2),
    "classifier.fc.weight": ("classifier", 5e-5, 5e-6, 2.5e-5, (0.9, 0.98), 0.2),
    "mlm_head.cross_attn.in_proj_weight": ("cross", 5e-5, 5e-6, 2.5e-5, (0.9, 0.98), 0.2),
    "mlm_head.cross_modal_transformer.layers.0.linear1.weight": ("cross", 5e-5, 5e-6, 2.5e-5, (0.9, 0.98), 0.2),
    "mlm_head.ln_post.weight": ("default/no_decay", 1e-5, 1e-6, 5e-6, (0.9, 0.95), 0.0),
    "mlm_head.mlm_head.0.weight": ("default", 1e-5, 1e-6, 5e-6, (0.9, 0.95), 0.0),
}


def _tbps_with_every_head(checkpoint):
    from model.backbone import load_backbone
    from model.tbps import TBPS, HeadSpec

    backbone = load_backbone(checkpoint, image_size=(32, 16))
    return TBPS(backbone, HeadSpec(simclr=True, num_classes=4, mlm_depth=1))


def _group_of(optimizer, parameter):
    return next(group for group in optimizer.param_groups if any(p is parameter for p in group["params"]))


def test_heads_follow_the_original_projects_groups_and_rates(tiny_checkpoint):
    from tests.conftest import compose_config

    model = _tbps_with_every_head(tiny_checkpoint)
    cfg = compose_config("m_siglip", ["optimizer=tbps_clip"])
    optimizer = build_optimizer(cfg.optimizer, model)
    named = dict(model.named_parameters())
    for name, (group, lr, start, end, betas, decay) in SEED_TBPS_CLIP_GROUPS.items():
        settings = _group_of(optimizer, named[name])
        assert settings["name"] == group, name
        assert (settings["lr"], settings["start_lr"], settings["end_lr"]) == pytest.approx((lr, start, end)), name
        assert tuple(settings["betas"]) == betas and settings["weight_decay"] == decay, name


def test_the_default_learning_rate_override_moves_every_group_and_keeps_the_ratios(tiny_checkpoint):
    from tests.conftest import compose_config

    model = _tbps_with_every_head(tiny_checkpoint)
    cfg = compose_config("m_siglip", ["optimizer=tbps_clip", "optimizer.param_groups.default.lr=2e-5"])
    optimizer = build_optimizer(cfg.optimizer, model)
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates["backbone"] == pytest.approx(2e-5) and rates["simclr"] == pytest.approx(1e-4)
    assert rates["cross"] == pytest.approx(1e-4) and rates["default"] == pytest.approx(2e-5)


def test_a_fixed_rate_in_a_named_group_is_refused_with_the_keys_that_work():
    from tests.conftest import compose_config

    cfg = compose_config("m_siglip", ["optimizer=tbps_clip", "+optimizer.param_groups.simclr.lr=1e-3"])
    (problem,) = optimizer_problems(cfg.optimizer)
    assert "optimizer.param_groups.simclr.lr_factor" in problem and "optimizer.param_groups.default.lr" in problem


def test_cir_test_gives_the_simclr_head_the_original_betas(tiny_checkpoint):
    from tests.conftest import compose_config

    model = _tbps_with_every_head(tiny_checkpoint)
    optimizer = build_optimizer(compose_config("cir_msiglip").optimizer, model)
    simclr = _group_of(optimizer, model.simclr_mlp[0].weight)
    assert simclr["betas"] == (0.9, 0.999) and simclr["weight_decay"] == 0.05 and simclr["lr"] == pytest.approx(1e-4)
    classifier = _group_of(optimizer, model.classifier.fc.weight)  # no classifier group: default's settings
    assert classifier["name"] == "default" and classifier["weight_decay"] == 0.01


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        ("backbone", [1e-6, 5.5e-6, 1e-5, 7.5e-6, 5.0019274094e-6]),
        ("simclr", [5e-6, 2.75e-5, 5e-5, 3.75e-5, 2.5009637047e-5]),
    ],
)
def test_cosine_schedule_of_a_100_step_run_at_the_original_key_points(tiny_checkpoint, group, expected):
    from tests.conftest import compose_config

    model = _tbps_with_every_head(tiny_checkpoint)
    cfg = compose_config("m_siglip", ["optimizer=tbps_clip"])
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps=100)
    seen = {}
    for step in range(100):
        seen[step] = next(g["lr"] for g in optimizer.param_groups if g["name"] == group)
        optimizer.step()
        scheduler.step()
    assert [seen[step] for step in (0, 10, 20, 60, 99)] == pytest.approx(expected, rel=1e-6)


def test_seed_decay_makes_linear_decay_to_zero_whatever_the_end_rate():
    kwargs = dict(base_lr=1e-5, start_lr=1e-6, end_lr=5e-6, warmup_steps=20, total_steps=100, mode="linear")
    seed = [lr_at(step, **kwargs, options={"seed_decay": True}) for step in (20, 60, 99)]
    assert seed == pytest.approx([1e-5, 5e-6, 1.25e-7])  # lr0 * (1 - r), r = (t - 20) / 80
    assert lr_at(99, **kwargs) == pytest.approx(1e-5 + (5e-6 - 1e-5) * 79 / 80)  # towards end_lr


def test_warmup_in_epochs_lasts_that_many_epochs_of_optimizer_steps_whatever_the_run_length():
    # IRRA warms up for 5 epochs: with 10 optimizer steps per epoch the peak comes at step 50, in a 60-epoch run
    # (600 steps) as in a 30-epoch one (300 steps); a fraction of the run would move it.
    for total in (600, 300):
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
        optimizer.param_groups[0].update(start_lr=0.0, end_lr=0.0)
        scheduler = build_scheduler(optimizer, {"warmup_epochs": 5}, total_steps=total, steps_per_epoch=10)
        lrs = []
        for _ in range(60):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert lrs[0] == 0.0 and lrs[25] == pytest.approx(0.5e-3) and lrs[50] == pytest.approx(1e-3)
        assert lrs[51] < 1e-3


def test_warmup_settings_that_contradict_each_other_or_the_run_are_refused():
    from config_schema import register_schema
    from tests.conftest import compose_config
    from trainer import validate_config
    from utils.config import ConfigError

    register_schema()
    with pytest.raises(ConfigError, match=r"warmup_epochs=5(\.0)? and scheduler.warmup_fraction=0.2 both set"):
        validate_config(compose_config("demo", ["scheduler=irra", "scheduler.warmup_fraction=0.2"]))
    with pytest.raises(ConfigError, match=r"warmup_epochs=5(\.0)? is not shorter than trainer.max_epochs=5"):
        validate_config(compose_config("demo", ["scheduler=irra", "trainer.max_epochs=5"]))
    with pytest.raises(ConfigError, match=r"warmup_epochs must be >= 0"):
        validate_config(compose_config("demo", ["scheduler=irra", "scheduler.warmup_epochs=-1"]))
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ConfigError, match=r"warmup_epochs=3 \(30 optimizer steps\) is not shorter than the whole run"):
        build_scheduler(optimizer, {"warmup_epochs": 3}, total_steps=30, steps_per_epoch=10)  # max_steps ends it


def test_a_training_run_warms_up_for_whole_epochs_of_its_optimizer_steps(demo_root, tmp_path):
    # 3 batches per epoch with accumulation 2: Lightning steps after batch 2 and after the epoch's last batch, so an
    # epoch is 2 optimizer steps; 2 warmup epochs end at step 4 of the 8 of 4 epochs.
    from lightning.pytorch.callbacks import Callback

    from tests.conftest import compose_config, demo_overrides
    from trainer import train

    class _Rates(Callback):
        def __init__(self):
            self.rates = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            group = trainer.optimizers[0].param_groups[0]
            self.rates[trainer.global_step] = (group["lr"], group["initial_lr"], group.get("start_lr", 0.0))

    rates = _Rates()
    overrides = (
        "scheduler=irra",
        "scheduler.warmup_epochs=2",
        "trainer.max_epochs=4",
        "+trainer.limit_train_batches=3",
        "++trainer.accumulate_grad_batches=2",
        "trainer.limit_val_batches=0",
        "+trainer.limit_test_batches=0",
    )
    train(compose_config("demo", demo_overrides(demo_root, *overrides)), tmp_path, callbacks=[rates])
    assert sorted(rates.rates) == list(range(8))
    lr, peak, start = rates.rates[2]
    assert lr == pytest.approx(start + (peak - start) * 2 / 4)  # halfway through the warmup
    assert rates.rates[4][0] == pytest.approx(peak) and rates.rates[5][0] < peak
