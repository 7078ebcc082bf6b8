"""How much GPU memory a training step needs, so that a run can switch on gradient checkpointing only when it must.

The peak of a mixed-precision training step is the static part, known exactly from the parameters (their stored
bytes, an fp32 gradient and the optimizer's state per trainable weight, and autocast's 16-bit copy of each 32-bit
weight of the layers it casts), plus the activations the backward pass keeps: per transformer layer and token a
number of bytes per unit of width. Korthikanti et al. ("Reducing Activation Recomputation in Large Transformer
Models", 2022) count 34 in half precision with the attention scores not stored, as SDPA's fused kernels do; SigLIP's
towers under autocast keep more (fp32 layer-norm inputs, the pooling head, the loss inputs), a frozen linear layer
keeps less (no input for a weight gradient), and compiled layers keep fewer intermediates. The constants reproduce
the peaks measured on an H200 at 384x128, batch 24, four image views (bench/results/train_throughput_cuda.md, GiB
measured vs estimated): eager 43 (full fine-tuning 13.23 vs 13.2; frozen token embedding 11.11 vs 11.1), eager with
the towers' linear layers frozen 38 (LoRA r32 8.33 vs 8.3; frozen weights in bf16 7.66 vs 7.6), compiled 37 (full
10.09 vs 10.1, with 8-bit AdamW 9.08 vs 9.1; LoRA 7.42 vs 7.5). Gradient checkpointing keeps each layer's input (2
bytes x width per token) plus the activations of the one layer being recomputed (full fine-tuning, compiled: 4.74
vs 4.6).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

GIB = 2**30
#: Saved activations per token and layer, in bytes per unit of hidden width (autocast, fused attention; measured):
#: eager, eager with the towers' linear layers frozen (LoRA), and compiled (`model.build.compile_towers`).
ACTIVATION_BYTES_PER_WIDTH = 43
FROZEN_LINEARS_ACTIVATION_BYTES_PER_WIDTH = 38
COMPILED_ACTIVATION_BYTES_PER_WIDTH = 37
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


#: Layers whose weights autocast casts to 16 bits at each call (its lower-precision op list: linear, convolutions,
#: and the linear products inside multi-head attention); embeddings and norms are not cast.
AUTOCAST_CAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)


def autocast_cast_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights autocast copies to 16 bits during a step: those of `AUTOCAST_CAST_LAYERS` still stored in 32 bits
    (weights kept in 16 bits by `model.build.store_frozen_linears` need no copy).
    """
    return [
        param
        for module in model.modules()
        if isinstance(module, AUTOCAST_CAST_LAYERS)
        for param in module.parameters(recurse=False)
        if param.element_size() > 2
    ]


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
        mixed_precision: Autocast copies the weights of the layers it casts to 16 bits; activations are 16-bit.
        compiled: The towers' layers are compiled (fewer saved intermediates).
    """
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    half_copies = 2 * sum(p.numel() for p in autocast_cast_weights(model)) if mixed_precision else 0
    static = weights + (4 + OPTIMIZER_STATE_BYTES.get(optimizer, 8)) * trainable + half_copies
    if compiled:
        per_width = COMPILED_ACTIVATION_BYTES_PER_WIDTH
    elif _linears_mostly_frozen(backbone):
        per_width = FROZEN_LINEARS_ACTIVATION_BYTES_PER_WIDTH
    else:
        per_width = ACTIVATION_BYTES_PER_WIDTH
    scale = 1 if mixed_precision else 2  # 32-bit activations
    vision, text = backbone.config.vision_config, backbone.config.text_config
    vision_tokens = shape.batch_size * shape.image_views * shape.image_tokens
    text_tokens = shape.batch_size * shape.text_tokens * shape.text_passes
    if not checkpointing:
        return static + scale * (
            _tower_activation_bytes(vision, vision_tokens, per_width)
            + _tower_activation_bytes(text, text_tokens, per_width)
        )
    kept = _tower_activation_bytes(vision, vision_tokens, CHECKPOINTED_BYTES_PER_WIDTH)
    kept += _tower_activation_bytes(text, text_tokens, CHECKPOINTED_BYTES_PER_WIDTH)
    recomputed = max(  # the largest single layer, whose activations exist again while it is recomputed
        tokens * per_width * int(config.hidden_size)
        for config, tokens in ((vision, vision_tokens), (text, text_tokens))
    )
    return static + scale * (kept + recomputed)


def _linears_mostly_frozen(backbone: nn.Module) -> bool:
    """Whether most linear weights of the towers are frozen (LoRA, frozen towers): adapters are a small minority."""
    linears = [p for m in backbone.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)]
    trainable = sum(p.numel() for p in linears if p.requires_grad)
    return 2 * trainable < sum(p.numel() for p in linears)


def usable_device_bytes(device: torch.device) -> int:
    """The memory this process may allocate on a CUDA `device`: the card's, times the per-process fraction a user set
    with `torch.cuda.set_per_process_memory_fraction` (a shared card, or a smaller card emulated on a larger one).
    """
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # absent from older torch
    return int(total * (fraction(device) if fraction else 1.0))


def needs_checkpointing(
    backbone, model: nn.Module, shape: StepShape, *, device_bytes: int, **settings: Any
) -> tuple[bool, str]:
    """Whether the step fits `device_bytes` only with gradient checkpointing, and the reason in one line.

    `settings` are `estimated_peak_bytes`' keywords other than `checkpointing` (optimizer, mixed_precision, compiled).
    """
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
