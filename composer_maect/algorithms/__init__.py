"""Composer algorithms for MAE-CT."""

from composer_maect.algorithms.contrastive_tuning import ContrastiveHead, ContrastiveTuning, attach_contrastive_head
from composer_maect.algorithms.ema import EMA
from composer_maect.algorithms.layerwise_unfreezing import LayerwiseUnfreezing

__all__ = ['EMA', 'ContrastiveHead', 'ContrastiveTuning', 'LayerwiseUnfreezing', 'attach_contrastive_head']
