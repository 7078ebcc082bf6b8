"""Identity-balanced batch sampling ("P identities x K instances", as in IRRA and TransReID)."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice, zip_longest

import numpy as np
import torch

from data.datasets import EpochTaggedSampler
from utils.errors import InputError

log = logging.getLogger(__name__)


#: `dataset.sampler_coverage` values of the identity sampler.
COVERAGES = ("chunks", "all")
#: `dataset.sampler`: torch's shuffled (distributed) sampler, or `IdentitySampler`.
SAMPLERS = ("random", "identity")


@dataclass(frozen=True)
class EpochCoverage:
    """How one epoch of the identity sampler used the dataset (all ranks together)."""

    samples: int  # dataset size
    used: int  # distinct samples drawn at least once
    dropped: int  # samples never drawn
    duplicated: int  # draws beyond the first of a sample

    def describe(self) -> str:
        return f"{self.used} of {self.samples} samples used, {self.dropped} dropped, {self.duplicated} duplicate draws"


class IdentitySampler(torch.utils.data.Sampler[int]):
    """P identities x K instances per batch, grouped by PERSON id (IRRA, TransReID).

    Each epoch, every identity's samples are shuffled (interleaving its images, so a chunk holds as many distinct
    images as the identity has) and cut into chunks of K. Batches are then dealt from the chunks so that the P chunks
    of a batch belong to P distinct identities drawn at random (`_deal`): which people meet in a batch changes from
    batch to batch, so each identity sees many different negatives in an epoch. The number of full batches B is the
    largest with ``sum_i min(chunks_i, B) >= P * B``; it depends only on the chunk counts, so ``len()`` is exact and
    the same every epoch.

    What happens to the samples that do not fill a chunk is ``coverage``:

    - ``"chunks"`` (default; the re-ID field's RandomIdentitySampler convention): an identity with n >= K samples
      drops its n mod K leftovers; an identity with fewer than K samples forms one chunk padded by cycling its own
      samples (so a sample repeats only once all of the identity's samples are in the chunk); chunks beyond B per
      identity and beyond P * B in total are dropped. An epoch therefore skips some samples and repeats others: the
      counts are logged every epoch (`last_coverage`).
    - ``"all"``: every sample is drawn once per epoch. Full chunks fill the B identity-balanced batches; every other
      sample (leftovers, identities with fewer than K samples, surplus chunks) goes, grouped by identity, into extra
      batches at the end of the shuffle order, which are not P x K balanced; the last one is completed with samples
      drawn a second time.

    Distributed (``num_replicas`` W > 1): the sampler builds global batches of W * batch_size (W * P distinct
    identities in the balanced ones) and rank r takes the r-th slice of batch_size of each. Ranks thus hold disjoint
    identities at every balanced step and the same number of batches, and the union of their step-t batches is the
    step-t batch of a single process sampling W times the batch size with the same seed.

    Args:
        pids: Person id of every dataset index.
        image_ids: Image id of every dataset index (captions of one image share it).
        batch_size: Indices per batch (per rank); yielded indices come in consecutive full batches.
        num_instance: K, samples per identity in a batch.
        seed: Base seed; the order is a function of ``(seed, epoch)`` only.
        num_replicas: W, data-parallel processes.
        rank: This process's index in [0, W).
        coverage: ``"chunks"`` or ``"all"``, see above.
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
        coverage: str = "chunks",
    ) -> None:
        if len(pids) != len(image_ids):
            raise ValueError(f"pids and image_ids must have the same length, got {len(pids)} and {len(image_ids)}")
        if num_instance <= 0 or batch_size <= 0 or batch_size % num_instance:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of num_instance ({num_instance})")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        if coverage not in COVERAGES:
            raise ValueError(f"coverage must be one of {COVERAGES}, got {coverage!r}")
        self.batch_size = batch_size
        self.num_instance = num_instance
        self.ids_per_batch = batch_size // num_instance * num_replicas  # distinct identities in one global batch
        self.global_batch_size = batch_size * num_replicas
        self.rank = rank
        self.seed = seed
        self.coverage = coverage
        self.epoch = 0
        self.num_samples = len(pids)
        self.last_coverage: EpochCoverage | None = None
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
        sizes = [sum(map(len, images)) for images in self._groups]
        padded = coverage == "chunks"  # an identity smaller than K still forms one (padded) chunk
        chunk_counts = [(max(n, num_instance) if padded else n) // num_instance for n in sizes]
        self.balanced_batches = _max_batches(chunk_counts, self.ids_per_batch)
        placed = self.balanced_batches * self.global_batch_size
        leftovers = 0 if padded else self.num_samples - placed
        self.num_batches = self.balanced_batches + math.ceil(leftovers / self.global_batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Selects the shuffle of ``epoch``; call it before iterating each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        batches, coverage = self.global_batches(self.epoch)
        self.last_coverage = coverage
        if self.rank == 0:
            log.info("identity sampler, epoch %d (%s coverage): %s", self.epoch, self.coverage, coverage.describe())
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for batch in batches:
            yield from batch[mine]

    def global_batches(self, epoch: int) -> tuple[list[list[int]], EpochCoverage]:
        """The epoch's global batches (W * batch_size indices each, in yield order) and its coverage counts."""
        rng = np.random.default_rng([self.seed, epoch])
        cap = self.balanced_batches
        chunks, spare = [], []  # chunks: per identity (in a shuffled order), at most B each, P * B in all
        room = cap * self.ids_per_batch
        for group in rng.permutation(len(self._groups)):
            own_chunks, own_spare = self._identity_chunks(self._groups[group], rng)
            kept = own_chunks[: min(cap, room)]
            room -= len(kept)
            if kept:
                chunks.append(kept)
            spare += [index for chunk in own_chunks[len(kept) :] for index in chunk] + own_spare
        batches = [
            list(chain.from_iterable(chunks[identity].pop() for identity in batch))
            for batch in _deal([len(own) for own in chunks], self.ids_per_batch, rng)
        ]
        if self.coverage == "all" and spare:
            size = self.global_batch_size
            shortfall = -len(spare) % size
            spare += rng.choice(self.num_samples, size=shortfall, replace=False).tolist()
            batches += [spare[start : start + size] for start in range(0, len(spare), size)]
        drawn = [index for batch in batches for index in batch]
        used = len(set(drawn))
        return batches, EpochCoverage(self.num_samples, used, self.num_samples - used, len(drawn) - used)

    def _identity_chunks(self, images: list[list[int]], rng: np.random.Generator) -> tuple[list[list[int]], list[int]]:
        """One identity's samples shuffled into chunks of K (spread over distinct images), and the samples left over.

        Under "chunks" coverage an identity with fewer than K samples gives one chunk completed by cycling its own
        samples, and the leftovers are dropped by the caller; under "all" they are returned to be drawn elsewhere.
        """
        per_image = [list(indices) for indices in images]
        for indices in per_image:
            rng.shuffle(indices)
        rng.shuffle(per_image)
        # Round-robin over images: first one caption of every image, then a second one, and so on.
        order = [index for layer in zip_longest(*per_image) for index in layer if index is not None]
        k = self.num_instance
        if len(order) < k and self.coverage == "chunks":
            order = [order[i % len(order)] for i in range(k)]
        cut = len(order) - len(order) % k
        chunks = [order[start : start + k] for start in range(0, cut, k)]
        return chunks, (order[cut:] if self.coverage == "all" else [])


def _deal(chunk_counts: Sequence[int], ids_per_batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Which identities fill each of the B = sum(counts) / P batches: P distinct ones per batch, every identity in
    exactly as many batches as it has chunks (each count <= B), and otherwise at random.

    Batch by batch, an identity whose chunks left equal the batches left must be drawn (it could not fit later);
    the rest of the batch is drawn without replacement with probability proportional to the chunks left, so every
    chunk is about equally likely to land in any batch and identities meet at random, as in the re-ID convention of
    drawing P identities per batch. At most P identities are ever forced (their chunks would otherwise exceed P per
    batch) and at least P have chunks left, so every batch fills. The order within a batch is shuffled too: under
    data parallelism rank r trains the r-th slice.
    """
    left = np.asarray(chunk_counts, dtype=np.int64)
    batches = []
    for batches_left in range(int(left.sum()) // ids_per_batch, 0, -1):
        forced = np.flatnonzero(left == batches_left)
        free = np.flatnonzero((left > 0) & (left < batches_left))
        weights = left[free] / left[free].sum() if len(free) else None
        drawn = rng.choice(free, size=ids_per_batch - len(forced), replace=False, p=weights)
        batch = rng.permutation(np.concatenate([forced, drawn]))
        left[batch] -= 1
        batches.append(batch)
    return batches


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


class ResumableSampler(EpochTaggedSampler):
    """An `EpochTaggedSampler` that can start an epoch part-way, where a run stopped mid-epoch left it.

    `resume_at(epoch, batches_done)` makes the next iteration of `epoch` yield that epoch's order (the wrapped
    sampler's, a function of the seed and the epoch) without its first `batches_done` batches, so a resumed run sees
    exactly the batches the uninterrupted run saw next. The skipped items are still drawn and tagged, so the repeat
    counts of the items that follow are the uninterrupted run's. Selecting another epoch (`set_epoch`, which
    Lightning calls before every epoch) starts that one from its beginning.

    `len()` stays the whole epoch: Lightning's restored batch counter goes on from `batches_done`, and it ends the
    epoch when the iterator runs out.

    Args:
        sampler: The epoch's order (with `set_epoch`).
        batch_size: Items per batch (the loader drops incomplete batches, so positions are whole batches).
    """

    def __init__(self, sampler: torch.utils.data.Sampler[int], batch_size: int) -> None:
        super().__init__(sampler)
        self.batch_size = batch_size
        self.start = 0  # items of `self.epoch` to skip

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Start `epoch` after its first `batches_done` batches (0: from its beginning)."""
        self.set_epoch(epoch)
        self.start = batches_done * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return islice(super().__iter__(), self.start, None)
