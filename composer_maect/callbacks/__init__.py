"""Composer callbacks of composer-maect."""

from composer_maect.callbacks.knn_monitor import KNNMonitor
from composer_maect.callbacks.nonfinite_loss import NonFiniteLossError, StopOnNonFiniteLoss
from composer_maect.callbacks.reconstruction import ReconstructionImages

__all__ = ['KNNMonitor', 'NonFiniteLossError', 'ReconstructionImages', 'StopOnNonFiniteLoss']
