"""LoRA adapters on the backbone, injected in place with `peft` (the `lora` config group).

`peft.inject_adapter_in_model` is used rather than `peft.get_peft_model`. Both replace the targeted Linear layers of
the backbone in place, but `get_peft_model` also returns a `PeftModel` wrapper that the rest of the project would
have to carry around or discard. `inject_adapter_in_model` returns the very object it was given, so
`TBPS.backbone` keeps its class (`SiglipModel`) and every attribute path the project reads: `vision_model`,
`text_model`, `get_image_features`, `logit_scale`. No `PeftModel` means no `merge_and_unload`: `model.export`
merges layer by layer with peft's own `merge()`.

Gradient checkpointing needs nothing here. `model.backbone.load_backbone` enables the non-reentrant variant, which
back-propagates into adapters inside checkpointed blocks even though every input to those blocks is frozen.
Checkpointing may be switched on before or after `apply_lora`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn
from transformers import PreTrainedModel

from utils.errors import InputError

log = logging.getLogger(__name__)

#: The attention projections of both towers. A bare `out_proj` suffix would also match the vision pooling head's
#: `nn.MultiheadAttention.out_proj`, which never trains (see `apply_lora`).
SELF_ATTENTION_PATTERN = r".*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"
#: Values of peft's `LoraConfig.bias`.
BIAS_MODES = ("none", "all", "lora_only")
#: SigLIP's temperature and bias (CLIP has only the first). PEFT freezes them with the other base weights.
LOGIT_PARAMETERS = ("logit_scale", "logit_bias")


class LoraConfigError(InputError):
    """The `lora` config group is invalid or its `target_modules` do not fit the backbone."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class LoraSettings:
    """The `lora` config group. The defaults are those of the Circle-Loss runs (`run_cir_loss.sh`)."""

    r: int = 32  # adapter rank
    lora_alpha: int = 64  # the update is scaled by lora_alpha / r (2 here)
    lora_dropout: float = 0.05  # dropout on the adapter input
    bias: str = "none"  # one of BIAS_MODES
    # A regex (full match) or a list of name suffixes (typed Any: OmegaConf's schemas have no str-or-list type).
    target_modules: Any = SELF_ATTENTION_PATTERN
    train_logit_params: bool = True  # keep logit_scale / logit_bias trainable

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LoraSettings:
        """Build the settings from a config mapping (a dict or an OmegaConf `DictConfig`).

        Raises:
            LoraConfigError: for keys that are not fields, naming the valid ones.
        """
        valid = [field.name for field in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise LoraConfigError(f"Unknown lora config keys {unknown}; valid keys: {valid}.")
        settings = dict(values)
        targets = settings.get("target_modules")
        if targets is not None and not isinstance(targets, str):
            settings["target_modules"] = [str(target) for target in targets]  # an OmegaConf ListConfig, a tuple
        return cls(**settings)

    def problems(self) -> list[str]:
        """Every invalid value, one message each; empty when the settings are usable."""
        issues = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            issues.append(f"lora.r must be a positive integer, got {self.r!r}.")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            issues.append(f"lora.lora_alpha must be positive, got {self.lora_alpha!r}.")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            issues.append(f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in BIAS_MODES:
            issues.append(f"lora.bias must be one of {list(BIAS_MODES)}, got {self.bias!r}.")
        if not self.target_modules:
            issues.append(f"lora.target_modules is empty; use e.g. {SELF_ATTENTION_PATTERN}.")
        elif isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as error:
                issues.append(f"lora.target_modules {self.target_modules} is not a valid regex: {error}.")
        return issues

    def peft_config(self, exclude_modules: list[str] | None = None) -> LoraConfig:
        """The equivalent `peft.LoraConfig`; `exclude_modules` are full module names peft must not adapt."""
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            bias=self.bias,
            target_modules=self.target_modules,
            exclude_modules=exclude_modules or None,
        )


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of `module`."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters())


def has_lora(module: nn.Module) -> bool:
    """Whether peft adapters have been injected into `module`."""
    return any(isinstance(sub, BaseTunerLayer) for sub in module.modules())


def linear_module_names(module: nn.Module, limit: int = 8) -> list[str]:
    """Up to `limit` distinct Linear layer names of `module`, layer indices written as `N` (for error messages)."""
    names: list[str] = []
    for name, sub in module.named_modules():
        generic = re.sub(r"\.\d+\.", ".N.", name)
        if isinstance(sub, nn.Linear) and generic not in names:
            names.append(generic)
    return names[:limit]


def apply_lora(backbone: PreTrainedModel, settings: LoraSettings) -> PreTrainedModel:
    """Inject LoRA adapters into `backbone` in place and freeze every other backbone weight.

    TBPS holds the backbone, so it uses the adapters without being rebuilt; its own heads are not touched. Linear
    layers inside an `nn.MultiheadAttention` (the vision pooling head's `out_proj`) are excluded even when the
    targets match them: the attention reads `out_proj.weight` directly instead of calling the layer, so an adapter
    there would never receive a gradient (and would break DDP's unused-parameter check).

    Args:
        backbone: A `SiglipModel` / `CLIPModel`, e.g. from `model.backbone.load_backbone`.
        settings: Rank, scaling, dropout, bias mode and target layers.

    Returns:
        The same `backbone` object, now holding the adapters.

    Raises:
        LoraConfigError: for invalid settings, a backbone that already has adapters, targets that match a
            non-Linear module, or targets that match no Linear layer (the message lists real Linear layer names).
    """
    issues = settings.problems()
    if has_lora(backbone):
        issues.append(f"{type(backbone).__name__} already has LoRA adapters; apply_lora must run once per backbone.")
    if issues:
        raise LoraConfigError("Invalid LoRA setup:\n" + "\n".join(issues))
    pattern = settings.peft_config()
    matched = {name: module for name, module in backbone.named_modules() if check_target_module_exists(pattern, name)}
    not_linear = {name: type(module).__name__ for name, module in matched.items() if not isinstance(module, nn.Linear)}
    if not_linear:
        raise LoraConfigError(
            f"lora.target_modules {settings.target_modules} matches modules that are not Linear layers: "
            f"{not_linear}; narrow the pattern to Linear leaves such as q_proj, k_proj, v_proj, out_proj, fc1, fc2."
        )
    attention_prefixes = [
        f"{name}." for name, module in backbone.named_modules() if isinstance(module, nn.MultiheadAttention)
    ]
    inside_mha = sorted(name for name in matched if name.startswith(tuple(attention_prefixes)))
    if len(inside_mha) == len(matched):
        raise LoraConfigError(
            f"lora.target_modules {settings.target_modules} matches no adaptable Linear layer of "
            f"{type(backbone).__name__}, whose Linear layers include {linear_module_names(backbone)}; "
            f"use e.g. {SELF_ATTENTION_PATTERN}."
        )
    if inside_mha:
        log.info(
            "LoRA skips %s: nn.MultiheadAttention reads their weights directly, so adapters never train", inside_mha
        )
    inject_adapter_in_model(settings.peft_config(exclude_modules=inside_mha), backbone)  # freezes non-adapters
    if settings.train_logit_params:
        for name in LOGIT_PARAMETERS:
            parameter = getattr(backbone, name, None)
            if parameter is not None:
                parameter.requires_grad_(True)
    trainable, total = parameter_counts(backbone)
    log.info(
        "LoRA r=%d on %d layers: %d trainable of %d backbone parameters (%.2f%%)",
        settings.r,
        len(matched) - len(inside_mha),
        trainable,
        total,
        100.0 * trainable / total,
    )
    return backbone
