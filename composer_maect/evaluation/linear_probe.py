"""Linear probes on frozen features: one probe per learning rate, all trained together as one batched model.

Each probe is ``BatchNorm1d(D, affine=False)`` followed by ``Linear(D, C)``, as in the MAE and MAE-CT linear probes.
The batch norm has no parameters and receives the same input for every probe, so the probes share one. The ``P``
linear layers are one weight ``[P, D, C]`` applied with ``einsum``, and the loss is the sum of the ``P`` mean
cross-entropies, so every probe gets exactly the gradient it would get alone. SGD with momentum (no dampening, no
Nesterov, weight decay 0) then updates probe ``p`` with its own learning rate ``lrs[p]`` times the shared schedule:
a linear warmup over the first ``warmup_fraction`` of the updates, then cosine annealing to 0.

Two accuracies are reported, because they answer different questions:

* ``val_selected``: the learning rate and epoch with the best accuracy on a held-out part of the train split, and
  the test accuracy of that probe at that epoch. The held-out part is not used for training.
* ``test_selected``: the best test accuracy over all learning rates and epochs. MAE-CT reports this number (the
  maximum over epochs and over 10 learning rates on the ImageNet val set), and it is optimistic, since the test set
  picks the setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['DEFAULT_PROBE_LRS', 'LinearProbeResult', 'cosine_warmup_factor', 'train_linear_probes']

# The MAE-CT probe grid: 0.1, 0.09, ..., 0.01 scaled by batch size 1024 / 256.
DEFAULT_PROBE_LRS = tuple(round(0.04 * step, 2) for step in range(10, 0, -1))


@dataclass
class LinearProbeResult:
    """Accuracies of a grid of linear probes. Accuracies are fractions in ``[0, 1]``, epochs count from 1."""

    lrs: list[float]
    epochs: int
    val_selected: dict | None
    test_selected: dict
    final_test_accuracy: list[float]
    val_accuracy: list[list[float]] | None
    test_accuracy: list[list[float]]
    settings: dict

    def to_dict(self) -> dict:
        return asdict(self)


def cosine_warmup_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Return the learning-rate factor of update ``step`` (0-based): linear warmup to 1, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = (step - warmup_steps) / decay_steps
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_inputs(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
) -> None:
    for name, features, labels in (
        ('train', train_features, train_labels),
        ('test', test_features, test_labels),
    ):
        if features.ndim != 2 or not features.dtype.is_floating_point:
            raise ValueError(
                f'{name}_features must be a float tensor [samples, dim], got {features.dtype} {tuple(features.shape)}.'
            )
        if labels.ndim != 1 or labels.shape[0] != features.shape[0] or labels.dtype.is_floating_point:
            raise ValueError(
                f'{name}_labels must be an integer tensor [{features.shape[0]}], got {labels.dtype} '
                f'{tuple(labels.shape)}.'
            )
        if not torch.isfinite(features).all():
            raise ValueError(f'{name}_features contains NaN or infinite values. The encoder may have diverged.')
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f'test_features has dimension {test_features.shape[1]} but train_features has {train_features.shape[1]}.'
        )
    if test_features.shape[0] == 0:
        raise ValueError('test_features is empty. The linear probe needs at least one test sample.')


def _check_lrs(lrs: Sequence[float]) -> list[float]:
    values = [float(lr) for lr in lrs]
    if not values or not all(math.isfinite(lr) and lr > 0 for lr in values):
        raise ValueError(f'lrs must be a non-empty list of positive learning rates, got {list(lrs)!r}.')
    return values


def _split_holdout(num_samples: int, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Return (fit indices, held-out indices) of a seeded random split. No held-out part for ``val_fraction`` 0."""
    order = torch.randperm(num_samples, generator=generator)
    num_val = round(val_fraction * num_samples) if val_fraction > 0 else 0
    if val_fraction > 0:
        num_val = min(max(num_val, 1), num_samples - 2)
    return order[num_val:], order[:num_val]


class _ProbeGrid(nn.Module):
    """``P`` probes ``BatchNorm1d(D, affine=False) -> Linear(D, C)``: features ``[B, D]`` to logits ``[P, B, C]``."""

    def __init__(self, num_probes: int, dim: int, num_classes: int, init_std: float, generator: torch.Generator):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-5)
        weight = torch.zeros(num_probes, dim, num_classes)
        if init_std > 0:
            # Truncated at +-2 standard deviations, like timm's trunc_normal_(std=0.01).
            weight = torch.randn(num_probes, dim, num_classes, generator=generator).mul_(init_std)
            weight = weight.clamp_(-2 * init_std, 2 * init_std)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(num_probes, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        normed = self.norm(features)
        return torch.einsum('bd,pdc->pbc', normed, self.weight) + self.bias[:, None, :]


@torch.no_grad()
def _accuracy_per_probe(grid: _ProbeGrid, features: torch.Tensor, slots: torch.Tensor, batch_size: int) -> list[float]:
    """Return each probe's accuracy on ``features`` with class slots ``slots`` (-1 never matches)."""
    grid.eval()
    correct = torch.zeros(grid.weight.shape[0], dtype=torch.int64, device=features.device)
    for start in range(0, features.shape[0], batch_size):
        logits = grid(features[start : start + batch_size])
        predictions = logits.argmax(dim=2)  # [P, b]
        correct += (predictions == slots[None, start : start + batch_size]).sum(dim=1)
    grid.train()
    return (correct.double() / features.shape[0]).tolist()


def train_linear_probes(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    lrs: Sequence[float] = DEFAULT_PROBE_LRS,
    epochs: int = 50,
    batch_size: int = 1024,
    momentum: float = 0.9,
    warmup_fraction: float = 0.1,
    val_fraction: float = 0.1,
    init_std: float = 0.01,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> LinearProbeResult:
    """Train one linear probe per learning rate on frozen features and measure their accuracies after every epoch.

    Labels may be any integers: the sorted distinct train labels become the ``C`` classes. Test samples whose label
    no train sample has count as wrong. Every epoch visits the fit samples in a new seeded order in batches of
    ``batch_size``. When there are more fit samples than ``batch_size``, the last partial batch is dropped, so the
    batch norm never normalises a tiny batch.

    Args:
        train_features: ``[N, D]`` float features of the train split.
        train_labels: ``[N]`` integer labels.
        test_features: ``[M, D]`` float features of the test split.
        test_labels: ``[M]`` integer labels.
        lrs: the learning rates of the probes (the grid), at batch size ``batch_size``.
        epochs: passes over the fit samples.
        batch_size: samples per update.
        momentum: SGD momentum.
        warmup_fraction: fraction of all updates with a linear warmup.
        val_fraction: fraction of the train split held out to select the learning rate and epoch. 0 holds out
            nothing, and ``val_selected`` is then None.
        init_std: standard deviation of the truncated-normal init of the weights (biases start at 0). With 0
            every probe starts at zero and is then symmetric in the classes, so renaming classes changes no result.
        seed: seed of the held-out split, the init and the batch order.
        device: device to train on (default: the device of ``train_features``).

    Returns:
        A :class:`LinearProbeResult`. ``val_accuracy`` and ``test_accuracy`` are ``[epochs][P]``.

    Raises:
        ValueError: invalid shapes or dtypes, NaN features, an empty test set, fewer than 3 train samples (2 to fit
            and 1 to hold out), or an invalid hyperparameter (the message names it).
    """
    _check_inputs(train_features, train_labels, test_features, test_labels)
    lrs = _check_lrs(lrs)
    for name, value in (('epochs', epochs), ('batch_size', batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive int, got {value!r}.')
    for name, value, upper in (('momentum', momentum, 1.0), ('warmup_fraction', warmup_fraction, 1.0)):
        if not 0.0 <= value < upper:
            raise ValueError(f'{name} must be in [0, {upper}), got {value!r}.')
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction!r}.')
    if init_std < 0:
        raise ValueError(f'init_std must be non-negative, got {init_std!r}.')
    minimum = 3 if val_fraction > 0 else 2
    if train_features.shape[0] < minimum:
        raise ValueError(
            f'The linear probe needs at least {minimum} train samples, got {train_features.shape[0]}. The batch norm '
            'needs 2 samples per batch, and val_fraction > 0 holds out at least 1.'
        )

    device = torch.device(device) if device is not None else train_features.device
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(train_labels.long(), sorted=True)
    train_slots = torch.searchsorted(classes, train_labels.long())
    test_slots = _known_slots(classes, test_labels.long())

    fit_index, val_index = _split_holdout(train_features.shape[0], val_fraction, generator)
    features = train_features.float()
    fit_features = features[fit_index].to(device)
    fit_slots = train_slots[fit_index].to(device)
    val_features = features[val_index].to(device)
    val_slots = train_slots[val_index].to(device)
    test_features = test_features.float().to(device)
    test_slots = test_slots.to(device)

    grid = _ProbeGrid(len(lrs), features.shape[1], classes.shape[0], init_std, generator).to(device)
    momentum_buffer = [torch.zeros_like(grid.weight), torch.zeros_like(grid.bias)]
    lr_per_probe = torch.tensor(lrs, dtype=torch.float32, device=device)

    num_fit = fit_features.shape[0]
    steps_per_epoch = max(num_fit // batch_size, 1)
    total_steps = steps_per_epoch * epochs
    warmup_steps = round(warmup_fraction * total_steps)
    rows_per_step = batch_size if num_fit > batch_size else num_fit

    val_accuracy: list[list[float]] = []
    test_accuracy: list[list[float]] = []
    step = 0
    grid.train()
    for _ in range(epochs):
        order = torch.randperm(num_fit, generator=generator).to(device)
        for batch in range(steps_per_epoch):
            rows = order[batch * rows_per_step : (batch + 1) * rows_per_step]
            logits = grid(fit_features[rows])  # [P, b, C]
            targets = fit_slots[rows]
            # Sum over probes of each probe's mean loss: probe p's gradient is that of its own loss alone.
            loss = F.cross_entropy(logits.transpose(1, 2), targets[None].expand(len(lrs), -1), reduction='none')
            loss.mean(dim=1).sum().backward()
            factor = cosine_warmup_factor(step, total_steps, warmup_steps)
            _sgd_momentum_step(grid, momentum_buffer, lr_per_probe * factor, momentum)
            step += 1
        if val_index.numel():
            val_accuracy.append(_accuracy_per_probe(grid, val_features, val_slots, batch_size))
        test_accuracy.append(_accuracy_per_probe(grid, test_features, test_slots, batch_size))

    settings = {
        'lrs': lrs,
        'epochs': epochs,
        'batch_size': batch_size,
        'momentum': momentum,
        'weight_decay': 0.0,
        'warmup_fraction': warmup_fraction,
        'schedule': 'linear warmup, then cosine to 0, per update',
        'val_fraction': val_fraction,
        'num_fit_samples': num_fit,
        'num_val_samples': int(val_index.numel()),
        'num_test_samples': int(test_features.shape[0]),
        'num_classes': int(classes.shape[0]),
        'init_std': init_std,
        'seed': seed,
        'head': 'BatchNorm1d(affine=False, eps=1e-5) -> Linear',
    }
    return LinearProbeResult(
        lrs=lrs,
        epochs=epochs,
        val_selected=_best(val_accuracy, lrs, test_accuracy) if val_accuracy else None,
        test_selected=_best(test_accuracy, lrs, test_accuracy),
        final_test_accuracy=test_accuracy[-1],
        val_accuracy=val_accuracy or None,
        test_accuracy=test_accuracy,
        settings=settings,
    )


def _known_slots(classes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Map labels to class slots, with -1 for labels outside ``classes``."""
    positions = torch.searchsorted(classes, labels).clamp(max=classes.shape[0] - 1)
    return torch.where(classes[positions] == labels, positions, torch.full_like(positions, -1))


@torch.no_grad()
def _sgd_momentum_step(grid: _ProbeGrid, buffers: list[torch.Tensor], lr: torch.Tensor, momentum: float) -> None:
    """Apply ``buffer = momentum * buffer + grad``, then ``param -= lr[p] * buffer`` per probe, as torch.optim.SGD."""
    for parameter, buffer in zip((grid.weight, grid.bias), buffers, strict=True):
        buffer.mul_(momentum).add_(parameter.grad)
        scale = lr.view(-1, *([1] * (parameter.ndim - 1)))
        parameter.sub_(scale * buffer)
        parameter.grad = None


def _best(selection: list[list[float]], lrs: list[float], test_accuracy: list[list[float]]) -> dict:
    """Return the first (epoch, probe) with the highest ``selection`` accuracy, and the test accuracy there."""
    best_epoch, best_probe = 0, 0
    for epoch, row in enumerate(selection):
        for probe, value in enumerate(row):
            if value > selection[best_epoch][best_probe]:
                best_epoch, best_probe = epoch, probe
    return {
        'lr': lrs[best_probe],
        'epoch': best_epoch + 1,
        'selection_accuracy': selection[best_epoch][best_probe],
        'test_accuracy': test_accuracy[best_epoch][best_probe],
    }
