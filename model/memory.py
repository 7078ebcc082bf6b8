"""How much GPU memory a training step needs, so that a run can switch on gradient checkpointing only when it must.

The peak of a mixed-precision training step is the static part, known exactly from the parameters (fp32 weights,
an fp32 gradient and the optimizer's state per trainable weight, autocast's half-precision copy of every weight),
plus the activations the backward pass keeps: per transformer layer and token about ``ACTIVATION_BYTES_PER_WIDTH``
bytes per unit of width. Korthikanti et al. ("Reducing Activation Recomputation in Large Transformer Models", 2022)
count 34 in half precision with the attention scores not stored, as SDPA's fused kernels do; SigLIP's towers under
autocast keep more (fp32 layer-norm inputs, the pooling head, the loss inputs): 41 reproduces the peaks measured on
an H200 at 384x128, batch 24 (bench/results/train_throughput_cuda.md: full fine-tuning 13.23 GiB measured vs 13.2
estimated, with a frozen token embedding 11.11 vs 11.1, LoRA r32 8.33 vs 9.2). Gradient checkpointing keeps only
each layer's input (2 bytes x width per token; measured 4.74 GiB vs 4.4 estimated).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

log = logging.getLogger(__name__)

GIB = 2**30
#: Saved activations per token and layer, in bytes per unit of hidden width (autocast, fused attention; measured).
ACTIVATION_BYTES_PER_WIDTH = 41
#: With checkpointing only each layer's input stays (half precision), plus one layer being recomputed.
CHECKPOINTED_BYTES_PER_WIDTH = 2
#: Optimizer state bytes per trainable parameter: two fp32 moments (Adam/AdamW), two 8-bit ones plus block scales
#: (bitsandbytes' 8-bit AdamW), one fp32 momentum buffer (SGD).
OPTIMIZER_STATE_BYTES = {"AdamW": 8, "Adam": 8, "AdamW8bit": 2, "SGD": 4}
#: Fraction of the card a plan may fill: the rest is the allocator's fragmentation and the CUDA context.
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class StepShape:
    """What one training step pushes through the towers."""

    batch_size: int
    image_views: int  # images encoded per sample: 1, +1 multi-view, +2 SimCLR
    image_tokens: int  # patches per image, e.g. 24 x 8 = 192 at 384x128 with patches of 16
    text_tokens: int  # caption length (the tokenizer's max_length)
    text_passes: int = 1  # +1 with the MLM head's masked captions


def _tower_activation_bytes(config, tokens: int, bytes_per_width: int) -> int:
    return int(config.num_hidden_layers) * tokens * bytes_per_width * int(config.hidden_size)


def estimated_peak_bytes(
    backbone, model: nn.Module, shape: StepShape, *, optimizer: str, checkpointing: bool, mixed_precision: bool = True
) -> int:
    """Peak memory of one training step of `model` (whose dual encoder is `backbone`), in bytes.

    Args:
        backbone: The Hugging Face dual encoder (its configs give the towers' depth and width).
        model: The whole trained module (heads included): its parameters give the static part.
        shape: Batch size, views and tokens of a step.
        optimizer: Optimizer class name (a key of OPTIMIZER_STATE_BYTES; unknown names count as Adam).
        checkpointing: Whether the towers recompute activations in the backward pass.
        mixed_precision: Autocast keeps a half-precision copy of each weight; activations are half precision.
    """
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    half_copies = 2 * total if mixed_precision else 0
    static = 4 * total + (4 + OPTIMIZER_STATE_BYTES.get(optimizer, 8)) * trainable + half_copies
    per_width = CHECKPOINTED_BYTES_PER_WIDTH if checkpointing else ACTIVATION_BYTES_PER_WIDTH
    if not mixed_precision:
        per_width *= 2
    vision_tokens = shape.batch_size * shape.image_views * shape.image_tokens
    text_tokens = shape.batch_size * shape.text_tokens * shape.text_passes
    activations = _tower_activation_bytes(backbone.config.vision_config, vision_tokens, per_width)
    activations += _tower_activation_bytes(backbone.config.text_config, text_tokens, per_width)
    return static + activations


def needs_checkpointing(
    backbone, model: nn.Module, shape: StepShape, *, optimizer: str, device_bytes: int, mixed_precision: bool = True
) -> tuple[bool, str]:
    """Whether the step fits `device_bytes` only with gradient checkpointing, and the reason in one line."""
    without = estimated_peak_bytes(
        backbone, model, shape, optimizer=optimizer, checkpointing=False, mixed_precision=mixed_precision
    )
    usable = USABLE_FRACTION * device_bytes
    if without <= usable:
        return False, (
            f"estimated training peak {without / GIB:.1f} GiB fits {usable / GIB:.1f} GiB of the card "
            f"({device_bytes / GIB:.1f} GiB): gradient checkpointing off"
        )
    with_ckpt = estimated_peak_bytes(
        backbone, model, shape, optimizer=optimizer, checkpointing=True, mixed_precision=mixed_precision
    )
    return True, (
        f"estimated training peak {without / GIB:.1f} GiB exceeds {usable / GIB:.1f} GiB of the card "
        f"({device_bytes / GIB:.1f} GiB): gradient checkpointing on (estimated {with_ckpt / GIB:.1f} GiB; "
        "backbone.gradient_checkpointing=false forces it off)"
    )
