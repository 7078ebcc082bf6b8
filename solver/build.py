"""Optimizer with name-matched parameter groups (`optimizer.param_groups`, the original project's layout).

A trainable parameter joins the first named group whose name occurs in the parameter's name (e.g. `backbone`,
`simclr`), otherwise the `default` group. A named group takes every setting of `default` that it does not set itself,
and its `lr_factor` (1 if absent) scales default's `lr`, `start_lr` and `end_lr`: `optimizer.param_groups.default.lr`
therefore moves every group and keeps their ratios through the whole schedule. Each group is split again so that
biases and other 1-D parameters (norm weights, logit scale/bias) use `weight_decay_bias` (0 by default): decaying them
only hurts. Frozen parameters are never handed to the optimizer.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Keys of a param-group config that configure the schedule rather than the optimizer.
SCHEDULE_KEYS = ("start_lr", "end_lr")
#: Rates of the `default` group that named groups scale by their `lr_factor` instead of setting.
RATE_KEYS = ("lr", *SCHEDULE_KEYS)

#: `optimizer.type` -> (module, attribute). Resolved lazily so optional packages are imported only when chosen.
OPTIMIZERS: dict[str, tuple[str, str]] = {
    "torch.optim.AdamW": ("torch.optim", "AdamW"),
    "torch.optim.Adam": ("torch.optim", "Adam"),
    "torch.optim.SGD": ("torch.optim", "SGD"),
    "bitsandbytes.optim.AdamW8bit": ("bitsandbytes.optim", "AdamW8bit"),
}

#: Optimizers with a fused implementation (`optimizer.fused`).
FUSABLE = ("torch.optim.AdamW", "torch.optim.Adam")


@dataclass
class ParamGroupSettings:
    """One entry of `optimizer.param_groups`. Unset (null) values of a named group follow `default`."""

    lr: float | None = None
    weight_decay: float | None = None
    weight_decay_bias: float | None = None  # biases and other 1-D parameters (norms, logit scale/bias)
    betas: list[float] | None = None
    eps: float | None = None
    momentum: float | None = None  # SGD
    start_lr: float | None = None  # warmup starts here
    end_lr: float | None = None  # the decay ends here
    lr_factor: float | None = None  # named groups: their rates are default's times this (1 when unset)


@dataclass
class OptimizerSettings:
    """The `optimizer` config group."""

    type: str = "???"  # a key of OPTIMIZERS; every optimizer file names its class
    # Group name -> ParamGroupSettings' keys. An open mapping, so that `+optimizer.param_groups.<new>.lr_factor=0.1`
    # adds a group from the command line (OmegaConf cannot add a new entry to a dict of dataclasses); the keys are
    # checked by `problems`.
    param_groups: dict[str, Any] = field(default_factory=dict)
    # torch's fused (single-kernel) Adam/AdamW. null (auto): on when every trainable parameter is on a CUDA device;
    # ignored by the other optimizers.
    fused: bool | None = None

    def problems(self) -> list[str]:
        valid = {f.name for f in dataclasses.fields(ParamGroupSettings)}
        issues = []
        for name, group in self.param_groups.items():
            unknown = sorted(set(group or {}) - valid)
            if unknown:
                issues.append(
                    f"Unknown optimizer.param_groups.{name} setting(s) {unknown}; valid keys: {sorted(valid)}."
                )
        return issues + optimizer_problems({"type": self.type, "param_groups": self.param_groups})


def _given(group: Mapping[str, Any] | None) -> dict[str, Any]:
    """The values a param group sets itself (the schema fills the others with null: they follow `default`)."""
    return {key: value for key, value in (group or {}).items() if value is not None}


def optimizer_problems(optimizer_cfg: Mapping[str, Any]) -> list[str]:
    """Config problems that would make `build_optimizer` fail (checked before any model is built)."""
    name = optimizer_cfg.get("type")
    if name not in OPTIMIZERS:
        return [f"optimizer.type={name!r} is unknown; valid: {sorted(OPTIMIZERS)}."]
    issues = []
    groups = optimizer_cfg.get("param_groups", {})
    if "default" not in groups:
        issues.append("optimizer.param_groups needs a `default` group.")
    else:
        missing = [key for key in RATE_KEYS if key not in _given(groups["default"])]
        if missing:
            issues.append(f"optimizer.param_groups.default needs {missing}.")
    for group_name, group in groups.items():
        fixed = [key for key in RATE_KEYS if group_name != "default" and key in _given(group)]
        if fixed:
            issues.append(
                f"optimizer.param_groups.{group_name} sets {fixed}: named groups follow default's rates; set "
                f"optimizer.param_groups.{group_name}.lr_factor (their ratio to default) or "
                "optimizer.param_groups.default.lr."
            )
        if group_name == "default" and "lr_factor" in _given(group):
            issues.append("optimizer.param_groups.default.lr_factor is not allowed: set default.lr itself.")
    module, _ = OPTIMIZERS[name]
    if module.startswith("bitsandbytes"):
        try:
            importlib.import_module(module)
        except Exception as error:  # ImportError, or a CUDA setup error raised at import
            issues.append(
                f"optimizer.type={name} needs the bitsandbytes package and a CUDA GPU ({type(error).__name__}: "
                f"{error}). Install it with `uv add bitsandbytes` on a CUDA machine, or choose a torch optimizer, "
                "e.g. `optimizer=tbps_clip` (same groups with torch.optim.AdamW)."
            )
        else:
            if not torch.cuda.is_available():
                issues.append(f"optimizer.type={name} runs on CUDA only; use `optimizer=tbps_clip` on this machine.")
    return issues


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias")


def group_settings(groups_cfg: Mapping[str, Mapping[str, Any] | None], name: str) -> dict[str, Any]:
    """The settings of group `name`: `default`'s, overridden by the group's own, rates scaled by its `lr_factor`."""
    default = _given(groups_cfg["default"])
    own = _given(groups_cfg.get(name)) if name != "default" else {}
    factor = float(own.pop("lr_factor", 1.0))
    settings = {**default, **own}
    for key in RATE_KEYS:
        settings[key] = default[key] * factor
    return settings


def param_groups(model: nn.Module, groups_cfg: Mapping[str, Mapping[str, Any] | None]) -> list[dict[str, Any]]:
    """Split the trainable parameters of `model` into optimizer param groups.

    Returns dicts with `params`, `name` (`<group>` or `<group>/no_decay`), the optimizer keys of the group's settings
    (`group_settings`) and its `start_lr` / `end_lr` (read by the scheduler, ignored by torch optimizers).
    """
    named = [name for name in groups_cfg if name != "default"]
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = next((candidate for candidate in named if candidate in name), "default")
        buckets.setdefault((group, _is_no_decay(name, param)), []).append(param)

    result = []
    for (group, no_decay), params in buckets.items():
        cfg = group_settings(groups_cfg, group)
        decay_bias = cfg.pop("weight_decay_bias", 0.0)
        if no_decay:
            cfg["weight_decay"] = decay_bias
        if "betas" in cfg:
            cfg["betas"] = tuple(cfg["betas"])
        result.append({"params": params, "name": f"{group}/no_decay" if no_decay else group, **cfg})
    for group in result:
        log.info(
            "param group %-22s %8d tensors %12d params lr %.2e wd %.3g",
            group["name"],
            len(group["params"]),
            sum(p.numel() for p in group["params"]),
            group["lr"],
            group.get("weight_decay", 0.0),
        )
    return result


def build_optimizer(optimizer_cfg: Mapping[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    """Instantiate `optimizer.type` over `param_groups(model, optimizer.param_groups)`."""
    problems = optimizer_problems(optimizer_cfg)
    if problems:
        raise ValueError(" ".join(problems))
    module, attribute = OPTIMIZERS[optimizer_cfg["type"]]
    optimizer_cls = getattr(importlib.import_module(module), attribute)
    groups = param_groups(model, optimizer_cfg["param_groups"])
    if not groups:
        raise ValueError("The model has no trainable parameters: check backbone.freeze and the LoRA settings.")
    defaults = {
        k: v
        for k, v in group_settings(optimizer_cfg["param_groups"], "default").items()
        if k not in (*SCHEDULE_KEYS, "weight_decay_bias")
    }
    if "betas" in defaults:
        defaults["betas"] = tuple(defaults["betas"])
    if optimizer_cfg["type"] in FUSABLE:
        fused = optimizer_cfg.get("fused")
        on_cuda = all(p.is_cuda for group in groups for p in group["params"])
        defaults["fused"] = on_cuda if fused is None else bool(fused)
    return optimizer_cls(groups, **defaults)
