"""Collectives over the default process group that also work in a single process.

Every function here falls back to single-process behaviour when ``torch.distributed`` is unavailable or not
initialised, so the same code runs in a plain script, in a unit test and under ``composer -n N``.

The gathers concatenate along dim 0 in rank order. Every rank must pass a tensor of the same shape and dtype, because
``torch.distributed.all_gather`` neither pads nor checks this and fails or hangs on a mismatch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ['all_gather_no_grad', 'all_gather_with_grad', 'is_distributed', 'rank', 'world_size']


def is_distributed() -> bool:
    """Return whether ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Return this process's rank in the default group, or 0 without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def world_size() -> int:
    """Return the number of ranks in the default group, or 1 without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` ``[n, ...]`` from all ranks into ``[n * world_size, ...]``, detached from autograd.

    In a single process this returns ``tensor.detach()``, so the result never carries gradient in either setting.
    """
    if not is_distributed():
        return tensor.detach()
    with torch.no_grad():
        return _gather(tensor.detach())


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the incoming gradient over ranks and returns this rank's rows."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.local_rows = tensor.shape[0]
        ctx.rank = dist.get_rank()
        return _gather(tensor)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on every rank's rows, so the gradient of this rank's rows is the sum of the
        # gradients that all ranks computed for them.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_rows
        return grad[start : start + ctx.local_rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` ``[n, ...]`` from all ranks into ``[n * world_size, ...]``, keeping autograd.

    The backward pass all-reduces (sums) the gradient of the gathered tensor and returns this rank's ``n`` rows. If
    each rank then backpropagates its own loss and DDP averages the parameter gradients, the parameters receive the
    gradient of the mean of the per-rank losses. That matches a one-process run on the global batch whenever the
    global loss is the mean of the per-rank losses, as it is for :func:`composer_maect.losses.nnclr_loss` with equal
    local batches.

    Every rank must call backward through the result, because the backward pass is a collective. In a single process
    this returns ``tensor`` itself.
    """
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)
