"""An index folder on disk: its format, loading it, and committing a new version atomically.

An index folder holds `manifest.json` (the model's path and weight hashes, preprocessing, embedding size, the search
backend and its parameters, whether links were followed, and per image its relative path, byte size and mtime, in
row order, plus the resolved target of a followed link), `embeddings.<hash>.safetensors` (float32 (N, D), and for
`faiss-ivf` each row's int64 list number) and for `faiss-ivf` `ivf.<hash>.faiss` (the trained centroids). The
manifest names its other files, so replacing the manifest is the single atomic commit of a new index: a crash
mid-write leaves the previous index intact. Nothing here unpickles: safetensors holds raw tensors, faiss its own
format, the manifest is JSON.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from search_app.backends import (
    AUTO,
    BACKENDS,
    IVF,
    MATMUL,
    MatmulRanker,
    Ranker,
    flat_ranker,
    ivf_from_bytes,
    ivf_ranker,
)
from utils.errors import InputError
from utils.io import atomic_write_bytes, atomic_write_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class SearchIndexError(InputError):
    """An image folder or index folder cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class ImageEntry:
    """One image file: its path relative to the indexed folder (POSIX), byte size and mtime, and for a link followed
    outside the folder its resolved target (absolute).
    """

    path: str
    size: int
    mtime_ns: int
    target: str | None = None

    def as_record(self) -> dict[str, Any]:
        return {key: value for key, value in vars(self).items() if value is not None}


def check_backend(index_dir: str | Path, built: str, requested: str) -> None:
    """Refuse a `requested` backend other than the one the index was `built` with (`auto` takes the index's).

    Raises:
        SearchIndexError: names the index folder, its backend and the fix.
    """
    if requested not in (AUTO, built):
        raise SearchIndexError(
            f"index {index_dir} was built with the {built} backend, not {requested}; pass --backend {built} "
            f"(or auto), or build a {requested} index in another --index folder."
        )


@dataclass
class SearchIndex:
    """A loaded index: the image folder, the files in row order, their (N, D) embeddings, and the manifest; for
    `faiss-ivf` also the trained (empty) IVF index and each row's list number.
    """

    root: Path
    entries: list[ImageEntry]
    embeddings: Tensor
    manifest: dict[str, Any]
    trained_ivf: faiss.IndexIVFFlat | None = None
    lists: Tensor | None = None
    _ranker: Ranker | None = field(default=None, repr=False)

    @property
    def paths(self) -> list[str]:
        return [entry.path for entry in self.entries]

    @property
    def backend(self) -> dict[str, Any]:
        """The manifest's backend record; an index written before backends existed was ranked by matmul."""
        return self.manifest.get("backend", {"name": MATMUL, "requested": AUTO})

    def ranker(self) -> Ranker:
        """The search engine over the rows, built on first use (faiss copies the rows, so only when asked)."""
        if self._ranker is None:
            name = self.backend["name"]
            if name == MATMUL:
                self._ranker = MatmulRanker(self.embeddings)
            elif name == IVF:
                self._ranker = ivf_ranker(self.trained_ivf, self.embeddings, self.lists.numpy(), self.backend["nprobe"])
            else:
                self._ranker = flat_ranker(self.embeddings)
        return self._ranker

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
        backend = manifest.get("backend", {"name": MATMUL})
        if backend.get("name") not in BACKENDS:
            raise SearchIndexError(f"{manifest_path}: unknown backend {backend.get('name')!r}; {rebuild}.")
        try:
            tensors = load_file(embeddings_path)
            embeddings, lists = tensors["embeddings"], tensors.get("lists")
        except (OSError, SafetensorError, KeyError) as err:
            raise SearchIndexError(f"cannot read the embeddings {embeddings_path} ({err}); {rebuild}.") from err
        trained = None
        if backend["name"] == IVF:
            ivf_path = index_dir / backend.get("ivf_file", "?")
            try:
                trained = ivf_from_bytes(ivf_path.read_bytes())
            except (OSError, RuntimeError, ValueError) as err:
                raise SearchIndexError(f"cannot read the IVF index {ivf_path} ({err}); {rebuild}.") from err
            if lists is None or lists.shape != (len(entries),) or trained.d != manifest["embed_dim"]:
                raise SearchIndexError(f"{embeddings_path}: IVF list numbers do not match {MANIFEST}; {rebuild}.")
        if embeddings.shape != (len(entries), manifest["embed_dim"]):
            raise SearchIndexError(
                f"{index_dir}: embeddings {tuple(embeddings.shape)} do not match {len(entries)} files x "
                f"{manifest['embed_dim']} dims in {MANIFEST}; delete the folder and index again."
            )
        return cls(Path(manifest["image_root"]), entries, embeddings, manifest, trained, lists)


def previous_index(index_dir: Path, root: Path) -> SearchIndex | None:
    if not (index_dir / MANIFEST).is_file():
        return None
    old = SearchIndex.load(index_dir)
    if old.root != root:
        raise SearchIndexError(
            f"index {index_dir} was built for images in {old.root}, not {root}; use another --index folder."
        )
    return old


def _write_named(index_dir: Path, stem: str, suffix: str, payload: bytes) -> str:
    """Write `payload` to `<stem>.<content hash>.<suffix>` in `index_dir`; return the file name."""
    name = f"{stem}.{hashlib.sha256(payload).hexdigest()[:16]}.{suffix}"
    atomic_write_bytes(index_dir / name, payload)
    return name


def commit_index(
    index_dir: Path, manifest: dict[str, Any], embeddings: Tensor, ivf: tuple[bytes, Tensor] | None = None
) -> None:
    """Write the embeddings (and an IVF index with its row lists) under content-named files, then the manifest that
    points at them, then tidy up.
    """
    tensors = {"embeddings": embeddings.contiguous()}
    if ivf is not None:
        tensors["lists"] = ivf[1]
        manifest["backend"]["ivf_file"] = _write_named(index_dir, "ivf", "faiss", ivf[0])
    name = _write_named(index_dir, "embeddings", "safetensors", save(tensors))
    atomic_write_json(index_dir / MANIFEST, {**manifest, "embeddings_file": name})
    current = {name, manifest.get("backend", {}).get("ivf_file")}
    for stale in [*index_dir.glob("embeddings.*.safetensors"), *index_dir.glob("ivf.*.faiss")]:
        if stale.name not in current:
            stale.unlink()
