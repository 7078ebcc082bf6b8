"""Collectives for data-parallel training: a gradient-carrying all-gather and the re-assembly of sharded evaluation.

Plain `torch.distributed`, so the loss code can be tested in bare process groups without Lightning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable `value`, in rank order (`[value]` in a single process)."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def any_rank_flag(flag: Tensor) -> Tensor:
    """1.0 where `flag` (a scalar tensor) is set on any rank, else 0.0: a float copy, all-reduced in stream order
    (no host synchronisation; read it later, e.g. through `utils.deferred.DeferredScalars`).
    """
    total = flag.detach().float().clone()
    if world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return total


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate `tensor` (B, ...) of every rank into (world * B, ...), in rank order; B must match on all ranks.

    The backward pass sums each rank's gradient of its copy of the gathered tensor back into the local shard. When
    every rank computes the same loss on the gathered batch, the shard's gradient is therefore world_size times the
    single-process one, which DDP's averaging of parameter gradients divides out again.
    """
    if world_size() == 1:
        return tensor
    with warnings.catch_warnings():
        # torch marks this autograd collective deprecated, but its replacement is private (_functional_collectives).
        warnings.filterwarnings(
            "ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated", category=FutureWarning
        )
        return torch.cat(dist_fn.all_gather(tensor), dim=0)


def all_gather_stacked(tensor: Tensor) -> Tensor:
    """(world, *tensor.shape): every rank's `tensor`, without gradient; (1, ...) in a single process."""
    if world_size() == 1:
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def gather_strided_shards(local: Tensor, gather: Callable[[Tensor], Tensor] = all_gather_stacked) -> Tensor:
    """Re-assemble a dataset that was sharded with a stride (rank r held items r, r + W, r + 2W, ...).

    Shards differ in length by at most one, so each is padded to the longest before gathering; the padding rows land
    at positions >= the dataset size and are cut off. The result is the dataset in its original order, identical on
    every rank.

    Shapes:
        local: (n_r, ...) the rows of this rank's shard, in shard order.
        gather: (m, ...) -> (W, m, ...) stacking every rank's tensor.
        returns: (sum_r n_r, ...).
    """
    count = torch.tensor([local.shape[0]], device=local.device)
    counts = gather(count).flatten()
    total, longest = int(counts.sum()), int(counts.max())
    padded = torch.cat([local, local.new_zeros((longest - local.shape[0], *local.shape[1:]))])
    stacked = gather(padded)  # (W, longest, ...): stacked[r, j] is item j * W + r
    return stacked.transpose(0, 1).reshape(-1, *local.shape[1:])[:total]
