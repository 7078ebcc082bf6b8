"""Per-iteration learning-rate schedules with warmup (the original project's schedule, as pure functions).

Each param group warms up linearly from its `start_lr` to its `lr`, then follows the decay `mode` towards its
`end_lr`. The schedule steps once per optimizer step, so gradient accumulation does not stretch it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from utils.config import ConfigError

# progress in [0, 1] after warmup, base lr, end lr, mode options -> lr
Decay = Callable[[float, float, float, Mapping[str, Any]], float]


def _cosine(progress: float, base: float, end: float, _: Mapping[str, Any]) -> float:
    return end + (base - end) * 0.5 * (1 + math.cos(math.pi * progress))


def _linear(progress: float, base: float, end: float, _: Mapping[str, Any]) -> float:
    return base + (end - base) * progress


def _poly(progress: float, base: float, end: float, options: Mapping[str, Any]) -> float:
    return end + (base - end) * (1 - progress) ** options["power"]


def _exp(progress: float, base: float, end: float, options: Mapping[str, Any]) -> float:
    # Geometric interpolation from base to end (end must be > 0 for this mode).
    return base * (max(end, 1e-12) / base) ** progress


def _to_zero(progress: float, base: float, end: float, _: Mapping[str, Any]) -> float:
    return base * (1 - progress)


def _constant(progress: float, base: float, end: float, _: Mapping[str, Any]) -> float:
    return base


def _step(progress: float, base: float, end: float, options: Mapping[str, Any]) -> float:
    milestones: Sequence[float] = options["milestones"]
    return base * options["gamma"] ** sum(progress >= milestone for milestone in milestones)


#: scheduler.seed_decay=true: the original project's `linear` and `exp` modes, both lr * (1 - r) towards 0 whatever
#: end_lr (docs/seed_differences.md).
SEED_DECAYS: dict[str, Decay] = {"linear": _to_zero, "exp": _to_zero}

#: scheduler.mode -> decay after warmup.
DECAYS: dict[str, Decay] = {
    "cosine": _cosine,
    "linear": _linear,
    "poly": _poly,
    "exp": _exp,
    "step": _step,
    "constant": _constant,
}


def lr_at(
    step: int,
    *,
    base_lr: float,
    start_lr: float,
    end_lr: float,
    warmup_steps: int,
    total_steps: int,
    mode: str = "cosine",
    options: Mapping[str, Any] | None = None,
) -> float:
    """Learning rate of one param group at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    options = {**dataclasses.asdict(SchedulerSettings()), **(options or {})}
    decays = {**DECAYS, **SEED_DECAYS} if options["seed_decay"] else DECAYS
    return decays[mode](progress, base_lr, end_lr, options)


@dataclass
class SchedulerSettings:
    """The `scheduler` config group: linear warmup from each group's `start_lr`, then a decay towards `end_lr`."""

    mode: str = "cosine"  # a key of DECAYS
    warmup_fraction: float = 0.0  # of the optimizer steps
    # Or a fixed number of epochs of optimizer steps, whatever trainer.max_epochs is (IRRA's 5); null: warmup_fraction.
    warmup_epochs: float | None = None
    seed_decay: bool = False  # true: linear and exp decay as lr * (1 - progress) towards 0 (the original project's)
    power: float = 0.9  # poly
    gamma: float = 0.1  # step: the factor at each milestone
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of the decay phase

    def problems(self) -> list[str]:
        issues = [] if self.mode in DECAYS else [f"scheduler.mode={self.mode!r} is unknown; valid: {sorted(DECAYS)}."]
        if not 0 <= self.warmup_fraction < 1:
            issues.append(f"scheduler.warmup_fraction must be in [0, 1), got {self.warmup_fraction}.")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            issues.append(f"scheduler.warmup_epochs must be >= 0, got {self.warmup_epochs}.")
        if self.warmup_epochs is not None and self.warmup_fraction:
            issues.append(
                f"scheduler.warmup_epochs={self.warmup_epochs} and scheduler.warmup_fraction={self.warmup_fraction} "
                "both set the warmup: set one, and the other to null (epochs) or 0 (fraction)."
            )
        return issues


def build_scheduler(
    optimizer: Optimizer, scheduler_cfg: Mapping[str, Any], total_steps: int, steps_per_epoch: float | None = None
) -> LambdaLR:
    """LambdaLR applying `lr_at` to every param group (group `lr` is the peak, `start_lr`/`end_lr` its ends).

    `steps_per_epoch` (optimizer steps) is needed when the warmup is given in epochs (`warmup_epochs`).
    """
    settings = {**dataclasses.asdict(SchedulerSettings()), **scheduler_cfg}  # a partial mapping takes the defaults
    warmup_steps = warmup_steps_of(settings, total_steps, steps_per_epoch)
    mode = settings["mode"]
    options = {k: v for k, v in settings.items() if k not in ("mode", "warmup_fraction", "warmup_epochs")}

    def factor_for(group: Mapping[str, Any]) -> Callable[[int], float]:
        base = group["lr"]
        start, end = group.get("start_lr", base), group.get("end_lr", base)
        return lambda step: (
            lr_at(
                step,
                base_lr=base,
                start_lr=start,
                end_lr=end,
                warmup_steps=warmup_steps,
                total_steps=total_steps,
                mode=mode,
                options=options,
            )
            / base
        )

    return LambdaLR(optimizer, [factor_for(group) for group in optimizer.param_groups])


def warmup_steps_of(settings: Mapping[str, Any], total_steps: int, steps_per_epoch: float | None) -> int:
    """Optimizer steps of the warmup: `warmup_epochs` epochs, else `warmup_fraction` of the run, rounded down."""
    epochs = settings.get("warmup_epochs")
    if epochs is None:
        return int(settings["warmup_fraction"] * total_steps)
    if steps_per_epoch is None:
        raise ValueError("scheduler.warmup_epochs needs the number of optimizer steps per epoch")
    steps = int(epochs * steps_per_epoch)
    if steps >= total_steps > 0:
        raise ConfigError(
            [
                f"scheduler.warmup_epochs={epochs} ({steps} optimizer steps) is not shorter than the whole run "
                f"({total_steps} steps): lower it, or train for more epochs (trainer.max_epochs)."
            ]
        )
    return steps
