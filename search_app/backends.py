"""Nearest-neighbour engines over L2-normalised embeddings: inner product is the cosine similarity.

- `matmul`: one matrix product and a top-k in torch; exact (the original engine).
- `faiss-flat`: faiss `IndexFlatIP`; exact. It is filled from the embeddings when an index is opened (a copy, no
  training), so nothing but its name is stored.
- `faiss-ivf`: faiss `IndexIVFFlat`; approximate. k-means on a sample splits the gallery into `nlist` lists and a
  query scans only the `nprobe` lists whose centroids are nearest to it. The trained, empty index (the centroids)
  is stored in faiss's own binary format (no pickle) and each row's list number beside its embedding, so opening an
  index refills the lists without a single distance computation, and re-indexing assigns only the new rows.

`auto` picks `faiss-flat` up to `EXACT_UP_TO` images and `faiss-ivf` above; both thresholds and the IVF parameters
come from `bench/search_scale.py` (bench/results/search_scale_cpu.md). faiss runs on every GPU its GPU build sees,
else on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import faiss
import numpy as np
import torch
from faiss.contrib.ivf_tools import add_preassigned
from torch import Tensor

MATMUL, FLAT, IVF, AUTO = "matmul", "faiss-flat", "faiss-ivf", "auto"
BACKENDS = (MATMUL, FLAT, IVF)
#: Largest gallery `auto` searches exactly: where exact faiss search of one query reaches 100 ms on the shared 2-core
#: benchmark machine (bench/results/search_scale_cpu.md).
EXACT_UP_TO = 50_000
#: Share of the lists a query scans: the smallest power-of-two share with recall@10 >= 0.98 at 100k (measured).
NPROBE_FRACTION = 1 / 8
#: Training points per list: faiss's k-means warns below 39; training time grows with it.
TRAIN_POINTS_PER_LIST = 64
#: Re-indexing retrains the lists once the gallery has this many times the rows they were trained with.
RETRAIN_GROWTH = 4.0
IVF_SEED = 0
KMEANS_ITERATIONS = 20
#: Entries of one (queries x gallery) score matrix of the matmul engine: 256 MB of float32.
SCORE_ENTRIES = 64 * 2**20


def resolve_backend(requested: str, num_rows: int) -> str:
    """The backend `requested` names, or for `auto` the one `num_rows` images call for."""
    if requested == AUTO:
        return FLAT if num_rows <= EXACT_UP_TO else IVF
    if requested not in BACKENDS:
        raise ValueError(f"unknown search backend {requested!r}; choose one of {', '.join((AUTO, *BACKENDS))}.")
    return requested


@dataclass(frozen=True)
class IVFParams:
    """How an IVF index was trained and is searched; recorded in the index manifest."""

    nlist: int
    nprobe: int
    train_size: int
    trained_rows: int
    seed: int = IVF_SEED
    niter: int = KMEANS_ITERATIONS

    @classmethod
    def for_size(cls, num_rows: int) -> IVFParams:
        """About 2 sqrt(N) lists (a power of two: training time grows with its square), `NPROBE_FRACTION` of them
        scanned per query, `TRAIN_POINTS_PER_LIST` training rows per list (every row of a small gallery).
        """
        nlist = min(2 ** max(4, round(math.log2(2 * math.sqrt(num_rows)))), max(1, num_rows // 39))
        nprobe = max(1, round(nlist * NPROBE_FRACTION))
        return cls(nlist, nprobe, min(num_rows, TRAIN_POINTS_PER_LIST * nlist), num_rows)

    def as_record(self) -> dict[str, Any]:
        return {"type": "IndexIVFFlat", "metric": "inner_product", **asdict(self)}


class Ranker(Protocol):
    def search(self, queries: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) float32 queries -> (Q, k) scores and (Q, k) row numbers, best first (row -1: fewer than k)."""
        ...


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _on_gpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_cpu_to_all_gpus(index) if faiss.get_num_gpus() > 0 else index


class MatmulRanker:
    """Exact: the (Q, N) score matrix in torch, then its top-k."""

    def __init__(self, embeddings: Tensor):
        self.embeddings = embeddings

    def search(self, queries: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        num_rows = len(self.embeddings)
        chunk = max(1, SCORE_ENTRIES // max(num_rows, 1))  # bounds the (Q, N) score matrix, not the answer
        values, indices = [], []
        for start in range(0, len(queries), chunk):
            scores = queries[start : start + chunk].to(self.embeddings) @ self.embeddings.T  # (q, N)
            top = scores.topk(min(k, num_rows), dim=1)
            values.append(top.values)
            indices.append(top.indices)
        return torch.cat(values).numpy(), torch.cat(indices).numpy()


class FaissRanker:
    """Any faiss index whose ids are row numbers."""

    def __init__(self, index: faiss.Index):
        self.index = _on_gpu(index)

    def search(self, queries: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(_numpy(queries), min(k, self.index.ntotal))


def flat_ranker(embeddings: Tensor | np.ndarray) -> FaissRanker:
    """Exact inner-product search with faiss."""
    x = _numpy(embeddings)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return FaissRanker(index)


def train_ivf(embeddings: Tensor | np.ndarray, params: IVFParams) -> faiss.IndexIVFFlat:
    """An empty IVF index whose `params.nlist` centroids are trained on a seeded sample of `params.train_size` rows."""
    x = _numpy(embeddings)
    sample = np.random.default_rng(params.seed).choice(len(x), params.train_size, replace=False)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], params.nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed, index.cp.niter = params.seed, params.niter
    index.train(x[np.sort(sample)])
    return index


def assign_lists(trained: faiss.IndexIVFFlat, embeddings: Tensor | np.ndarray) -> np.ndarray:
    """The (N,) int64 list number of each row: its nearest centroid."""
    x = _numpy(embeddings)
    if not len(x):
        return np.empty(0, dtype=np.int64)
    return trained.quantizer.search(x, 1)[1][:, 0].astype(np.int64)


def ivf_ranker(
    trained: faiss.IndexIVFFlat, embeddings: Tensor | np.ndarray, lists: np.ndarray, nprobe: int
) -> FaissRanker:
    """`trained` (left empty) cloned and filled with every row at its stored list; ids are row numbers."""
    index = faiss.clone_index(trained)
    add_preassigned(index, _numpy(embeddings), np.ascontiguousarray(lists, dtype=np.int64))
    index.nprobe = nprobe
    return FaissRanker(index)


def ivf_to_bytes(trained: faiss.IndexIVFFlat) -> bytes:
    return faiss.serialize_index(trained).tobytes()


def ivf_from_bytes(payload: bytes) -> faiss.IndexIVFFlat:
    index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))  # already its concrete class
    if not isinstance(index, faiss.IndexIVFFlat):
        raise ValueError(f"expected a faiss IndexIVFFlat, found {type(index).__name__}")
    return index
