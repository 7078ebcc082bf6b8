"""Derived splits: a validation set held out from the training identities when a dataset has none.

VN3K's `validate` split is empty in practice, and selecting checkpoints on the test split (what IRRA, TBPS-CLIP and
the original project do) makes reported numbers optimistic. Holding out whole identities keeps validation disjoint
from both training (no shared person) and test.
"""

from __future__ import annotations

import dataclasses
import logging
import random

from data.readers import DatasetSplits, EvalSplit, TrainSample
from utils.errors import InputError

log = logging.getLogger(__name__)


def hold_out_identities(splits: DatasetSplits, num_identities: int, seed: int) -> DatasetSplits:
    """Move `num_identities` randomly chosen training identities into a new validation split.

    Training pids are remapped to stay contiguous (0..N-1); validation keeps the original training pid values
    (only equality matters in evaluation). Each held-out image becomes a gallery item and each of its captions a
    query.
    """
    train_ids = sorted({sample.pid for sample in splits.train})
    if not 0 < num_identities < len(train_ids):
        raise InputError(
            f"dataset.val_identities={num_identities} must be between 1 and {len(train_ids) - 1} "
            f"(the training split of {splits.name} has {len(train_ids)} identities)."
        )
    held_out = set(random.Random(seed).sample(train_ids, num_identities))
    kept = [pid for pid in train_ids if pid not in held_out]
    remap = {pid: new for new, pid in enumerate(kept)}

    images: dict[tuple[int, int], TrainSample] = {}
    captions: list[TrainSample] = []
    for sample in splits.train:
        if sample.pid in held_out:
            images.setdefault((sample.pid, sample.image_id), sample)
            captions.append(sample)
    val = EvalSplit(
        image_pids=[s.pid for s in images.values()],
        image_paths=[s.image_path for s in images.values()],
        caption_pids=[s.pid for s in captions],
        captions=[s.caption for s in captions],
    )
    train = [dataclasses.replace(s, pid=remap[s.pid]) for s in splits.train if s.pid not in held_out]
    log.info(
        "Held out %d training identities (%d images, %d captions) as the validation split.",
        num_identities,
        len(val.image_paths),
        len(val.captions),
    )
    return dataclasses.replace(splits, train=train, val=val)
