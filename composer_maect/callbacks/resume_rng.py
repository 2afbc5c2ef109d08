"""Restore the checkpoint's RNG state when a run resumes mid-epoch on a dataset that resumes itself.

Composer 0.32.1 restores the RNG state of a loaded checkpoint only at the start of an epoch, or while it spins a
DataLoader forward to the checkpoint's batch. A ``StreamingDataset`` resumes at the checkpoint's sample by itself, so
Composer skips the spin and, in the middle of an epoch, never restores the RNG state. Random draws on the training
process after such a resume, such as ContrastiveTuning's choice among the ``topk`` nearest neighbours or its crops of
single-view batches, then differ from those of the uninterrupted run.

:func:`restore_rng_mid_epoch` fills that gap with :class:`RestoreRNG`, which loads the state at ``AFTER_DATALOADER``
of the first batch. That is the point where the uninterrupted run had the same state: after the DataLoader iterator
exists (creating it draws a worker seed from the RNG) and before the batch's own draws.
"""

from __future__ import annotations

import logging
from typing import Any

from composer import Trainer
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import reproducibility

__all__ = ['RestoreRNG', 'restore_rng_mid_epoch']

log = logging.getLogger(__name__)


class RestoreRNG(Callback):
    """A callback that loads per-rank RNG states, as Composer saves them, once at the first ``AFTER_DATALOADER``."""

    def __init__(self, rng_state: list[dict[str, Any]]) -> None:
        self.rng_state: list[dict[str, Any]] | None = rng_state

    def after_dataloader(self, state: State, logger: Logger) -> None:
        if self.rng_state is not None:
            reproducibility.load_rng_state(self.rng_state)
            self.rng_state = None
            log.info('Restored the RNG state of the checkpoint at batch %s', state.timestamp.batch)


def restore_rng_mid_epoch(trainer: Trainer) -> bool:
    """Add a :class:`RestoreRNG` to ``trainer`` when it resumed mid-epoch where Composer does not restore the RNG.

    Returns:
        Whether the callback was added.
    """
    # NOTE: reads the Trainer's private `_rng_state`, the loaded checkpoint's RNG states (Composer 0.32.1).
    rng_state = getattr(trainer, '_rng_state', None)
    state = trainer.state
    if rng_state is None or int(state.timestamp.batch_in_epoch) == 0 or 'train' not in state.dataset_resumption:
        return False
    trainer._rng_state = None  # Composer must not restore it a second time.
    state.callbacks.append(RestoreRNG(rng_state))
    return True
