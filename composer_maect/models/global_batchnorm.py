"""Batch normalisation with statistics over the global batch, on any device.

``torch.nn.SyncBatchNorm`` rejects CPU tensors, so the NNCLR head uses this module instead: in training mode with
more than one rank it all-gathers per-rank sums (with gradient) and normalises with the mean and variance of the whole
global batch, which is what a single process with the global batch computes. Otherwise it is ``nn.BatchNorm1d``.
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

        x32 = x.float()
        local = torch.cat([x32.sum(0), (x32 * x32).sum(0), x32.new_tensor([x32.shape[0]])])  # [2C + 1]
        total = distributed.all_gather_with_grad(local.unsqueeze(0)).sum(0)
        channels = x.shape[1]
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels : 2 * channels] / count - mean * mean).clamp_min(0.0)  # biased, for normalising

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

    Returns the converted module (a new object when ``module`` itself is a ``BatchNorm1d``). Call it before the
    parameters are handed to an optimizer, because the replacements have new parameter objects.
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
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        replacement = convert_to_global_batchnorm(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module
