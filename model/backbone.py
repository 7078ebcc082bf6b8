"""Load the SigLIP backbone from a Hugging Face model directory and adapt it to the training image size.

The backbone is always `transformers`' own `SiglipModel` (no vendored modelling code). The only adaptation is the
vision position-embedding grid: SigLIP checkpoints are square (16x16 patches for the 256 px multilingual model)
while person crops are tall (the seed trains at 384x128 -> 24x8 patches), so the grid is interpolated once at load
time instead of on every forward pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

log = logging.getLogger(__name__)

#: Files a model directory must hold for `load_backbone` (the layout `save_pretrained` and the hub both write).
REQUIRED_MODEL_FILES = ("config.json",)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


class CheckpointError(FileNotFoundError):
    """A model directory is missing or incomplete."""


def check_model_dir(path: str | Path) -> Path:
    """Return `path` as a Path after checking it holds a config and weights in the Hugging Face layout."""
    path = Path(path)
    fix = "run `uv run prepare_checkpoints.py` (real checkpoint) or point backbone.path at a save_pretrained folder"
    if not path.is_dir():
        raise CheckpointError(f"Model directory {path} does not exist; {fix}.")
    missing = [name for name in REQUIRED_MODEL_FILES if not (path / name).is_file()]
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise CheckpointError(f"Model directory {path} is missing {', '.join(missing)}; {fix}.")
    return path


def load_backbone(
    path: str | Path,
    *,
    image_size: tuple[int, int] | None = None,
    text_config_overrides: Mapping[str, Any] | None = None,
    vision_config_overrides: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    text_vocab_size: int | None = None,
) -> PreTrainedModel:
    """Load a dual-encoder backbone (`SiglipModel`) from a local directory.

    Args:
        path: Directory written by `save_pretrained` / `snapshot_download`.
        image_size: Training input (height, width); the position grid is resized to it when it differs.
        text_config_overrides: Keys set on `config.text_config` before the weights load (e.g. attention_dropout).
        vision_config_overrides: Same for `config.vision_config`.
        gradient_checkpointing: Recompute activations in the backward pass (non-reentrant, so frozen inputs and
            LoRA adapters inside checkpointed blocks still receive gradients).
        text_vocab_size: Grow the token embedding to this many rows (a tokenizer with an added MLM mask token).
    """
    path = check_model_dir(path)
    config = AutoConfig.from_pretrained(path)
    for sub_config, overrides in (
        (config.text_config, text_config_overrides),
        (config.vision_config, vision_config_overrides),
    ):
        for key, value in (overrides or {}).items():
            if not hasattr(sub_config, key):
                raise ValueError(f"{type(sub_config).__name__} has no field {key!r} (override from backbone config).")
            setattr(sub_config, key, value)
    model = AutoModel.from_pretrained(path, config=config)
    if text_vocab_size is not None and text_vocab_size != config.text_config.vocab_size:
        if text_vocab_size < config.text_config.vocab_size:
            raise ValueError(f"text_vocab_size={text_vocab_size} is smaller than the checkpoint's vocabulary.")
        model.resize_token_embeddings(text_vocab_size)
        config.text_config.vocab_size = text_vocab_size
    if image_size is not None and not has_class_token(model):
        resize_image_positions(model, tuple(image_size))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def patch_size_of(model: PreTrainedModel) -> int:
    return int(model.config.vision_config.patch_size)


def has_class_token(model: PreTrainedModel) -> bool:
    """CLIP prepends a class token; SigLIP does not."""
    return hasattr(model.vision_model.embeddings, "class_embedding")


def needs_per_call_interpolation(model: PreTrainedModel, image_size: tuple[int, int]) -> bool:
    """Whether the vision tower must interpolate positions on every call (`interpolate_pos_encoding=True`).

    SigLIP's grid is resized once by `load_backbone`. CLIP's vision embedding rejects any input whose height or
    width differs from its square `image_size`, so for CLIP at another size the grid is interpolated per call (HF's
    own path, which handles rectangles).
    """
    check_image_size(model, image_size)
    native = int(model.config.vision_config.image_size)
    return has_class_token(model) and tuple(image_size) != (native, native)


def check_image_size(model: PreTrainedModel, image_size: tuple[int, int]) -> None:
    patch = patch_size_of(model)
    height, width = image_size
    if height % patch or width % patch:
        raise ValueError(
            f"Image size {height}x{width} is not divisible by the patch size {patch}; "
            f"set img_size_str to multiples of {patch}, e.g. '({height // patch * patch},{width // patch * patch})'."
        )


def resize_image_positions(model: PreTrainedModel, image_size: tuple[int, int]) -> None:
    """Interpolate the square vision position grid to `image_size // patch_size` (bicubic, as HF does per call).

    For SigLIP, which has no class token (CLIP is interpolated per call, see `needs_per_call_interpolation`).

    Raises:
        ValueError: when the size is not a multiple of the patch size.
    """
    embeddings = model.vision_model.embeddings
    check_image_size(model, image_size)
    height, width = image_size
    patch = patch_size_of(model)
    grid_h, grid_w = height // patch, width // patch
    weight = embeddings.position_embedding.weight
    num_positions, dim = weight.shape
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"Vision position embedding has {num_positions} rows, not a square grid.")
    if (grid_h, grid_w) == (side, side):
        return
    grid = weight.detach().float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, side, side)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    new_weight = grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, dim).to(weight.dtype)  # (gh*gw, D), row-major
    embeddings.position_embedding = nn.Embedding.from_pretrained(new_weight, freeze=False)
    embeddings.position_ids = torch.arange(grid_h * grid_w, device=weight.device).unsqueeze(0)
    embeddings.num_patches = embeddings.num_positions = grid_h * grid_w
    embeddings.image_size = (height, width)
    log.info("Resized vision position grid %dx%d -> %dx%d for %dx%d inputs", side, side, grid_h, grid_w, height, width)
