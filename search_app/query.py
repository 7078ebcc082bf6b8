"""Rank indexed images for sentences: open an index with its model, score by cosine with the index's backend,
report top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from search_app.backends import AUTO
from search_app.encoder import SearchEncoder, fingerprint, load_encoder, same_weights
from search_app.manifest import SearchIndex, SearchIndexError, check_backend


@dataclass(frozen=True)
class Hit:
    """One ranked image: 1-based rank, path relative to the indexed folder, cosine similarity."""

    rank: int
    path: str
    score: float


@dataclass(frozen=True)
class QueryResult:
    query: str
    hits: list[Hit]


def read_queries(sentences: Sequence[str], file: str | Path | None = None) -> list[str]:
    """Sentences from the command line, then one per non-blank line of `file` (UTF-8).

    Raises:
        SearchIndexError: no sentence at all, or `file` missing or not UTF-8.
    """
    queries = [s.strip() for s in sentences if s.strip()]
    if file is not None:
        try:
            lines = Path(file).read_text(encoding="utf-8-sig").splitlines()  # a BOM (Windows editors) is not text
        except FileNotFoundError as err:
            raise SearchIndexError(f"query file {file} does not exist.") from err
        except UnicodeDecodeError as err:
            raise SearchIndexError(
                f"query file {file} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8."
            ) from err
        queries += [line.strip() for line in lines if line.strip()]
    if not queries:
        raise SearchIndexError("no query: pass sentences as arguments or --file with one sentence per line.")
    return queries


def open_search(
    index_dir: str | Path,
    model: str | Path | None = None,
    *,
    device: torch.device | None = None,
    text_attention_mask: bool | None = None,
    backend: str = AUTO,
) -> tuple[SearchIndex, SearchEncoder]:
    """Load an index and the model that built it (or `model`, which must have the same weights).

    Args:
        index_dir: Folder written by `build_index`.
        model: Checkpoint or exported folder; default: the one recorded in the index.
        device: Where to encode queries.
        text_attention_mask: Override the index's recorded setting.
        backend: `auto` (the index's) or the backend the index was built with.

    Raises:
        SearchIndexError: `model`'s weights differ from the index's (its embeddings would not be comparable), or
            `backend` is not the index's.
    """
    index = SearchIndex.load(index_dir)
    check_backend(index_dir, index.backend["name"], backend)
    recorded = index.manifest["model"]
    model = Path(model or recorded["path"])
    current = fingerprint(model, recorded if str(model.resolve()) == recorded["path"] else None)
    if not same_weights(recorded, current):
        raise SearchIndexError(
            f"index {index_dir} was built with {recorded['path']} but {model} has other weights; "
            "query with that model or re-index with this one."
        )
    mask = index.manifest["text_attention_mask"] if text_attention_mask is None else text_attention_mask
    return index, load_encoder(model, device=device, text_attention_mask=mask)


def search(index: SearchIndex, encoder: SearchEncoder, queries: Sequence[str], k: int = 10) -> list[QueryResult]:
    """Top-`k` images per query by cosine similarity (embeddings are L2-normalised), best first.

    An approximate (`faiss-ivf`) index may return fewer than `k` when the lists it scans hold fewer images.
    """
    if k < 1:
        raise SearchIndexError(f"k must be at least 1, got {k}.")
    text = encoder.encode_texts(list(queries))  # (Q, D)
    scores, rows = index.ranker().search(text, k)  # (Q, k) each; row -1 marks a missing hit
    paths = index.paths
    return [
        QueryResult(query, [Hit(r + 1, paths[i], s) for r, (s, i) in enumerate(zip(row_s, row_i)) if i >= 0])
        for query, row_s, row_i in zip(queries, scores.tolist(), rows.tolist(), strict=True)
    ]


def results_json(results: Sequence[QueryResult]) -> list[dict[str, Any]]:
    """Plain JSON-ready dicts: [{"query", "hits": [{"rank", "path", "score"}]}]."""
    return [asdict(result) for result in results]


def format_results(results: Sequence[QueryResult]) -> str:
    """Human-readable ranking, one block per query."""
    blocks = []
    for result in results:
        lines = [f"query: {result.query}"]
        lines += [f"  {hit.rank:>3}  {hit.score:+.4f}  {hit.path}" for hit in result.hits]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
