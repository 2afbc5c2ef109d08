"""Optimizer and learning-rate schedule: AdamW parameter groups, batch-size scaling and warmup-cosine."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from composer.optim import ComposerScheduler, CosineAnnealingScheduler, CosineAnnealingWithWarmupScheduler
from torch import nn

__all__ = ['build_adamw', 'build_scheduler', 'param_groups_weight_decay', 'scaled_lr']

log = logging.getLogger(__name__)

# Learning rates are given per 256 samples, the convention of MAE and MAE-CT.
REFERENCE_BATCH_SIZE = 256


def scaled_lr(base_lr: float, global_batch_size: int, views: int, lr_scaling: str) -> float:
    """Return the actual learning rate for a base rate given per 256 samples.

    Args:
        base_lr: the learning rate for a global batch of 256 samples.
        global_batch_size: images per optimizer step, over all ranks.
        views: views per image; each counts as a sample when ``lr_scaling == 'views'``.
        lr_scaling: ``'images'`` (``base_lr × batch / 256``), ``'views'`` (``base_lr × batch × views / 256``) or
            ``'none'`` (``base_lr``).
    """
    if lr_scaling == 'none':
        return base_lr
    if lr_scaling == 'images':
        return base_lr * global_batch_size / REFERENCE_BATCH_SIZE
    if lr_scaling == 'views':
        return base_lr * global_batch_size * views / REFERENCE_BATCH_SIZE
    raise ValueError(f"Invalid lr_scaling {lr_scaling!r}; expected 'images', 'views' or 'none'.")


def is_excluded_from_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and 1-D parameters (norm weights) get no weight decay; tokens such as ``cls_token`` (3-D) do."""
    return name.endswith('.bias') or param.ndim <= 1


def param_groups_weight_decay(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group; frozen parameters are left out.

    The groups are named ``'decay'`` and ``'no_decay'`` (the ``name`` key), even when ``weight_decay`` is 0.
    """
    decay, no_decay = [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        (no_decay if is_excluded_from_weight_decay(name, param) else decay).append(param)
    groups = []
    if decay:
        groups.append({'params': decay, 'weight_decay': weight_decay, 'name': 'decay'})
    if no_decay:
        groups.append({'params': no_decay, 'weight_decay': 0.0, 'name': 'no_decay'})
    return groups


def build_adamw(
    model: nn.Module, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> torch.optim.AdamW:
    """Create ``torch.optim.AdamW`` over the trainable parameters of ``model``.

    ``torch.optim.AdamW`` decays by ``lr × weight_decay`` per step, as the MAE and MAE-CT recipes assume; Composer's
    ``DecoupledAdamW`` would not.
    """
    groups = param_groups_weight_decay(model.named_parameters(), weight_decay)
    if not groups:
        raise ValueError(f'{type(model).__name__} has no trainable parameters: nothing to optimize.')
    total = sum(p.numel() for group in groups for p in group['params'])
    decayed = sum(p.numel() for group in groups if group['weight_decay'] > 0 for p in group['params'])
    log.info(
        'AdamW lr %.3g over %s parameters (%s with weight decay %g)', lr, f'{total:,}', f'{decayed:,}', weight_decay
    )
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def build_scheduler(warmup: float | str, alpha_f: float = 0.0) -> ComposerScheduler:
    """Linear warmup from 0 then cosine decay to ``alpha_f × lr``, as a Composer scheduler stepped every batch.

    Args:
        warmup: a fraction of the whole run in ``[0, 1)``, or a Composer time string such as ``'20ep'`` or ``'500ba'``.
        alpha_f: the final learning rate as a fraction of the peak.
    """
    if isinstance(warmup, int | float):
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f'Invalid scheduler.warmup {warmup}: a fraction of the run must be in [0, 1).')
        if warmup == 0.0:
            return CosineAnnealingScheduler(alpha_f=alpha_f)
        warmup = f'{warmup}dur'
    return CosineAnnealingWithWarmupScheduler(t_warmup=warmup, alpha_f=alpha_f)
