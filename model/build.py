"""The TBPS model a composed config describes: backbone, LoRA adapters, the heads its losses need, frozen parts.

Used by the LightningModule and the tests alike, so the model trained is the model tested. Takes plain mappings
(`cfg.backbone`, `cfg.lora`): nothing here depends on Hydra or Lightning.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from model.backbone import image_size_problems, load_backbone, needs_per_call_interpolation
from model.checkpoints import TinyCheckpointSpec
from model.lora import LoraSettings, apply_lora
from model.objective import Objective
from model.tbps import TBPS, HeadSpec

log = logging.getLogger(__name__)


@dataclass
class FreezeSettings:
    """Parts kept at their pre-trained weights."""

    vision: bool = False
    text: bool = False
    # The text token embedding: 192M of the multilingual model's 372M parameters (250,000 x 768), whose gradient and
    # AdamW state would take 2.1 GiB of a 12 GB card while a person-description corpus touches a few thousand rows.
    # Frozen unless asked (`backbone.freeze.token_embedding=false`); the demo's tiny model learns its own.
    token_embedding: bool = True


#: torch.compile's modes (`backbone.compile_mode`).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class BackboneSettings:
    """The `backbone` config group."""

    path: str = "???"  # a Hugging Face model folder (config.json + weights)
    image_size: list[int] = "${img_size}"  # type: ignore[assignment]  # (height, width): the top-level img_size
    text_config: dict[str, Any] = field(default_factory=dict)  # overrides of the checkpoint's text config
    vision_config: dict[str, Any] = field(default_factory=dict)
    freeze: FreezeSettings = field(default_factory=FreezeSettings)
    # Recompute activations in the backward pass. null (auto): on when the estimated training peak would not fit
    # the GPU's memory (model.memory), off on CPUs; the choice is logged.
    gradient_checkpointing: bool | None = None
    # torch.compile the towers' layers. null (auto): on when training on a CUDA GPU inductor can compile for
    # (`compiles`), falling back to eager steps on a compile error; false keeps every step eager, true compiles on
    # the CPU too and stops on a compile error.
    compile: bool | None = None
    # torch.compile's mode for those layers (COMPILE_MODES): "reduce-overhead" replays each layer's kernels as a CUDA
    # graph (one launch instead of dozens, for steps that wait on kernel launches), "max-autotune-no-cudagraphs"
    # searches faster matrix-product kernels (minutes of compilation).
    compile_mode: str = "default"
    # Under 16-bit mixed precision, store frozen nn.Linear weights (LoRA's base model, frozen towers) in the autocast
    # dtype: autocast casts every linear weight to that dtype anyway, so the step computes exactly the same values with
    # half the weight memory, no per-step cast and no cached half copy (LoRA r32 at 384x128, batch 24: about -0.7 GiB).
    # Checkpoints then hold those weights in 16 bits. Ignored in 32-bit training and for trained weights.
    half_precision_frozen_weights: bool = True
    use_sigmoid: bool = True  # SigLIP: sigmoid N-ITC with a learnable bias; false for CLIP (softmax)
    tiny: TinyCheckpointSpec | None = None  # build this offline checkpoint at `path` when absent (the demo)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> BackboneSettings:
        """From the config group (or a partial mapping: the other fields take their defaults)."""
        values = dict(values)
        values["freeze"] = FreezeSettings(**(values.get("freeze") or {}))
        if values.get("tiny"):
            values["tiny"] = TinyCheckpointSpec(**values["tiny"])
        return cls(**values)

    def problems(self) -> list[str]:
        """The image size must tile into whole patches of the checkpoint (or of the tiny one to be built); the compile
        mode must be torch's.
        """
        issues = image_size_problems(self.path, self.image_size, patch_size=self.tiny.patch_size if self.tiny else None)
        if self.compile_mode not in COMPILE_MODES:
            issues.append(f"backbone.compile_mode={self.compile_mode!r} is unknown; valid: {list(COMPILE_MODES)}.")
        return issues


def build_model(
    backbone_cfg: BackboneSettings | Mapping[str, Any],
    objective: Objective,
    *,
    lora_cfg: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    text_vocab_size: int | None = None,
) -> TBPS:
    """Load the backbone of `backbone_cfg`, add LoRA (`lora_cfg`), the heads `objective` needs, and freeze what the
    config or the objective leaves untrained (towers; logit scale and bias no loss reads).

    Args:
        backbone_cfg: The `backbone` group (`BackboneSettings` or a mapping of its fields).
        objective: The training objective; its flags decide the heads and which logit parameters train.
        lora_cfg: The `lora` group, or None for full fine-tuning.
        num_classes: Training identities, for the ID loss's classifier.
        text_vocab_size: Tokenizer size when it exceeds the checkpoint's (MLM adds a mask token).

    Raises:
        ValueError: The ID loss is on but `num_classes` is not given.
    """
    if objective.needs_classifier and not num_classes:
        raise ValueError("an identity loss (loss.ID) needs the number of training identities (num_classes).")
    config = backbone_cfg if isinstance(backbone_cfg, BackboneSettings) else BackboneSettings.from_mapping(backbone_cfg)
    image_size = tuple(config.image_size)
    backbone = load_backbone(
        Path(config.path),
        image_size=image_size,
        text_config_overrides=config.text_config,
        vision_config_overrides=config.vision_config,
        gradient_checkpointing=config.gradient_checkpointing,
        text_vocab_size=text_vocab_size,
    )
    if lora_cfg:
        apply_lora(backbone, LoraSettings.from_mapping(lora_cfg))
    heads = HeadSpec(  # what the objective's losses read
        simclr=objective.needs_ss_views,
        num_classes=num_classes if objective.needs_classifier else None,
        mlm_depth=objective.settings.cmt_depth if objective.needs_masked_captions else None,
    )
    model = TBPS(
        backbone,
        heads,
        freeze_vision=config.freeze.vision,
        freeze_text=config.freeze.text,
        freeze_token_embedding=config.freeze.token_embedding,
        interpolate_pos_encoding=needs_per_call_interpolation(backbone, image_size),
    )
    log.info("Training objective: %s", objective.describe())
    frozen = model.keep_logit_parameters(scale=objective.uses_logit_scale, bias=objective.uses_logit_bias)
    if frozen:
        log.info("%s frozen: no training loss of this objective reads them", " and ".join(frozen))
    return model


def compiles(setting: bool | None, stage: str, device: torch.device) -> bool:
    """`backbone.compile`; null (auto): on when training on a CUDA GPU that inductor can generate kernels for.

    On an H200 at the seed's recipe (bench/results/train_throughput_cuda.md) compiled towers gave LoRA 1.30x the eager
    samples/s and full fine-tuning the same speed with 1 GiB less memory (what fits a 12 GB card without
    checkpointing). Evaluation alone stays eager: compiling would cost more than it saves.
    """
    if setting is not None:
        return bool(setting)
    return stage == "fit" and device.type == "cuda" and triton_usable()


def triton_usable() -> bool:
    """Whether inductor can build GPU kernels here: a Triton backend for this GPU (torch's own check: CUDA compute
    capability 7.0 or newer, Triton installed) and a C compiler, which Triton needs at run time for its launchers.
    """
    try:
        from torch.utils._triton import has_triton  # torch's helper (private, hence the guard)
    except ImportError:
        return False
    compiler = os.environ.get("CC") or any(shutil.which(name) for name in ("cc", "gcc", "clang"))
    return bool(compiler) and has_triton()


#: Compiled variants dynamo keeps per code object. Every layer of both towers shares one, and training, validation
#: (no grad) and testing (inference mode) of two towers' shapes already make 8, dynamo's default: one more variant
#: would silently run eager.
RECOMPILE_LIMIT = 32


def compile_towers(backbone: PreTrainedModel, *, mode: str = "default", fall_back_to_eager: bool = False) -> int:
    """torch.compile every transformer layer of both towers in place; returns how many were compiled.

    Layer by layer rather than whole towers: the layers of a tower share their code, so one compiled graph serves all
    of them (parameters are graph inputs), which compiles about ten times faster than a whole tower for the same
    fused kernels. In place (`nn.Module.compile`), so state_dict keys, checkpoints and exports do not change.
    `mode` is torch.compile's (`COMPILE_MODES`). Compilation happens at the first call; `fall_back_to_eager` makes a
    failure there run that code eagerly (with dynamo's warning) instead of raising. Both settings are process-wide
    (dynamo's configuration).
    """
    import torch._dynamo

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    if fall_back_to_eager:
        config.suppress_errors = True
    layers = [*backbone.vision_model.encoder.layers, *backbone.text_model.encoder.layers]
    for layer in layers:
        layer.compile(mode=mode)
    return len(layers)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast computes in under a Lightning `precision` ("bf16-mixed", "16-mixed"); None otherwise."""
    if not str(precision).endswith("16-mixed"):
        return None
    return torch.bfloat16 if str(precision).startswith("bf16") else torch.float16


def store_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the weights (and biases) of every fully frozen `nn.Linear` of `model` to `dtype`; returns how many.

    Exactly `nn.Linear`, not its subclasses: `nn.MultiheadAttention`'s output projection is one, and its functional
    forward mixes it with the module's own fp32 input projection. A layer with any trainable parameter stays as it is.
    Meant for training under autocast to `dtype`, which would cast these weights to `dtype` at every call.
    """
    count = 0
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if type(module) is nn.Linear and params and not any(p.requires_grad for p in params):
            module.to(dtype)
            count += 1
    return count


def inference_model(backbone: PreTrainedModel, image_size: tuple[int, int]) -> TBPS:
    """A TBPS that only encodes (search over an exported folder): no heads, nothing trained."""
    return TBPS(backbone, interpolate_pos_encoding=needs_per_call_interpolation(backbone, image_size))
