"""Composer callbacks of composer-maect."""

from composer_maect.callbacks.reconstruction import ReconstructionImages

__all__ = ['ReconstructionImages']
