"""Data for MAE-CT: conversion to MDS shards, the streaming image dataset and the view pipelines.

- ``convert``: ``python -m composer_maect.data.convert SOURCE OUT`` writes an ImageFolder, the ImageNet layout,
  ``mnist5k`` or ``digits`` as MDS shards with the columns image (encoded bytes), label and index.
- ``dataset``: ``ImageStreamingDataset`` and ``build_image_dataloader`` read those shards.
- ``transforms``: ``build_transform`` builds the view pipelines ``mae``, ``contrastive``, ``contrastive_aug``,
  ``probe_train`` and ``eval``.

The names below are imported on first access, so that running the converter does not import timm and torchvision.
``composer_maect.data.convert`` is the converter module, so its function is ``composer_maect.data.convert.convert``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from composer_maect.data.convert import ConversionReport
    from composer_maect.data.dataset import CorruptSampleError, ImageStreamingDataset, build_image_dataloader
    from composer_maect.data.transforms import TRANSFORM_NAMES, build_transform

_EXPORTS = {
    'ConversionReport': 'composer_maect.data.convert',
    'CorruptSampleError': 'composer_maect.data.dataset',
    'ImageStreamingDataset': 'composer_maect.data.dataset',
    'build_image_dataloader': 'composer_maect.data.dataset',
    'TRANSFORM_NAMES': 'composer_maect.data.transforms',
    'build_transform': 'composer_maect.data.transforms',
}

__all__ = [
    'TRANSFORM_NAMES',
    'ConversionReport',
    'CorruptSampleError',
    'ImageStreamingDataset',
    'build_image_dataloader',
    'build_transform',
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
