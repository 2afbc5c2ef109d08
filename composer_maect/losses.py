"""Contrastive loss of MAE-CT: the symmetric NNCLR InfoNCE over the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from composer_maect import distributed

__all__ = ['nnclr_loss']


def nnclr_loss(
    predicted0: torch.Tensor,
    predicted1: torch.Tensor,
    nn0: torch.Tensor,
    nn1: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Compute the symmetric NNCLR InfoNCE loss of one rank, as the official MAE-CT code does.

    Shapes, with ``n`` local samples, ``N = n * world_size`` global samples and ``r`` this rank:

    * ``predicted0``, ``predicted1`` ``[n, dim]``: predictor outputs of views 0 and 1, unnormalised, with gradient.
    * ``nn0``, ``nn1`` ``[n, dim]``: the queue neighbours of views 0 and 1, unit rows, treated as constants.

    Each prediction is L2-normalised and all-gathered with gradient into ``P`` ``[N, dim]``. The neighbour of one view
    is the anchor and the prediction of the other view of the same image is its positive:
    ``logits0 = nn1 @ P0.T / temperature`` ``[n, N]`` with targets ``n * r .. n * (r + 1) - 1``, and ``logits1`` the
    same with ``nn0`` and ``P1``. The other ``N - 1`` predictions of that view are the negatives. The loss is the mean
    of the two cross-entropies, each averaged over the ``n`` local rows.

    Averaged over ranks, the per-rank losses equal the loss of the whole global batch in one process. The gradient
    flows only into the predictions. Everything runs in float32 with autocast disabled, so the result is a float32
    scalar under any precision.

    Args:
        predicted0: Predictions of view 0 ``[n, dim]``.
        predicted1: Predictions of view 1 ``[n, dim]``.
        nn0: Neighbours of view 0's projections ``[n, dim]``.
        nn1: Neighbours of view 1's projections ``[n, dim]``.
        temperature: Softmax temperature, positive (0.15 to 0.35 in MAE-CT).

    Raises:
        ValueError: If ``temperature`` is not positive or the four inputs do not share one ``[n, dim]`` shape.
    """
    if not temperature > 0:
        raise ValueError(f'temperature must be positive, got {temperature}.')
    inputs = {'predicted0': predicted0, 'predicted1': predicted1, 'nn0': nn0, 'nn1': nn1}
    shapes = {name: tuple(tensor.shape) for name, tensor in inputs.items()}
    if len(set(shapes.values())) != 1 or predicted0.dim() != 2 or predicted0.shape[0] == 0:
        raise ValueError(f'predicted0, predicted1, nn0 and nn1 must share one non-empty shape [n, dim], got {shapes}.')

    with torch.autocast(device_type=predicted0.device.type, enabled=False):
        loss0 = _one_direction(predicted0, nn1, temperature)
        loss1 = _one_direction(predicted1, nn0, temperature)
        return (loss0 + loss1) / 2


def _one_direction(predicted: torch.Tensor, anchors: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of local anchors ``[n, dim]`` against all ranks' normalised predictions of the other view."""
    local_rows = predicted.shape[0]
    predictions = distributed.all_gather_with_grad(F.normalize(predicted.float(), dim=-1))  # [N, dim]
    logits = anchors.detach().float() @ predictions.T / temperature  # [n, N]
    start = local_rows * distributed.rank()
    targets = torch.arange(start, start + local_rows, device=logits.device)
    return F.cross_entropy(logits, targets)
