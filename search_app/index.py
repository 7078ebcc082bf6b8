"""Build an image index: embeddings of every picture under a folder (the folder's format: `search_app.manifest`).

Re-indexing encodes only new or changed files (by size and mtime, and a followed link's target), unless the model's
weights changed, which invalidates every row. A `faiss-ivf` index keeps its centroids and the list of every
unchanged row; only new rows are assigned, and the centroids are trained again only when the model changed or the
gallery grew `RETRAIN_GROWTH` times past the rows they were trained on. Removed or changed files simply leave the row
list: the faiss index is refilled from the rows when it is opened.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.datasets import load_rgb
from search_app.backends import (
    AUTO,
    IVF,
    RETRAIN_GROWTH,
    IVFParams,
    assign_lists,
    ivf_to_bytes,
    resolve_backend,
    train_ivf,
)
from search_app.encoder import SearchEncoder, fingerprint, load_encoder, same_weights
from search_app.manifest import (
    FORMAT_VERSION,
    ImageEntry,
    SearchIndex,
    SearchIndexError,
    check_backend,
    commit_index,
    previous_index,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})


@dataclass
class IndexReport:
    """What `build_index` did."""

    total: int
    encoded: int
    reused: int
    removed: int
    backend: str
    skipped: list[str] = field(default_factory=list)


def _walk(root: Path, follow_links: bool):
    """`os.walk` of `root` in sorted order without hidden folders; following links, each real folder once (a link
    to an ancestor would otherwise loop forever).
    """
    seen = {root}
    for folder, dirs, files in os.walk(root, followlinks=follow_links):
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            real = Path(folder, name).resolve()
            if not follow_links or real not in seen:
                seen.add(real)
                kept.append(name)
        dirs[:] = kept
        yield folder, files


def scan_images(root: str | Path, *, follow_links: bool = False) -> list[ImageEntry]:
    """Every jpg/jpeg/png/webp file under `root` (recursively, sorted), skipping hidden entries, broken links and,
    unless `follow_links`, links (to files or folders) that lead outside `root`.

    Raises:
        SearchIndexError: `root` is not a folder, or holds no image.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise SearchIndexError(f"image folder {root} does not exist or is not a folder.")
    entries = []
    for folder, files in _walk(root, follow_links):
        for name in files:
            path = Path(folder, name)
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            real = path.resolve()
            outside = not real.is_relative_to(root)
            if outside and not follow_links:
                log.warning("Skipping %s: it links outside %s (--follow-links indexes it).", path, root)
                continue
            if not real.is_file():
                log.warning("Skipping %s: it links to %s, which is not a file.", path, real)
                continue
            stat = real.stat()
            relative = path.relative_to(root).as_posix()
            entries.append(ImageEntry(relative, stat.st_size, stat.st_mtime_ns, str(real) if outside else None))
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


SETTINGS = ("format", "image_size", "mean", "std", "embed_dim", "exif_upright", "text_attention_mask")


def _settings(encoder: SearchEncoder) -> dict[str, Any]:
    """The manifest fields that describe how images were embedded and how queries must be."""
    values = (FORMAT_VERSION, list(encoder.image_size), list(encoder.mean), list(encoder.std), encoder.embed_dim, True)
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
    if not old.manifest.get("exif_upright"):
        # Built when photos were encoded as stored, so phone photos with an EXIF rotation went in sideways.
        log.info("The index predates encoding photos upright (EXIF orientation): re-encoding every image.")
        return {}
    current = set(entries)
    return {e.path: row for e, row in zip(old.entries, old.embeddings, strict=True) if e in current}


def _backend(old: SearchIndex | None, index_dir: Path, requested: str, num_rows: int) -> dict[str, Any]:
    """The backend record for a (re)build: an explicit choice must match an existing index's; `auto` keeps the
    existing index's choice (itself `auto` or not) and resolves it for `num_rows`.
    """
    if old is not None:
        check_backend(index_dir, old.backend["name"], requested)
        if requested == AUTO:
            requested = old.backend["requested"]
    return {"name": resolve_backend(requested, num_rows), "requested": requested}


def _ivf_state(
    old: SearchIndex | None, rows: Tensor, kept: list[ImageEntry], reusable: dict[str, Tensor]
) -> tuple[faiss.IndexIVFFlat, IVFParams, Tensor]:
    """The trained IVF index, its parameters and each row's list: the old centroids and lists of unchanged rows
    while they still fit, else freshly trained ones.
    """
    num_rows = len(rows)
    if old is not None and old.trained_ivf is not None and reusable:
        params = IVFParams(**{key: old.backend[key] for key in IVFParams.__dataclass_fields__})
        if num_rows <= RETRAIN_GROWTH * params.trained_rows:
            old_lists = dict(zip(old.paths, old.lists.tolist(), strict=True))
            new = [i for i, entry in enumerate(kept) if entry.path not in reusable]
            lists = np.array([old_lists.get(entry.path, -1) for entry in kept], dtype=np.int64)
            lists[new] = assign_lists(old.trained_ivf, rows[new])
            return old.trained_ivf, params, torch.from_numpy(lists)
        log.info("The gallery grew past %g x the rows its IVF lists were trained on: training again.", RETRAIN_GROWTH)
    params = IVFParams.for_size(num_rows)
    log.info("Training %d IVF lists on %d of %d rows.", params.nlist, params.train_size, num_rows)
    trained = train_ivf(rows, params)
    return trained, params, torch.from_numpy(assign_lists(trained, rows))


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
    backend: str = AUTO,
    follow_links: bool | None = None,
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
        backend: `matmul`, `faiss-flat`, `faiss-ivf`, or `auto` (an existing index's choice; for a new index
            `faiss-flat` up to `search_app.backends.EXACT_UP_TO` images, `faiss-ivf` above).
        follow_links: Index links that lead outside `images` too (recorded; None: the existing index's choice,
            else False).
        progress: Show a progress bar.

    Raises:
        SearchIndexError: no images, an unreadable one (without `skip_unreadable`), an index of another folder, or
            an explicit `backend` other than the existing index's.
        ModelSourceError: `model` is neither a checkpoint nor an exported folder.
    """
    root, index_dir = Path(images).resolve(), Path(index_dir)
    old = previous_index(index_dir, root)
    if follow_links is None:
        follow_links = bool(old and old.manifest.get("follow_links", False))
    entries = scan_images(root, follow_links=follow_links)
    if old is not None:  # fail before encoding anything
        check_backend(index_dir, old.backend["name"], backend)
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
    backend_record = _backend(old, index_dir, backend, len(kept))
    ivf = None
    if backend_record["name"] == IVF:
        trained, params, lists = _ivf_state(old, rows, kept, reusable)
        backend_record.update(params.as_record())
        ivf = (ivf_to_bytes(trained), lists)
    manifest = {
        **settings,
        "model": model_print,
        "image_root": str(root),
        "follow_links": follow_links,
        "backend": backend_record,
        "files": [e.as_record() for e in kept],
    }
    commit_index(index_dir, manifest, rows, ivf)
    removed = len({e.path for e in old.entries} - {e.path for e in entries}) if old else 0
    report = IndexReport(len(kept), len(embedded), len(kept) - len(embedded), removed, backend_record["name"], skipped)
    log.info(
        "Indexed %d images (%d encoded, %d reused, %d removed) in %s with the %s backend.",
        report.total,
        report.encoded,
        report.reused,
        report.removed,
        index_dir,
        report.backend,
    )
    return report
