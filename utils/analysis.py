"""Pictures of what a retrieval evaluation got wrong and how the similarities are distributed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from utils.visualize import FailureRow, failure_gallery, similarity_histogram


def failed_queries(sim_t2i: Tensor, text_pids: Tensor, image_pids: Tensor, *, count: int, seed: int = 0) -> Tensor:
    """Indices of up to `count` text queries whose top-ranked image shows another person (a seeded sample).

    Shapes:
        sim_t2i: (Q, G), text_pids: (Q,), image_pids: (G,) -> (<= count,)
    """
    top1 = sim_t2i.argmax(dim=1)
    failures = torch.nonzero(image_pids[top1] != text_pids).flatten()
    order = torch.randperm(len(failures), generator=torch.Generator().manual_seed(seed))
    return failures[order[:count]].sort().values


def save_failure_gallery(
    sim_t2i: Tensor,
    text_pids: Tensor,
    image_pids: Tensor,
    captions: Sequence[str],
    load_image: Callable[[int], Image.Image],
    out_path: str | Path,
    *,
    count: int = 8,
    top_k: int = 10,
    thumb_size: tuple[int, int] = (96, 48),
) -> Path:
    """Draw failed t2i queries: caption, top-k gallery images (green: right person, red: wrong), one true image.

    `load_image(gallery_index)` opens a gallery image, so only the pictures drawn are read from disk.
    """
    sim_t2i, text_pids, image_pids = sim_t2i.cpu(), text_pids.cpu(), image_pids.cpu()
    rows = []
    for query in failed_queries(sim_t2i, text_pids, image_pids, count=count).tolist():
        ranked = sim_t2i[query].topk(min(top_k, sim_t2i.shape[1])).indices.tolist()
        true = torch.nonzero(image_pids == text_pids[query]).flatten()
        rows.append(
            FailureRow(
                caption=captions[query],
                ranked=[load_image(index) for index in ranked],
                correct=[bool(image_pids[index] == text_pids[query]) for index in ranked],
                true_image=load_image(int(true[0])) if len(true) else None,
            )
        )
    return failure_gallery(rows, out_path, thumb_size=thumb_size)


def save_similarity_histogram(sim_t2i: Tensor, text_pids: Tensor, image_pids: Tensor, out_path: str | Path) -> Path:
    """Histogram of positive-pair (same person) and negative-pair text-image cosine similarities."""
    positive = (text_pids.view(-1, 1) == image_pids.view(1, -1)).cpu()
    sim = sim_t2i.float().cpu()
    return similarity_histogram(sim[positive].numpy(), sim[~positive].numpy(), out_path)
