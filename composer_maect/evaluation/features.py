"""Extract pooled ViT features of a whole dataset, gathered from all ranks, for k-NN and probe evaluations."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from composer_maect.distributed import all_gather_no_grad, is_distributed, world_size
from composer_maect.models.pooling import check_pooling, encode_pooled

__all__ = ['eval_mode', 'extract_features']

log = logging.getLogger(__name__)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own training flag afterwards.

    Restoring per module keeps submodules that the training run keeps in eval mode (a frozen encoder, for example)
    in eval mode, which ``model.train(True)`` would undo.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _images_from_batch(batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"extract_features needs dict batches with 'image' (or 'view0'), 'label' and 'index', got "
            f'{type(batch).__name__}.'
        )
    for key in ('image', 'view0'):
        if key in batch:
            return batch[key]
    raise KeyError(f"extract_features needs a batch key 'image' or 'view0', but the keys are {sorted(batch)}.")


def _column_from_batch(batch: Mapping[str, Any], key: str) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f'extract_features needs a batch key {key!r}, but the keys are {sorted(batch)}.')
    return torch.as_tensor(batch[key]).reshape(-1).to(device='cpu', dtype=torch.int64)


def _collective_device() -> torch.device:
    """Return the device that the default process group's collectives take tensors on (CUDA for NCCL)."""
    if 'nccl' in str(dist.get_backend()):
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def _all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` ``[n_rank, ...]`` from all ranks in rank order, where ``n_rank`` may differ by rank.

    Every rank pads its rows to the largest ``n_rank``, gathers, and drops the padding rows of every rank. The result
    is on the CPU.
    """
    device = _collective_device()
    local_rows = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    rows_per_rank = all_gather_no_grad(local_rows).tolist()
    max_rows = max(rows_per_rank)

    padded = torch.zeros((max_rows, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    gathered = all_gather_no_grad(padded).cpu()
    pieces = [gathered[rank * max_rows : rank * max_rows + rows] for rank, rows in enumerate(rows_per_rank)]
    return torch.cat(pieces, dim=0)


def _sort_and_deduplicate(
    features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the samples by index and keep the first occurrence of every index."""
    order = torch.sort(indices, stable=True).indices
    features, labels, indices = features[order], labels[order], indices[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]
    return features[keep], labels[keep], indices[keep]


def extract_features(
    vit: VisionTransformer,
    dataloader: Iterable[Mapping[str, Any]],
    *,
    pooling: str = 'cls',
    device: torch.device | str | None = None,
    max_samples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode every image of ``dataloader`` with ``vit`` and pool the final tokens into one feature vector each.

    The ViT runs in eval mode under ``torch.no_grad``. Afterwards every submodule gets back its own training flag,
    and no parameter or buffer changes. Autocast contexts that the caller opens apply to the forward passes.

    When ``torch.distributed`` is initialised with more than one rank, every rank encodes its own batches, and the
    results of all ranks are gathered. Samples that several ranks saw (StreamingDataset pads each rank's partition
    with repeated samples) are kept once. So every rank returns the same full set. Every rank must call this
    function, because the gather is a collective.

    Args:
        vit: a timm VisionTransformer.
        dataloader: batches that are dicts with ``'image'`` (or ``'view0'``) ``[B, 3, H, W]``, ``'label'`` ``[B]``
            and ``'index'`` ``[B]``, such as those of ``build_image_dataloader``. ``'index'`` identifies the sample
            across ranks.
        pooling: ``'cls'`` or ``'mean_patch'`` (see :func:`composer_maect.models.pooling.pool_tokens`).
        device: device of the forward passes. Default: the device of the ViT's first parameter.
        max_samples: read at most this many samples in total. Each rank reads at most
            ``ceil(max_samples / world_size)`` samples from the start of its batches, and the gathered set keeps the
            ``max_samples`` smallest indices. None reads everything.

    Returns:
        ``(features, labels, indices)``: features ``[N, D]`` float32, labels ``[N]`` int64 and dataset indices
        ``[N]`` int64, all on the CPU and sorted by index, with every index once.

    Raises:
        ValueError: an unknown ``pooling`` or an invalid ``max_samples``.
        TypeError, KeyError: batches that are not dicts with the keys above.
    """
    check_pooling(pooling)
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)):
        raise ValueError(f'max_samples must be a positive int or None, got {max_samples!r}.')
    if max_samples is not None and max_samples < 1:
        raise ValueError(f'max_samples must be a positive int or None, got {max_samples!r}.')
    if device is None:
        first_parameter = next(vit.parameters(), None)
        device = first_parameter.device if first_parameter is not None else torch.device('cpu')
    device = torch.device(device)
    rank_limit = math.ceil(max_samples / world_size()) if max_samples is not None else None

    feature_batches: list[torch.Tensor] = []
    label_batches: list[torch.Tensor] = []
    index_batches: list[torch.Tensor] = []
    num_read = 0
    with torch.no_grad(), eval_mode(vit):
        for batch in dataloader:
            images = _images_from_batch(batch)
            labels = _column_from_batch(batch, 'label')
            indices = _column_from_batch(batch, 'index')
            if rank_limit is not None:
                take = rank_limit - num_read
                images, labels, indices = images[:take], labels[:take], indices[:take]

            features = encode_pooled(vit, images.to(device, non_blocking=True), pooling)
            feature_batches.append(features.float().cpu())
            label_batches.append(labels)
            index_batches.append(indices)
            num_read += images.shape[0]
            if rank_limit is not None and num_read >= rank_limit:
                break

    if feature_batches:
        features = torch.cat(feature_batches)
        labels = torch.cat(label_batches)
        indices = torch.cat(index_batches)
    else:
        features = torch.empty((0, vit.embed_dim), dtype=torch.float32)
        labels = torch.empty((0,), dtype=torch.int64)
        indices = torch.empty((0,), dtype=torch.int64)

    if is_distributed():
        features = _all_gather_rows(features)
        labels = _all_gather_rows(labels)
        indices = _all_gather_rows(indices)

    features, labels, indices = _sort_and_deduplicate(features, labels, indices)
    if max_samples is not None and indices.shape[0] > max_samples:
        features, labels, indices = features[:max_samples], labels[:max_samples], indices[:max_samples]
    log.debug('Extracted %d features of dimension %d with %s pooling.', features.shape[0], features.shape[1], pooling)
    return features, labels, indices
