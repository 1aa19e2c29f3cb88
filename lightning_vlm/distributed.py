"""Cross-rank gathering for contrastive negatives; the identity on a single process.

Rank and world size are read when called, never stored, so the same loss runs on CPU, DDP and FSDP.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

_local_only = False


def _world() -> tuple[int, int]:
    """(rank, world size) of the default group, or (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized() and not _local_only:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def local_batch() -> Iterator[None]:
    """Within it, losses see this rank's batch only: evaluation batches may differ in size between ranks."""
    global _local_only
    previous, _local_only = _local_only, True
    try:
        yield
    finally:
        _local_only = previous


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient for this rank's shard.

    Backward all-reduces the full gradient (works on gloo and NCCL alike) and keeps the local slice.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = _world()
        ctx.rank, ctx.size = rank, x.shape[0]
        shards = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(shards, x.contiguous())
        return torch.cat(shards)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate every rank's x (equal shapes) along dim 0, ranks in order; gradients reach the local shard."""
    if _world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_objects(obj: object) -> list[object] | None:
    """Every rank's ``obj`` (picklable), in rank order, for evaluation that scores a whole split; None without
    an initialised process group. Unlike the loss gathers, this ignores `local_batch`."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    parts: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def rank_offset(local_batch: int) -> int:
    """Row of this rank's first sample in the gathered batch (equal local batches assumed)."""
    return _world()[0] * local_batch
