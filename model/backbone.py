"""Load the SigLIP backbone from a Hugging Face model directory and adapt it to the training image size.

The backbone is always `transformers`' own `SiglipModel` (no vendored modelling code). The only adaptation is the
vision position-embedding grid: SigLIP checkpoints are square (16x16 patches for the 256 px multilingual model)
while person crops are tall (384x128 -> 24x8 patches is usual), so the grid is interpolated once at load
time instead of on every forward pass.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from utils.errors import ImageSizeError, InputError

log = logging.getLogger(__name__)

#: Files a model directory must hold for `load_backbone` (the layout `save_pretrained` and the hub both write).
REQUIRED_MODEL_FILES = ("config.json",)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


class CheckpointError(InputError, FileNotFoundError):
    """A model directory is missing, incomplete or unreadable."""


class BackboneConfigError(InputError):
    """The backbone settings do not fit the checkpoint: an override of a field it lacks, a smaller tokenizer."""


#: How to get a usable model directory (the end of every CheckpointError message).
CHECKPOINT_FIX = (
    "run `uv run prepare_checkpoints.py` (real checkpoint) or point backbone.path at a save_pretrained folder"
)


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message (library messages can run to a page), or its type name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_model_dir(path: str | Path) -> Path:
    """Return `path` as a Path after checking it holds a config and weights in the Hugging Face layout."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Model directory {path} does not exist; {CHECKPOINT_FIX}.")
    missing = [name for name in REQUIRED_MODEL_FILES if not (path / name).is_file()]
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise CheckpointError(f"Model directory {path} is missing {', '.join(missing)}; {CHECKPOINT_FIX}.")
    return path


def checkpoint_patch_size(path: str | Path) -> int | None:
    """The vision patch size written in `path/config.json`, or None when the file is absent or unreadable.

    Reads the JSON directly (no transformers import or model build), so config validation can call it.
    """
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        patch = config["vision_config"]["patch_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a missing or broken checkpoint is reported when it loads (check_model_dir, load_backbone)
    return patch if isinstance(patch, int) and not isinstance(patch, bool) and patch > 0 else None


def _image_size_problem(image_size: Sequence[int], patch: int, where: str) -> str | None:
    height, width = image_size
    if height % patch == 0 and width % patch == 0:
        return None
    fixed = f"({max(height // patch, 1) * patch},{max(width // patch, 1) * patch})"
    return (
        f"Image size {height}x{width} is not divisible by the patch size {patch} of {where}; "
        f"set img_size_str to multiples of {patch}, e.g. img_size_str='{fixed}'."
    )


def image_size_problems(path: str | Path, image_size: Sequence[int], *, patch_size: int | None = None) -> list[str]:
    """Config-time check that `image_size` (height, width) tiles into whole patches of the backbone at `path`.

    Args:
        path: `backbone.path`; its config.json gives the patch size when the folder exists.
        image_size: The resolved `backbone.image_size`.
        patch_size: The patch size when the checkpoint is built later (`backbone.tiny.patch_size`); the folder's
            config.json wins when it exists.

    Returns:
        One message when the size does not divide; empty when it does or the patch size is not known yet.
    """
    patch = checkpoint_patch_size(path) or patch_size
    if patch is None:
        return []
    problem = _image_size_problem(image_size, patch, f"backbone.path={path}")
    return [problem] if problem else []


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
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:  # invalid JSON, no model_type, an unknown architecture
        raise CheckpointError(
            f"Model directory {path} has an unusable config.json ({_first_line(error)}); {CHECKPOINT_FIX}."
        ) from error
    for sub_config, overrides in (
        (config.text_config, text_config_overrides),
        (config.vision_config, vision_config_overrides),
    ):
        for key, value in (overrides or {}).items():
            if not hasattr(sub_config, key):
                group = "text_config" if sub_config is config.text_config else "vision_config"
                raise BackboneConfigError(
                    f"backbone.{group}.{key}: {type(sub_config).__name__} of {path} has no field {key!r}; "
                    f"remove the override or use a field of {path / 'config.json'}."
                )
            setattr(sub_config, key, value)
    try:
        model = AutoModel.from_pretrained(path, config=config)
    except (OSError, SafetensorError) as error:  # a truncated or corrupt weight file
        raise CheckpointError(
            f"Model directory {path} has unreadable weights ({_first_line(error)}); {CHECKPOINT_FIX}."
        ) from error
    if text_vocab_size is not None and text_vocab_size != config.text_config.vocab_size:
        if text_vocab_size < config.text_config.vocab_size:
            raise BackboneConfigError(
                f"The tokenizer has {text_vocab_size} tokens, fewer than the {config.text_config.vocab_size} of "
                f"{path}; use the tokenizer saved with the checkpoint (tokenizer.pretrained_model_name_or_path)."
            )
        model.resize_token_embeddings(text_vocab_size)
        config.text_config.vocab_size = text_vocab_size
    if image_size is not None and not has_class_token(model):
        resize_image_positions(model, tuple(image_size))
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute both towers' activations in the backward pass; non-reentrant, so frozen inputs and LoRA adapters
    inside checkpointed blocks still receive gradients.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
    """Raise ImageSizeError unless `image_size` tiles into whole patches of `model`."""
    problem = _image_size_problem(image_size, patch_size_of(model), f"{type(model).__name__}")
    if problem:
        raise ImageSizeError(problem)


def resize_image_positions(model: PreTrainedModel, image_size: tuple[int, int]) -> None:
    """Interpolate the square vision position grid to `image_size // patch_size` (bicubic, as HF does per call).

    For SigLIP, which has no class token (CLIP is interpolated per call, see `needs_per_call_interpolation`).

    Raises:
        ImageSizeError: when the size is not a multiple of the patch size.
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
