"""Load a trained model for search: a Lightning `.ckpt` or an exported Hugging Face folder, same interface.

Both give a `SearchEncoder` that turns PIL images and sentences into the L2-normalised embeddings of
`TBPS.encode_image` / `encode_text`, preprocessed exactly as evaluation did (eval transform with the training
size/mean/std; `CaptionTokenizer`: NFC + right padding to the text length).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from data.text import CaptionTokenizer
from data.transforms import build_eval_transform
from model.tbps import TBPS
from utils.errors import InputError

PREPROCESSOR_FILE = "preprocessor_config.json"
#: Files whose bytes define an exported model's embeddings (weights, possibly sharded, and the architecture).
FINGERPRINT_PATTERNS = ("config.json", "*.safetensors", "*.bin")


class ModelSourceError(InputError):
    """The model path is neither a Lightning checkpoint nor an exported model folder."""


@dataclass
class SearchEncoder:
    """A TBPS model with its preprocessing, in eval mode on `device`."""

    model: TBPS
    tokenizer: CaptionTokenizer
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: Path
    device: torch.device

    def __post_init__(self) -> None:
        self.model.eval().to(self.device)
        self.transform = build_eval_transform(self.image_size, self.mean, self.std)

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    def preprocess(self, image: Image.Image) -> Tensor:
        """(3, H, W) float tensor of one RGB image."""
        return self.transform(image)

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) preprocessed images -> (B, D) float32 embeddings on the CPU."""
        return self.model.encode_image(pixel_values.to(self.device)).float().cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Sentences (any language the tokenizer knows) -> (Q, D) float32 embeddings on the CPU."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = {k: v.to(self.device) for k, v in self.tokenizer(texts[start : start + batch_size]).items()}
            chunks.append(self.model.encode_text(batch["input_ids"], batch.get("attention_mask")).float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)


def _load_checkpoint(path: Path, device: torch.device, text_attention_mask: bool | None) -> SearchEncoder:
    from config_schema import unreadable_checkpoint
    from lightning_models import TBPSLitModule

    try:
        # Tensors and plain containers only (weights_only): a checkpoint that needs arbitrary classes is refused
        # instead of unpickled (which could run code).
        module = TBPSLitModule.load_trained(path)
    except KeyError as err:  # readable, but not written by TBPSLitModule
        raise ModelSourceError(
            f"--model {path} is not a TBPS checkpoint (no {err}); pass a .ckpt written by `trainer.py` or an exported "
            "folder."
        ) from err
    except pickle.UnpicklingError as err:
        raise ModelSourceError(
            f"--model {path} holds objects other than tensors and plain containers, so it is not loaded (that would "
            "run pickled code); pass a checkpoint written by `trainer.py` or an exported folder."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        if reason := unreadable_checkpoint(path):  # the file itself, not the model it describes
            raise ModelSourceError(
                f"--model {path} is not a readable checkpoint ({reason}); pass a .ckpt written by `trainer.py` "
                "(e.g. RUN/checkpoints/last.ckpt, copied whole) or an exported folder."
            ) from err
        raise
    cfg = module.cfg
    mask = cfg.tokenizer.use_attention_mask if text_attention_mask is None else text_attention_mask
    tokenizer = CaptionTokenizer.from_pretrained(
        cfg.tokenizer.pretrained_model_name_or_path, cfg.tokenizer.model_max_length, return_attention_mask=mask
    )
    img = cfg.aug.img
    return SearchEncoder(module.model, tokenizer, tuple(img.size), tuple(img.mean), tuple(img.std), path, device)


def _read_json(path: Path, fix: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ModelSourceError(f"{path} is missing; {fix}") from err
    except json.JSONDecodeError as err:
        raise ModelSourceError(f"{path} is not valid JSON ({err}); {fix}") from err


def _load_exported(path: Path, device: torch.device, text_attention_mask: bool | None) -> SearchEncoder:
    from model.build import inference_model
    from model.export import TEXT_MASK_FIELD, load_exported

    fix = "export the model with `uv run prepare_checkpoints.py --export RUN/checkpoints/last.ckpt --out DIR`."
    processor = _read_json(path / PREPROCESSOR_FILE, fix)
    try:
        size = (int(processor["size"]["height"]), int(processor["size"]["width"]))
        mean, std = tuple(processor["image_mean"]), tuple(processor["image_std"])
    except (KeyError, TypeError) as err:
        raise ModelSourceError(
            f"{path / PREPROCESSOR_FILE} lacks size.height/width, image_mean or image_std; {fix}"
        ) from err
    backbone = load_exported(path)
    # The tokenizer's saved length can be a "no limit" sentinel; the text tower's positions are the real bound.
    text_positions = int(backbone.config.text_config.max_position_embeddings)
    saved = _read_json(path / "tokenizer_config.json", fix).get("model_max_length", text_positions)
    # The export records whether training masked text pads (SigLIP's pre-training did not: the default).
    if text_attention_mask is None:
        text_attention_mask = bool(getattr(backbone.config.text_config, TEXT_MASK_FIELD, False))
    tokenizer = CaptionTokenizer.from_pretrained(
        path, min(int(saved), text_positions), return_attention_mask=text_attention_mask
    )
    return SearchEncoder(inference_model(backbone, size), tokenizer, size, mean, std, path, device)


LOADERS: dict[str, Callable[[Path, torch.device, bool | None], SearchEncoder]] = {
    "checkpoint": _load_checkpoint,
    "exported": _load_exported,
}


def model_kind(path: str | Path) -> str:
    """`checkpoint` for a `.ckpt` file, `exported` for a folder with config.json; a clear error otherwise."""
    path = Path(path)
    if path.is_file() and path.suffix == ".ckpt":
        return "checkpoint"
    if path.is_dir() and (path / "config.json").is_file():
        return "exported"
    what = "does not exist" if not path.exists() else "is neither a .ckpt file nor a folder with config.json"
    raise ModelSourceError(
        f"--model {path} {what}; pass a trained checkpoint (RUN/checkpoints/*.ckpt) or a folder written by "
        "`uv run prepare_checkpoints.py --export CKPT --out DIR`."
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_encoder(
    path: str | Path, *, device: torch.device | None = None, text_attention_mask: bool | None = None
) -> SearchEncoder:
    """Load a `.ckpt` or an exported folder as a `SearchEncoder`.

    Args:
        path: Lightning checkpoint file or exported model folder.
        device: Where to run; the GPU when present by default.
        text_attention_mask: Mask text pads. None: the checkpoint's `tokenizer.use_attention_mask`, or off for an
            exported folder (which does not record it; pass True for models trained with a mask, like the demo).
    """
    path = Path(path)
    return LOADERS[model_kind(path)](path, device or default_device(), text_attention_mask)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_files(path: str | Path) -> list[Path]:
    """The files that define a model's embeddings: the checkpoint itself, or an exported folder's weights + config."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted({f for pattern in FINGERPRINT_PATTERNS for f in path.glob(pattern) if f.is_file()})


def fingerprint(path: str | Path, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Path, kind and per-weight-file (name, size, mtime, sha256) of a model.

    A file whose size and mtime match `previous` keeps its recorded hash rather than being read again (a 1 GB
    checkpoint would otherwise cost seconds per query).
    """
    path = Path(path).resolve()
    known = {f["name"]: f for f in (previous or {}).get("files", [])}
    files = []
    for file in weight_files(path):
        stat = file.stat()
        entry = {"name": file.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        old = known.get(file.name, {})
        same = old.get("size") == entry["size"] and old.get("mtime_ns") == entry["mtime_ns"]
        entry["sha256"] = old["sha256"] if same else _sha256(file)
        files.append(entry)
    return {"path": str(path), "kind": model_kind(path), "files": files}


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two fingerprints describe the same weights (by content, wherever the files live)."""
    return [(f["name"], f["sha256"]) for f in a["files"]] == [(f["name"], f["sha256"]) for f in b["files"]]
