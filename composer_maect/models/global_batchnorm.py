"""Batch normalisation with statistics over the global batch, on any device.

``torch.nn.SyncBatchNorm`` rejects CPU tensors, so the NNCLR head uses this module instead. In training mode with more
than one rank it all-gathers per-rank means and squared deviations (with gradient). It then normalises with the mean
and variance of the whole global batch, as a single process with the global batch would. Otherwise it is
``nn.BatchNorm1d``.
"""

from __future__ import annotations

import torch
from torch import nn

from composer_maect import distributed

__all__ = ['GlobalBatchNorm1d', 'convert_to_global_batchnorm']


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics cover the batch of every rank; inputs are ``[B, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or distributed.world_size() == 1:
            return super().forward(x)
        if x.ndim != 2:
            raise ValueError(f'GlobalBatchNorm1d expects inputs [B, C], got shape {tuple(x.shape)}.')

        # Each rank sends its mean and its sum of squared deviations from that mean, and the ranks combine them with
        # the parallel-variance formula. Sums of x and x^2 would lose the variance to rounding when |mean| >> std.
        x32 = x.float()
        channels = x.shape[1]
        local_count = x32.shape[0]
        local_mean = x32.sum(0) / max(local_count, 1)
        local_m2 = ((x32 - local_mean) ** 2).sum(0)
        # torch.full fills on the device. new_tensor([n]) would copy from the host and, on CUDA, wait for the stream.
        count_column = torch.full((1,), float(local_count), dtype=x32.dtype, device=x32.device)
        local = torch.cat([local_mean, local_m2, count_column])  # [2C + 1]
        gathered = distributed.all_gather_with_grad(local.unsqueeze(0))  # [world, 2C + 1]
        means, m2s, counts = gathered[:, :channels], gathered[:, channels : 2 * channels], gathered[:, -1:]
        count = counts.sum()
        mean = (counts * means).sum(0) / count
        var = (m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)) / count  # biased, for normalising

        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach().to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.detach().to(self.running_var.dtype))

        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` in ``module`` by a :class:`GlobalBatchNorm1d` with the same state.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, the replacements take over the original parameter and
    buffer objects, so ``requires_grad`` (for example of a frozen EMA copy) and an optimizer built before the conversion
    stay valid. Returns the converted module (a new object when ``module`` itself is a ``BatchNorm1d``).
    """
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, GlobalBatchNorm1d):
        converted = GlobalBatchNorm1d(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            device=module.running_mean.device if module.running_mean is not None else None,
        )
        for name, param in module.named_parameters(recurse=False):
            setattr(converted, name, param)
        for name, buffer in module.named_buffers(recurse=False):
            setattr(converted, name, buffer)
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        replacement = convert_to_global_batchnorm(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module
