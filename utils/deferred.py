"""Scalars read back from the GPU a few steps after they were computed, so that reading them never stalls the host.

Reading a GPU value on the host (`.item()`, `float()`, a logger's conversion) waits for every kernel queued before it:
after such a read the GPU idles until the host has prepared and queued the next step. Logging every step that way
costs that gap every step. `DeferredScalars` copies a step's scalars into pinned host memory without waiting and
hands them out `lag` steps later, when the GPU has long computed them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor


class _Pending(NamedTuple):
    key: Hashable
    names: list[str]
    values: Tensor  # (len(names),) on the host, pinned when copied from a GPU
    copied: torch.cuda.Event | None  # recorded after the copy was queued; None for CPU values


class DeferredScalars:
    """A first-in first-out queue of named scalars that are read on the host only once `lag` newer entries exist.

    The release depends only on how many entries were put, never on how fast the GPU is: every process of a
    distributed run releases an entry at the same step, so a decision taken on the values (stopping on a non-finite
    loss) is taken by all of them at once. CPU values follow the same order and lag.
    """

    def __init__(self, lag: int = 2):
        """Args:
        lag: Entries kept back; 0 reads each entry as soon as `take` is called (which then waits for the GPU).
        """
        if lag < 0:
            raise ValueError(f"lag must be >= 0, got {lag}")
        self.lag = lag
        self._pending: deque[_Pending] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, key: Hashable, values: Mapping[str, Tensor]) -> None:
        """Queue the copy of scalar tensors (all on one device) to the host, without waiting for them.

        Shapes: each value has one element.
        """
        names = list(values)
        stacked = torch.stack([value.detach().float().reshape(()) for value in values.values()])
        if not stacked.is_cuda:
            self._pending.append(_Pending(key, names, stacked, None))
            return
        host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
        host.copy_(stacked, non_blocking=True)  # from pinned memory the copy is queued, not waited for
        copied = torch.cuda.Event()
        copied.record()
        self._pending.append(_Pending(key, names, host, copied))

    def take(self, *, everything: bool = False) -> list[tuple[Hashable, dict[str, float]]]:
        """The entries older than the newest `lag` (every entry with `everything`), oldest first, as Python floats.

        Waits only for those entries' copies, which the GPU has usually finished by then.
        """
        keep = 0 if everything else self.lag
        ready = []
        while len(self._pending) > keep:
            entry = self._pending.popleft()
            if entry.copied is not None:
                entry.copied.synchronize()
            ready.append((entry.key, dict(zip(entry.names, entry.values.tolist(), strict=True))))
        return ready

    def clear(self) -> None:
        """Drop every entry unread."""
        self._pending.clear()
