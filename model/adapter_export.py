"""Export a LoRA run's adapter alone, in peft's own format, next to the merged model.

The folder holds `adapter_config.json` + `adapter_model.safetensors` (written by `PeftModel.save_pretrained`), so
`PeftModel.from_pretrained(SiglipModel.from_pretrained(base), folder)` rebuilds the trained backbone with peft alone.
A LoRA run also changes a few base weights; each is carried, rebuilt by the loader, or refused:

* `logit_scale` / `logit_bias` (trainable under `lora.train_logit_params`): carried as two extra tensors of
  `adapter_model.safetensors` under peft's key for base-model weights (`base_model.model.logit_scale`), which
  `PeftModel.from_pretrained` loads into the base model. They set the pair probabilities, not the embeddings.
* The SigLIP position grid resized at load time for a non-native input size (24x8 for 384x128): LoRA freezes it, and
  it equals what transformers computes per call with `interpolate_pos_encoding=True` (same bicubic interpolation),
  so callers pass that flag (the model card says so).
* The token-embedding row of the MLM mask token: only masked-caption training reads it. The adapter folder's
  tokenizer has no mask token, so no id reaches past the base vocabulary.
* Anything else that differs from the base checkpoint (a base weight trained by other means, a config override
  changing the embeddings) cannot be carried: `AdapterExportError` names it and points to the merged export.

The training heads (SimCLR projection, identity classifier, MLM transformer) are part of neither export: search and
zero-shot classification read the backbone only.

After writing, the folder is loaded back exactly as a user would (fresh base + `PeftModel.from_pretrained`) and its
image and text embeddings are compared with the merged model's; a mismatch refuses the export.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.backbone import needs_per_call_interpolation
from model.lora import LOGIT_PARAMETERS, has_lora
from utils.errors import InputError

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: peft's prefix for the base model's own weights in a saved state dict.
PEFT_PREFIX = "base_model.model."
POSITION_EMBEDDING = "vision_model.embeddings.position_embedding.weight"
TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"
#: Largest embedding difference accepted when the written adapter is loaded back (float32 round-off).
TOLERANCE = 1e-4
#: The dtypes a run may store its frozen weights in (`model.build.store_frozen_linears`).
HALF_DTYPES = (torch.bfloat16, torch.float16)


class AdapterExportError(InputError):
    """The LoRA run changed something a peft adapter folder cannot carry (the merged export carries it)."""


@dataclass(frozen=True)
class AdapterBase:
    """The base checkpoint the adapter applies to.

    Attributes:
        path: Local folder of the base checkpoint, loaded here to compare and to verify.
        name: What `adapter_config.json` records as `base_model_name_or_path` (a hub id, or the local folder).
        tokenizer: The base tokenizer (without an MLM mask token), saved in the adapter folder.
        loaded: The base checkpoint already loaded in float32 by the caller, handed over (`export_adapter` injects the
            adapters into it); None: loaded from `path`.
    """

    path: Path
    name: str
    tokenizer: PreTrainedTokenizerBase
    loaded: PreTrainedModel | None = None


@dataclass(frozen=True)
class AdapterExport:
    """What `export_adapter` wrote.

    Attributes:
        path: The adapter folder.
        interpolate_pos_encoding: Whether image calls need it (a SigLIP grid resized at load time, or CLIP off its
            native size).
    """

    path: Path
    interpolate_pos_encoding: bool


def _base_name(name: str) -> str:
    """A peft-injected parameter name without its wrapper level (`q_proj.base_layer.weight` -> `q_proj.weight`)."""
    return name.replace(".base_layer.", ".")


def _carried_names(backbone: PreTrainedModel) -> set[str]:
    """Base-model parameter names the adapter file holds: peft's own (adapters, biases under `lora.bias`) + logits."""
    adapter_keys = get_peft_model_state_dict(backbone)
    return {_base_name(key) for key in adapter_keys} | {name for name in LOGIT_PARAMETERS if hasattr(backbone, name)}


def _grid_of(base: PreTrainedModel, image_size: tuple[int, int]) -> Tensor:
    """The position table transformers computes per call with `interpolate_pos_encoding=True` at `image_size`."""
    embeddings = base.vision_model.embeddings
    height, width = image_size
    dummy = torch.zeros(1, embeddings.num_patches, embeddings.embed_dim)  # only its shape is read
    with torch.no_grad():
        return embeddings.interpolate_pos_encoding(dummy, height, width)[0]


def uncarried_weights(
    backbone: PreTrainedModel, base: PreTrainedModel, image_size: tuple[int, int]
) -> tuple[list[str], bool]:
    """Compare the trained backbone's non-adapter weights with the base checkpoint's.

    Returns:
        The weights the adapter cannot carry (name and why; empty when it can carry the run), and whether image calls
        need `interpolate_pos_encoding=True` (the position grid was resized at load time and left untrained).
    """
    carried = _carried_names(backbone)
    base_params = dict(base.named_parameters())
    problems: list[str] = []
    interpolate = False
    for raw_name, trained in backbone.named_parameters():
        name = _base_name(raw_name)
        if "lora_" in name or name in carried:
            continue
        original = base_params.get(name)
        if original is None:
            problems.append(f"{name} (not in the base checkpoint)")
        elif trained.shape == original.shape:
            if not torch.equal(trained.detach().float(), original.detach().float()):
                problems.append(f"{name} (changed from the base checkpoint)")
        elif name == POSITION_EMBEDDING and torch.allclose(trained.detach(), _grid_of(base, image_size), atol=1e-6):
            interpolate = True
        elif name == TOKEN_EMBEDDING and torch.equal(trained.detach()[: original.shape[0]], original.detach()):
            log.info("Adapter: %d added token rows (MLM mask) are left out", trained.shape[0] - original.shape[0])
        else:
            problems.append(f"{name} (shape {tuple(trained.shape)}, base {tuple(original.shape)})")
    return problems, interpolate


def restore_base_precision(backbone: PreTrainedModel, base: PreTrainedModel) -> int:
    """Give frozen weights that a run stored in 16 bits back the base checkpoint's full-precision values; return how
    many.

    Under 16-bit mixed precision, training keeps frozen linear weights in the autocast dtype
    (`model.build.store_frozen_linears`), so its checkpoints hold them rounded. A frozen weight that equals the base's
    rounded to bfloat16 or float16 was not trained: the base value computes the same under autocast (which rounds it
    to that same number) and is what an adapter applied to the base checkpoint assumes. Weights that differ otherwise
    (trained, or from another checkpoint) are left as they are.
    """
    base_params = dict(base.named_parameters())
    restored = 0
    with torch.no_grad():
        for raw_name, trained in backbone.named_parameters():
            original = base_params.get(_base_name(raw_name))
            if trained.requires_grad or original is None or original.shape != trained.shape:
                continue
            if trained.dtype != original.dtype or torch.equal(trained, original):
                continue
            if any(torch.equal(trained, original.to(half).to(original.dtype)) for half in HALF_DTYPES):
                trained.copy_(original)
                restored += 1
    return restored


def _write(backbone: PreTrainedModel, base: PreTrainedModel, base_name: str, out_dir: Path) -> None:
    """Save the adapters of `backbone` with peft's writer (on `base`, which it modifies), plus the logit weights."""
    config = copy.deepcopy(backbone.peft_config["default"])  # the training model's own config stays as it is
    config.base_model_name_or_path = base_name
    peft_model = get_peft_model(base, config)
    trained, carried = dict(backbone.named_parameters()), _carried_names(backbone)
    with torch.no_grad():
        for name, parameter in peft_model.base_model.model.named_parameters():
            if "lora_" in name or _base_name(name) in carried:
                parameter.copy_(trained[name])
    peft_model.save_pretrained(out_dir)
    weights_file = out_dir / ADAPTER_WEIGHTS
    weights = load_file(weights_file)
    for name in LOGIT_PARAMETERS:
        if hasattr(backbone, name):
            weights[PEFT_PREFIX + name] = getattr(backbone, name).detach().clone().contiguous()
    save_file(weights, weights_file, metadata={"format": "pt"})


def _embeddings(model, pixel_values: Tensor, input_ids: Tensor, **vision_kwargs) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixel_values, **vision_kwargs).pooler_output
        text = model.get_text_features(input_ids=input_ids).pooler_output
    return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)


def _verify(
    merged: PreTrainedModel, base: AdapterBase, out_dir: Path, image_size: tuple[int, int], interpolate: bool
) -> None:
    """Load `out_dir` as a user would and compare its embeddings and logit weights with `merged`'s.

    Raises:
        AdapterExportError: on any difference above `TOLERANCE`.
    """
    fresh = type(merged).from_pretrained(base.path, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh, out_dir).eval()
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, *image_size, generator=generator)
    vocab = min(len(base.tokenizer), int(fresh.config.text_config.vocab_size))
    max_length = int(fresh.config.text_config.max_position_embeddings)
    input_ids = torch.randint(0, vocab, (2, max_length), generator=generator)
    per_call = needs_per_call_interpolation(merged, image_size)  # CLIP off its native size: training did so too
    got = _embeddings(loaded, pixel_values, input_ids, interpolate_pos_encoding=interpolate)
    expected = _embeddings(merged.eval(), pixel_values, input_ids, interpolate_pos_encoding=per_call)
    worst = max(float((a - b).abs().max()) for a, b in zip(got, expected, strict=True))
    logits_differ = [
        name
        for name in LOGIT_PARAMETERS
        if hasattr(merged, name) and not torch.equal(getattr(loaded.base_model.model, name), getattr(merged, name))
    ]
    if worst > TOLERANCE or logits_differ:
        raise AdapterExportError(
            f"the adapter written to {out_dir}, loaded with peft onto {base.path}, does not reproduce the merged model "
            f"(embeddings differ by {worst:.2e}; logit weights not restored: {logits_differ}); use the merged export."
        )


def export_adapter(
    backbone: PreTrainedModel,
    merged: PreTrainedModel,
    base: AdapterBase,
    out_dir: Path,
    image_size: tuple[int, int],
) -> AdapterExport:
    """Write the LoRA adapters of `backbone` as a peft adapter folder `out_dir`, checked against `merged`.

    Args:
        backbone: The trained backbone with its injected adapters (left untouched).
        merged: The same backbone with the adapters merged (`model.export.merged_backbone`).
        base: The base checkpoint the adapters apply to.
        out_dir: Folder to create (inside the export's staging folder).
        image_size: Training input (height, width).

    Raises:
        AdapterExportError: when `backbone` has no LoRA adapters, the base checkpoint is missing, or the run changed
            weights an adapter cannot carry (the message names them).
    """
    if not has_lora(backbone):
        raise AdapterExportError("the backbone has no LoRA adapters (a full fine-tuning run); use the merged export.")
    if not Path(base.path).is_dir():
        raise AdapterExportError(
            f"the base checkpoint {base.path} the adapter applies to is not here to check it against; put it back "
            "(uv run prepare_checkpoints.py) or use the merged export."
        )
    reference = (
        base.loaded if base.loaded is not None else type(backbone).from_pretrained(base.path, dtype=torch.float32)
    )
    problems, resized_grid = uncarried_weights(backbone, reference, image_size)
    interpolate = resized_grid or needs_per_call_interpolation(backbone, image_size)
    if problems:
        raise AdapterExportError(
            "a peft adapter cannot carry these weights of the trained model, which differ from the base checkpoint "
            f"{base.path}: {'; '.join(problems)}. The merged export holds them."
        )
    _write(backbone, reference, base.name, out_dir)
    base.tokenizer.save_pretrained(out_dir)
    _verify(merged, base, out_dir, image_size, interpolate)
    log.info("Adapter for %s written to %s", base.name, out_dir)
    return AdapterExport(out_dir, interpolate)
