"""The TBPS model a composed config describes: backbone, LoRA adapters, the heads its losses need, frozen parts.

Used by the LightningModule and the tests alike, so the model trained is the model tested. Takes plain mappings
(`cfg.backbone`, `cfg.lora`): nothing here depends on Hydra or Lightning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.backbone import load_backbone, needs_per_call_interpolation
from model.lora import LoraSettings, apply_lora
from model.objective import Objective
from model.tbps import TBPS, Heads

log = logging.getLogger(__name__)


def build_model(
    backbone_cfg: Mapping[str, Any],
    objective: Objective,
    *,
    lora_cfg: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    text_vocab_size: int | None = None,
) -> TBPS:
    """Load the backbone of `backbone_cfg`, add LoRA (`lora_cfg`), the heads `objective` needs, and freeze what the
    config or the objective leaves untrained (towers; logit scale and bias no loss reads).

    Args:
        backbone_cfg: The `backbone` group (path, image_size, text_config, vision_config, gradient_checkpointing,
            freeze).
        objective: The training objective; its flags decide the heads and which logit parameters train.
        lora_cfg: The `lora` group, or None for full fine-tuning.
        num_classes: Training identities, for the ID loss's classifier.
        text_vocab_size: Tokenizer size when it exceeds the checkpoint's (MLM adds a mask token).

    Raises:
        ValueError: The ID loss is on but `num_classes` is not given.
    """
    settings = objective.settings
    if settings.ID and not num_classes:
        raise ValueError("loss.ID needs the number of training identities (num_classes).")
    image_size = tuple(backbone_cfg["image_size"])
    backbone = load_backbone(
        Path(backbone_cfg["path"]),
        image_size=image_size,
        text_config_overrides=backbone_cfg.get("text_config"),
        vision_config_overrides=backbone_cfg.get("vision_config"),
        gradient_checkpointing=backbone_cfg.get("gradient_checkpointing", False),
        text_vocab_size=text_vocab_size,
    )
    if lora_cfg:
        apply_lora(backbone, LoraSettings.from_mapping(lora_cfg))
    heads = Heads(
        simclr=settings.SS,
        num_classes=num_classes if settings.ID else None,
        mlm_depth=settings.cmt_depth if settings.MLM else None,
    )
    freeze = backbone_cfg.get("freeze") or {}
    model = TBPS(
        backbone,
        heads,
        freeze_vision=freeze.get("vision", False),
        freeze_text=freeze.get("text", False),
        interpolate_pos_encoding=needs_per_call_interpolation(backbone, image_size),
    )
    log.info("Training objective: %s", objective.describe())
    frozen = model.keep_logit_parameters(scale=objective.uses_logit_scale, bias=objective.uses_logit_bias)
    if frozen:
        log.info("%s frozen: no training loss of this objective reads them", " and ".join(frozen))
    return model
