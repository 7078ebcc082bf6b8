"""How much GPU memory a training step needs, so that a run can switch on gradient checkpointing only when it must.

The peak of a mixed-precision training step is the static part, known exactly from the parameters (their stored
bytes, an fp32 gradient and the optimizer's state per trainable weight, autocast's half-precision copy of every fp32
weight), plus the activations the backward pass keeps: per transformer layer and token about
``ACTIVATION_BYTES_PER_WIDTH`` bytes per unit of width. Korthikanti et al. ("Reducing Activation Recomputation in
Large Transformer Models", 2022) count 34 in half precision with the attention scores not stored, as SDPA's fused
kernels do; SigLIP's towers under autocast keep more (fp32 layer-norm inputs, the pooling head, the loss inputs).
The constants reproduce the peaks measured on an H200 at 384x128, batch 24, four image views
(bench/results/train_throughput_cuda.md): eager 41 (full fine-tuning 13.23 GiB measured vs 13.2 estimated, with a
frozen token embedding 11.11 vs 11.1; LoRA r32 7.66 vs 8.5, on the safe side), compiled towers 35 (torch.compile
fuses the element-wise ops and keeps fewer intermediates: full 10.09 vs 10.1, LoRA 7.42 vs 7.5). Gradient
checkpointing keeps only each layer's input (2 bytes x width per token; measured 4.74 GiB vs 4.4 estimated).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

GIB = 2**30
#: Saved activations per token and layer, in bytes per unit of hidden width (autocast, fused attention; measured).
ACTIVATION_BYTES_PER_WIDTH = 41
#: The same with the towers' layers compiled (`model.build.compile_towers`; measured).
COMPILED_ACTIVATION_BYTES_PER_WIDTH = 35
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
    backbone,
    model: nn.Module,
    shape: StepShape,
    *,
    optimizer: str,
    checkpointing: bool,
    mixed_precision: bool = True,
    compiled: bool = False,
) -> int:
    """Peak memory of one training step of `model` (whose dual encoder is `backbone`), in bytes.

    Args:
        backbone: The Hugging Face dual encoder (its configs give the towers' depth and width).
        model: The whole trained module (heads included): its parameters give the static part.
        shape: Batch size, views and tokens of a step.
        optimizer: Optimizer class name (a key of OPTIMIZER_STATE_BYTES; unknown names count as Adam).
        checkpointing: Whether the towers recompute activations in the backward pass.
        mixed_precision: Autocast keeps a half-precision copy of each weight; activations are half precision.
        compiled: The towers' layers are compiled (fewer saved intermediates).
    """
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    # Weights already stored in 16 bits (`model.build.store_frozen_linears`) need no autocast copy.
    half_copies = 2 * sum(p.numel() for p in params if p.element_size() > 2) if mixed_precision else 0
    static = weights + (4 + OPTIMIZER_STATE_BYTES.get(optimizer, 8)) * trainable + half_copies
    if checkpointing:
        per_width = CHECKPOINTED_BYTES_PER_WIDTH
    else:
        per_width = COMPILED_ACTIVATION_BYTES_PER_WIDTH if compiled else ACTIVATION_BYTES_PER_WIDTH
    if not mixed_precision:
        per_width *= 2
    vision_tokens = shape.batch_size * shape.image_views * shape.image_tokens
    text_tokens = shape.batch_size * shape.text_tokens * shape.text_passes
    activations = _tower_activation_bytes(backbone.config.vision_config, vision_tokens, per_width)
    activations += _tower_activation_bytes(backbone.config.text_config, text_tokens, per_width)
    return static + activations


def usable_device_bytes(device: torch.device) -> int:
    """The memory this process may allocate on a CUDA `device`: the card's, times the per-process fraction a user set
    with `torch.cuda.set_per_process_memory_fraction` (a shared card, or a smaller card emulated on a larger one).
    """
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # absent from older torch
    return int(total * (fraction(device) if fraction else 1.0))


def needs_checkpointing(
    backbone,
    model: nn.Module,
    shape: StepShape,
    *,
    optimizer: str,
    device_bytes: int,
    mixed_precision: bool = True,
    compiled: bool = False,
) -> tuple[bool, str]:
    """Whether the step fits `device_bytes` only with gradient checkpointing, and the reason in one line."""
    settings = dict(optimizer=optimizer, mixed_precision=mixed_precision, compiled=compiled)
    without = estimated_peak_bytes(backbone, model, shape, checkpointing=False, **settings)
    usable = USABLE_FRACTION * device_bytes
    if without <= usable:
        return False, (
            f"estimated training peak {without / GIB:.1f} GiB fits {usable / GIB:.1f} GiB of the card "
            f"({device_bytes / GIB:.1f} GiB): gradient checkpointing off"
        )
    with_ckpt = estimated_peak_bytes(backbone, model, shape, checkpointing=True, **settings)
    return True, (
        f"estimated training peak {without / GIB:.1f} GiB exceeds {usable / GIB:.1f} GiB of the card "
        f"({device_bytes / GIB:.1f} GiB): gradient checkpointing on (estimated {with_ckpt / GIB:.1f} GiB; "
        "backbone.gradient_checkpointing=false forces it off)"
    )
