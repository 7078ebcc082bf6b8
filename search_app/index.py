"""Build and load an image index: embeddings of every picture under a folder, saved without pickle.

An index folder holds `manifest.json` (the model's path and weight hashes, preprocessing, embedding size, and per
image its relative path, byte size and mtime, in row order) and `embeddings.<hash>.safetensors` (float32 (N, D)).
The manifest names its embeddings file, so replacing the manifest is the single atomic commit of a new index: a
crash mid-write leaves the previous index intact. Re-indexing encodes only new or changed files (by size and
mtime), unless the model's weights changed, which invalidates every row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.datasets import load_rgb
from search_app.encoder import SearchEncoder, fingerprint, load_encoder, same_weights
from utils.errors import InputError
from utils.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class SearchIndexError(InputError):
    """An image folder or index folder cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class ImageEntry:
    """One image file: its path relative to the indexed folder (POSIX), byte size and mtime."""

    path: str
    size: int
    mtime_ns: int


@dataclass
class SearchIndex:
    """A loaded index: the image folder, the files in row order, their (N, D) embeddings, and the manifest."""

    root: Path
    entries: list[ImageEntry]
    embeddings: Tensor
    manifest: dict[str, Any]

    @property
    def paths(self) -> list[str]:
        return [entry.path for entry in self.entries]

    @classmethod
    def load(cls, index_dir: str | Path) -> SearchIndex:
        """Read an index folder written by `build_index`.

        Raises:
            SearchIndexError: no index there, or its files disagree (rows vs files, embedding size).
        """
        index_dir = Path(index_dir)
        manifest_path = index_dir / MANIFEST
        if not manifest_path.is_file():
            raise SearchIndexError(
                f"{index_dir} holds no {MANIFEST}; build it with "
                f"`search.py index IMAGES --index {index_dir} --model MODEL`."
            )
        rebuild = f"delete {index_dir} and index again"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            embeddings_path = index_dir / manifest["embeddings_file"]
            entries = [ImageEntry(**entry) for entry in manifest["files"]]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise SearchIndexError(f"{manifest_path} is not a valid index manifest ({err!r}); {rebuild}.") from err
        # safetensors holds raw tensors only: loading it never unpickles or runs code.
        try:
            embeddings = load_file(embeddings_path)["embeddings"]
        except (OSError, SafetensorError, KeyError) as err:
            raise SearchIndexError(f"cannot read the embeddings {embeddings_path} ({err}); {rebuild}.") from err
        if embeddings.shape != (len(entries), manifest["embed_dim"]):
            raise SearchIndexError(
                f"{index_dir}: embeddings {tuple(embeddings.shape)} do not match {len(entries)} files x "
                f"{manifest['embed_dim']} dims in {MANIFEST}; delete the folder and index again."
            )
        return cls(Path(manifest["image_root"]), entries, embeddings, manifest)


@dataclass
class IndexReport:
    """What `build_index` did."""

    total: int
    encoded: int
    reused: int
    removed: int
    skipped: list[str] = field(default_factory=list)


def scan_images(root: str | Path) -> list[ImageEntry]:
    """Every jpg/jpeg/png/webp file under `root` (recursively, sorted), skipping hidden entries and links that
    lead outside `root`.

    Raises:
        SearchIndexError: `root` is not a folder, or holds no image.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise SearchIndexError(f"image folder {root} does not exist or is not a folder.")
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(folder, name)
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not path.resolve().is_relative_to(root):
                log.warning("Skipping %s: it links outside %s.", path, root)
                continue
            stat = path.stat()
            entries.append(ImageEntry(path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    if not entries:
        raise SearchIndexError(f"no {'/'.join(sorted(s[1:] for s in IMAGE_SUFFIXES))} images under {root}.")
    return sorted(entries, key=lambda entry: entry.path)


class _ImageFiles(Dataset):
    """Preprocessed images; an unreadable file yields its error message instead of failing the worker."""

    def __init__(self, root: Path, paths: list[str], encoder: SearchEncoder):
        self.root, self.paths, self.preprocess = root, paths, encoder.preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None]:
        path = self.root / self.paths[i]
        try:
            return i, self.preprocess(load_rgb(path)), None
        except OSError as err:  # load_rgb's own message speaks of dataset records; keep only its cause
            return i, None, f"cannot read image {path}: {err.__cause__ or err}"


def _collate(items: list[tuple[int, Tensor | None, str | None]]) -> list[tuple[int, Tensor | None, str | None]]:
    return items


def encode_images(
    encoder: SearchEncoder,
    root: Path,
    paths: list[str],
    *,
    batch_size: int,
    workers: int,
    skip_unreadable: bool,
    progress: bool = True,
) -> tuple[dict[str, Tensor], list[str]]:
    """Embed `paths` (relative to `root`); return {path: (D,) embedding} and the paths skipped as unreadable.

    Raises:
        SearchIndexError: an unreadable image, unless `skip_unreadable`.
    """
    loader = DataLoader(
        _ImageFiles(root, paths, encoder), batch_size=batch_size, num_workers=workers, collate_fn=_collate
    )
    embedded, skipped = {}, []
    with tqdm(total=len(paths), unit="img", desc="encoding", disable=not progress) as bar:
        for items in loader:
            readable = [(i, pixels) for i, pixels, error in items if error is None]
            for i, _, error in items:
                if error is None:
                    continue
                if not skip_unreadable:
                    raise SearchIndexError(
                        f"{error}; replace or delete it, or pass --skip-unreadable to index the others."
                    )
                log.warning("Skipping unreadable image: %s", error)
                skipped.append(paths[i])
            if readable:
                feats = encoder.encode_pixels(torch.stack([pixels for _, pixels in readable]))  # (B, D)
                embedded.update((paths[i], feat) for (i, _), feat in zip(readable, feats, strict=True))
            bar.update(len(items))
    return embedded, skipped


def _previous(index_dir: Path, root: Path) -> SearchIndex | None:
    if not (index_dir / MANIFEST).is_file():
        return None
    old = SearchIndex.load(index_dir)
    if old.root != root:
        raise SearchIndexError(
            f"index {index_dir} was built for images in {old.root}, not {root}; use another --index folder."
        )
    return old


def _commit(index_dir: Path, manifest: dict[str, Any], embeddings: Tensor) -> None:
    """Write the embeddings under a content-named file, then the manifest that points at it, then tidy up."""
    payload = save({"embeddings": embeddings.contiguous()})
    name = f"embeddings.{hashlib.sha256(payload).hexdigest()[:16]}.safetensors"
    atomic_write_bytes(index_dir / name, payload)
    atomic_write_json(index_dir / MANIFEST, {**manifest, "embeddings_file": name})
    for stale in index_dir.glob("embeddings.*.safetensors"):
        if stale.name != name:
            stale.unlink()


SETTINGS = ("format", "image_size", "mean", "std", "embed_dim", "text_attention_mask")


def _settings(encoder: SearchEncoder) -> dict[str, Any]:
    """The manifest fields that describe how images were embedded and how queries must be."""
    values = (FORMAT_VERSION, list(encoder.image_size), list(encoder.mean), list(encoder.std), encoder.embed_dim)
    return dict(zip(SETTINGS, (*values, encoder.tokenizer.return_attention_mask), strict=True))


def _reusable_rows(
    old: SearchIndex | None, entries: list[ImageEntry], model_print: dict[str, Any]
) -> dict[str, Tensor]:
    """Embeddings of `old` for the files that are unchanged, when the model's weights are the same."""
    if old is None:
        return {}
    if not same_weights(old.manifest["model"], model_print):
        log.info("The model's weights changed since the index was built: re-encoding every image.")
        return {}
    current = set(entries)
    return {e.path: row for e, row in zip(old.entries, old.embeddings, strict=True) if e in current}


def build_index(
    images: str | Path,
    model: str | Path,
    index_dir: str | Path,
    *,
    batch_size: int = 64,
    workers: int = 0,
    device: torch.device | None = None,
    text_attention_mask: bool | None = None,
    skip_unreadable: bool = False,
    progress: bool = True,
) -> IndexReport:
    """Index every image under `images` with `model` into `index_dir`, re-encoding only new or changed files.

    Args:
        images: Folder searched recursively for jpg/jpeg/png/webp.
        model: Lightning `.ckpt` or exported model folder (see `search_app.encoder.load_encoder`).
        index_dir: Output folder (created; an existing index there is updated).
        batch_size: Images per forward pass.
        workers: DataLoader processes decoding images (0: in this process).
        device: Where to encode; the GPU when present by default.
        text_attention_mask: Remembered for queries; see `load_encoder`.
        skip_unreadable: Leave undecodable images out with a warning instead of stopping.
        progress: Show a progress bar.

    Raises:
        SearchIndexError: no images, an unreadable one (without `skip_unreadable`), or an index of another folder.
        ModelSourceError: `model` is neither a checkpoint nor an exported folder.
    """
    root, index_dir = Path(images).resolve(), Path(index_dir)
    entries = scan_images(root)
    old = _previous(index_dir, root)
    same_path = old is not None and old.manifest["model"]["path"] == str(Path(model).resolve())
    model_print = fingerprint(model, old.manifest["model"] if same_path else None)
    reusable = _reusable_rows(old, entries, model_print)
    todo = [e.path for e in entries if e.path not in reusable]
    embedded, skipped = {}, []
    if todo:
        encoder = load_encoder(model, device=device, text_attention_mask=text_attention_mask)
        settings = _settings(encoder)
        embedded, skipped = encode_images(
            encoder,
            root,
            todo,
            batch_size=batch_size,
            workers=workers,
            skip_unreadable=skip_unreadable,
            progress=progress,
        )
    else:  # everything reused: the model need not even be loaded
        settings = {key: old.manifest[key] for key in SETTINGS}
        if text_attention_mask is not None:
            settings["text_attention_mask"] = text_attention_mask
    kept = [e for e in entries if e.path in reusable or e.path in embedded]
    if not kept:
        raise SearchIndexError(f"none of the {len(entries)} images under {root} could be read.")
    rows = torch.stack([reusable[e.path] if e.path in reusable else embedded[e.path] for e in kept])  # (N, D)
    _commit(
        index_dir, {**settings, "model": model_print, "image_root": str(root), "files": [vars(e) for e in kept]}, rows
    )
    removed = len({e.path for e in old.entries} - {e.path for e in entries}) if old else 0
    report = IndexReport(len(kept), len(embedded), len(kept) - len(embedded), removed, skipped)
    log.info(
        "Indexed %d images (%d encoded, %d reused, %d removed) in %s.",
        report.total,
        report.encoded,
        report.reused,
        report.removed,
        index_dir,
    )
    return report
