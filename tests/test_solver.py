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
    "backbone": {"lr": 1e-4, "weight_decay": 0.05, "weight_decay_bias": 0.0, "start_lr": 1e-6, "end_lr": 1e-5},
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
