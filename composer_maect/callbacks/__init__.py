"""Composer callbacks of composer-maect."""

from composer_maect.callbacks.knn_monitor import KNNMonitor
from composer_maect.callbacks.reconstruction import ReconstructionImages

__all__ = ['KNNMonitor', 'ReconstructionImages']
