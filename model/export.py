"""Export a trained TBPS backbone as a plain Hugging Face model directory, with any LoRA adapters merged.

Rectangular inputs. `model.backbone.load_backbone` resizes SigLIP's square position grid once, e.g. to 24x8 for
384x128 crops, and training then fine-tunes that 192-row table. `SiglipVisionConfig.image_size` is one int, so
transformers can only build square grids, and no square grid has 192 positions. Two exports follow from that:

* Square training size (H == W): `vision_config.image_size` is set to H and the directory is an ordinary
  checkpoint. `transformers.AutoModel.from_pretrained(out_dir)` rebuilds the trained model exactly.
* Rectangular training size: the weights are saved unchanged and the grid is recorded in the config as
  `vision_config.tbps_position_grid = [rows, cols]` (`image_size` keeps the checkpoint's square side).
  `load_exported(out_dir)` builds the model, resizes the grid to that shape and loads the weights strictly, which is
  exact. A plain `from_pretrained` refuses the directory with a shape mismatch on the position embedding rather
  than loading something wrong. Interpolating the trained grid back to a square would make plain loading
  possible, but it would be lossy: the trained rows are not a resampling of any square grid.

CLIP keeps its native grid (it interpolates per call, `model.backbone.needs_per_call_interpolation`), so its
export is always an ordinary checkpoint. At a non-native size, call it with `interpolate_pos_encoding=True`, as
training did.

Beside the merged weights, a LoRA run's adapter alone goes to `adapter/` in peft's format
(`model.adapter_export`), and every folder gets a model card `README.md` (`model.model_card`), so
`huggingface-cli upload` publishes the folder as it is. The image processor resizes exactly as evaluation does
(`data.transforms`: both run torchvision's bicubic antialiased resize on the uint8 image).
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError
from safetensors.torch import load_model
from transformers import AutoConfig, AutoModel, PreTrainedModel, PreTrainedTokenizerBase, SiglipImageProcessor

from model.adapter_export import ADAPTER_DIR, AdapterBase, AdapterExportError, export_adapter
from model.backbone import (
    CheckpointError,
    check_image_size,
    check_model_dir,
    has_class_token,
    needs_per_call_interpolation,
    resize_image_positions,
)
from model.lora import has_lora
from model.model_card import CARD_FILE, CardFacts, adapter_card, merged_card
from model.tbps import TBPS

log = logging.getLogger(__name__)

#: `vision_config` field holding the (rows, cols) position grid of a rectangular SigLIP export.
GRID_FIELD = "tbps_position_grid"
TEXT_MASK_FIELD = "tbps_text_attention_mask"
WEIGHTS_FILE = "model.safetensors"


def merged_backbone(backbone: PreTrainedModel) -> PreTrainedModel:
    """Return a deep copy of `backbone` with every LoRA adapter merged into its base layer.

    The copy is a plain `SiglipModel` / `CLIPModel` whose state dict has the original keys. `backbone` itself is
    untouched, so training can go on. Without adapters this is just a copy. The adapters were injected with
    `peft.inject_adapter_in_model`, which leaves no `PeftModel` to call `merge_and_unload` on, so each peft layer
    merges itself (`merge`, NaN-checked) and is swapped for its base layer.
    """
    merged = copy.deepcopy(backbone)
    adapted = [(name, module) for name, module in merged.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, layer in adapted:
        layer.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(merged, "peft_config"):  # set by peft on injection; a plain model has none
        del merged.peft_config
    return merged


def export_model(
    model: TBPS,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    image_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    text_attention_mask: bool = False,
    adapter_base: AdapterBase | None = None,
    card: CardFacts | None = None,
) -> Path:
    """Write `model`'s backbone as a Hugging Face model directory, atomically; return `out_dir`.

    The directory holds `config.json` + `model.safetensors` (LoRA merged), the tokenizer files,
    `preprocessor_config.json` (a `SiglipImageProcessor` that resizes to `image_size` as evaluation does and
    normalises with `mean` / `std`) and a model card `README.md`. Load it with `load_exported` (any size) or, for a
    square size, with `transformers.AutoModel.from_pretrained`; either gives the embeddings of `model.encode_image` /
    `model.encode_text`. With LoRA and `adapter_base`, `adapter/` holds the adapter alone in peft's format (see
    `model.adapter_export`); when the run changed what an adapter cannot carry, the log and the card say so and
    only the merged model is written.

    Args:
        model: The trained model; only `model.backbone` is exported (the training heads are not part of search).
        tokenizer: The Hugging Face tokenizer used in training (with an added MLM mask token, if any).
        out_dir: Directory to create; it must not exist yet.
        image_size: Training input (height, width).
        mean: Per-channel normalisation mean of training.
        std: Per-channel normalisation std of training.
        text_attention_mask: Whether training masked text pads; recorded as `text_config.tbps_text_attention_mask`
            so that search encodes queries the same way.
        adapter_base: The base checkpoint of a LoRA run, for the adapter folder (None: no adapter folder).
        card: What the model card reports (None: the size and base checkpoint only).

    Raises:
        FileExistsError: when `out_dir` exists.
        ValueError: when `image_size` is not the size the SigLIP position grid was resized to.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"Export directory {out_dir} already exists; choose a new out_dir or delete it.")
    image_size = (int(image_size[0]), int(image_size[1]))
    backbone = merged_backbone(model.backbone)
    setattr(backbone.config.text_config, TEXT_MASK_FIELD, bool(text_attention_mask))
    if not has_class_token(backbone):
        record_position_grid(backbone, image_size)
    height, width = image_size
    processor = SiglipImageProcessor(
        size={"height": height, "width": width}, image_mean=list(mean), image_std=list(std)
    )
    card = card or CardFacts(
        model_id=str(out_dir),
        base_model=str(getattr(backbone.config, "_name_or_path", "") or "unknown"),
        image_size=image_size,
        text_length=int(backbone.config.text_config.max_position_embeddings),
        text_attention_mask=bool(text_attention_mask),
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        backbone.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        processor.save_pretrained(staging)
        adapter_line = _write_adapter(model, backbone, adapter_base, staging, image_size, processor, card, out_dir)
        grid = getattr(backbone.config.vision_config, GRID_FIELD, None)
        interpolate = needs_per_call_interpolation(backbone, image_size)
        text = merged_card(card, grid=grid, interpolate=interpolate, adapter_line=adapter_line)
        (staging / CARD_FILE).write_text(text, encoding="utf-8")
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("Exported %s (%dx%d inputs) to %s", type(backbone).__name__, height, width, out_dir)
    return out_dir


def _write_adapter(
    model: TBPS,
    merged: PreTrainedModel,
    base: AdapterBase | None,
    staging: Path,
    image_size: tuple[int, int],
    processor: SiglipImageProcessor,
    card: CardFacts,
    out_dir: Path,
) -> str:
    """Write `staging/adapter/` for a LoRA run when it can carry the run; return the merged card's line about it."""
    if not has_lora(model.backbone):
        log.info("Full fine-tuning run: no adapter folder (the merged model in %s is the whole model)", out_dir)
        return "Trained with full fine-tuning: there is no adapter, this folder is the whole model."
    if base is None:
        return "Trained with LoRA; the adapter alone was not exported."
    adapter_dir = staging / ADAPTER_DIR
    try:
        written = export_adapter(model.backbone, merged, base, adapter_dir, image_size)
    except AdapterExportError as error:
        shutil.rmtree(adapter_dir, ignore_errors=True)
        log.warning("No adapter folder: %s", error)
        return f"Trained with LoRA; no adapter folder: {error}"
    processor.save_pretrained(adapter_dir)
    adapter_id = str(out_dir / ADAPTER_DIR)
    text = adapter_card(card, adapter_id=adapter_id, interpolate=written.interpolate_pos_encoding)
    (adapter_dir / CARD_FILE).write_text(text, encoding="utf-8")
    return f"Trained with LoRA: `{ADAPTER_DIR}/` holds the adapter alone (peft format) for `{card.base_model}`."


def record_position_grid(backbone: PreTrainedModel, image_size: tuple[int, int]) -> None:
    """Describe a SigLIP backbone's position grid in its config (see the module docstring).

    Raises:
        ValueError: when `image_size` is not the size the grid was built for.
    """
    check_image_size(backbone, image_size)
    vision_config = backbone.config.vision_config
    grid_size = backbone.vision_model.embeddings.image_size  # an int until resize_image_positions sets (h, w)
    trained = tuple(grid_size) if isinstance(grid_size, Sequence) else (grid_size, grid_size)
    if trained != tuple(image_size):
        raise ValueError(
            f"image_size {image_size} differs from the {trained[0]}x{trained[1]} inputs the backbone's position grid "
            "was built for; pass the training image size."
        )
    height, width = image_size
    if height == width:
        vision_config.image_size = height
    else:
        patch = int(vision_config.patch_size)
        setattr(vision_config, GRID_FIELD, [height // patch, width // patch])


def load_exported(path: str | Path) -> PreTrainedModel:
    """Load a directory written by `export_model`, rebuilding a rectangular position grid; eval mode.

    Square exports go straight through `AutoModel.from_pretrained`. Rectangular ones are built from the config, get
    their grid resized to `vision_config.tbps_position_grid` and then load every weight strictly.
    """
    path = check_model_dir(path)
    config = AutoConfig.from_pretrained(path)
    grid = getattr(config.vision_config, GRID_FIELD, None)
    try:
        if grid is None:
            # export_model writes safetensors only; refusing pickled `.bin` weights means loading never runs pickled
            # code.
            return AutoModel.from_pretrained(path, use_safetensors=True)
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE}; rectangular exports are written as one file.")
        model = AutoModel.from_config(config)
        patch = int(config.vision_config.patch_size)
        resize_image_positions(model, (grid[0] * patch, grid[1] * patch))
        load_model(model, path / WEIGHTS_FILE, strict=True)
    except SafetensorError as error:  # a truncated or overwritten file; not an OSError, so name it here
        raise CheckpointError(
            f"{path / WEIGHTS_FILE} cannot be read ({error}); export the checkpoint again (prepare_checkpoints.py "
            "--export) or copy the folder whole."
        ) from error
    return model.eval()
