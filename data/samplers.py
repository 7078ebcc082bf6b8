"""Identity-balanced batch sampling ("P identities x K instances", as in IRRA and TransReID)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from itertools import chain, zip_longest

import numpy as np
import torch

from utils.errors import InputError


class IdentitySampler(torch.utils.data.Sampler[int]):
    """N identities x K instances per batch, grouped by PERSON id (the seed grouped by image id, a defect).

    Each epoch, every identity's samples are shuffled and cut into chunks of K (an identity with fewer than K
    samples is padded by drawing its own samples again, the only time anything repeats). Inside an identity the
    order interleaves its images, so a chunk holds as many distinct images as the identity has. Chunks are then
    dealt into batches of P = batch_size // K distinct identities. As in TransReID each sample is used about once
    per epoch, and every identity appears in at least one batch unless it falls in the remainder that cannot fill
    a batch.

    The number of batches depends only on how many chunks each identity has, not on the shuffle, so ``len()`` is
    exact and the same every epoch: the largest B with ``sum_i min(chunks_i, B) >= P * B``.

    Distributed (``num_replicas`` W > 1): the sampler builds the global batches of W * P distinct identities and
    rank r takes the r-th group of P identities of each. Ranks thus hold disjoint identities at every step and the
    same number of batches, and the union of their step-t batches is the step-t batch of a single process sampling
    W times the batch size with the same seed.

    Args:
        pids: Person id of every dataset index.
        image_ids: Image id of every dataset index (captions of one image share it).
        batch_size: Indices per batch (per rank); yielded indices come in consecutive full batches.
        num_instance: K, samples per identity in a batch.
        seed: Base seed; the order is a function of ``(seed, epoch)`` only.
        num_replicas: W, data-parallel processes.
        rank: This process's index in [0, W).
    """

    def __init__(
        self,
        pids: Sequence[int],
        image_ids: Sequence[int],
        batch_size: int,
        num_instance: int,
        seed: int = 0,
        *,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if len(pids) != len(image_ids):
            raise ValueError(f"pids and image_ids must have the same length, got {len(pids)} and {len(image_ids)}")
        if num_instance <= 0 or batch_size <= 0 or batch_size % num_instance:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of num_instance ({num_instance})")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.batch_size = batch_size
        self.num_instance = num_instance
        self.ids_per_rank = batch_size // num_instance
        self.ids_per_batch = self.ids_per_rank * num_replicas  # distinct identities in one global batch
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        # pid -> image_id -> dataset indices, in first-seen order so the grouping itself is deterministic.
        groups: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for index, (pid, image_id) in enumerate(zip(pids, image_ids)):
            groups[pid][image_id].append(index)
        self._groups = [list(images.values()) for images in groups.values()]
        if len(self._groups) < self.ids_per_batch:
            raise InputError(
                f"the identity sampler needs {self.ids_per_batch} training identities for one batch (dataset."
                f"batch_size {batch_size} / dataset.num_instance {num_instance} x {num_replicas} processes), but the "
                f"data has {len(self._groups)}: lower dataset.batch_size, raise dataset.num_instance or use fewer "
                "processes (trainer.devices)"
            )
        chunk_counts = [max(sum(map(len, images)), num_instance) // num_instance for images in self._groups]
        self.num_batches = _max_batches(chunk_counts, self.ids_per_batch)

    def set_epoch(self, epoch: int) -> None:
        """Selects the shuffle of ``epoch``; call it before iterating each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        # Chunks grouped by identity, identities in random order; each identity contributes at most num_batches
        # chunks and the surplus at the tail is dropped.
        chunks = [
            chunk
            for group in rng.permutation(len(self._groups))
            for chunk in self._identity_chunks(self._groups[group], rng)[: self.num_batches]
        ][: self.num_batches * self.ids_per_batch]
        # Dealing chunk k to batch k % B puts an identity's (at most B, consecutive) chunks in distinct batches.
        batches = [chunks[b :: self.num_batches] for b in range(self.num_batches)]
        mine = slice(self.rank * self.ids_per_rank, (self.rank + 1) * self.ids_per_rank)
        for b in rng.permutation(self.num_batches):
            yield from chain.from_iterable(batches[b][mine])

    def _identity_chunks(self, images: list[list[int]], rng: np.random.Generator) -> list[list[int]]:
        """Shuffles one identity's samples into chunks of K, spreading each chunk over distinct images."""
        per_image = [list(indices) for indices in images]
        for indices in per_image:
            rng.shuffle(indices)
        rng.shuffle(per_image)
        # Round-robin over images: first one caption of every image, then a second one, and so on.
        order = [index for layer in zip_longest(*per_image) for index in layer if index is not None]
        if len(order) < self.num_instance:
            order += [order[i] for i in rng.integers(len(order), size=self.num_instance - len(order))]
        k = self.num_instance
        return [order[start : start + k] for start in range(0, len(order) - k + 1, k)]


def _max_batches(chunk_counts: Sequence[int], ids_per_batch: int) -> int:
    """Largest B such that B batches of ``ids_per_batch`` distinct identities can be filled from the chunks.

    ``sum_i min(c_i, B) - P * B`` is concave in B and zero at B = 0, so the feasible B form an interval found by
    bisection.
    """
    low, high = 0, sum(chunk_counts) // ids_per_batch
    while low < high:
        mid = (low + high + 1) // 2
        if sum(min(count, mid) for count in chunk_counts) >= ids_per_batch * mid:
            low = mid
        else:
            high = mid - 1
    return low


class StridedShardSampler(torch.utils.data.Sampler[int]):
    """Rank r of W evaluates items r, r + W, r + 2W, ... of a dataset: every item exactly once, nothing padded.

    (torch's DistributedSampler repeats items to even out the shards, which would count some queries twice.)
    `utils.distributed.gather_strided_shards` puts the gathered features back in dataset order.
    """

    def __init__(self, dataset_size: int, num_replicas: int, rank: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.indices = range(rank, dataset_size, num_replicas)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
