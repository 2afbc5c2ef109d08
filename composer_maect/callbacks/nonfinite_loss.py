"""Stop training at the first batch whose loss is NaN or infinite, before that batch is checkpointed."""

from __future__ import annotations

import math

from composer.core import Callback, State
from composer.loggers import Logger

__all__ = ['NonFiniteLossError', 'StopOnNonFiniteLoss']


class NonFiniteLossError(RuntimeError):
    """The training loss of a batch is NaN or infinite. The message names the batch and the last finite loss."""


def _format_losses(losses: dict[str, float]) -> str:
    return ', '.join(f'{name}={value:.6g}' for name, value in losses.items())


class StopOnNonFiniteLoss(Callback):
    """Raise ``NonFiniteLossError`` at the end of the first batch whose loss is NaN or infinite.

    The check reads ``state.total_loss_dict``: the batch losses that Composer (0.32.1) has already averaged over all
    ranks and copied to the CPU before ``Event.BATCH_END``. So it adds no device synchronisation and no collective,
    and every rank raises at the same batch. The optimizer has stepped on the bad batch when the check runs, but
    Composer's ``CheckpointSaver`` writes at ``Event.BATCH_CHECKPOINT`` and ``Event.EPOCH_CHECKPOINT``, which come
    after ``Event.BATCH_END``. The bad batch is therefore never saved, and earlier checkpoints and the ``latest``
    link stay as they are. The trainer of ``composer_maect.train`` puts this callback first, so no other callback
    acts on the bad batch at ``Event.BATCH_END`` either. Composer's ``NaNMonitor`` raises at ``Event.AFTER_LOSS``
    instead, which needs a device synchronisation per microbatch, and it ignores infinite losses.
    """

    def __init__(self) -> None:
        # (batch number, losses) of the latest batch with finite losses in this process.
        self.last_finite: tuple[int, dict[str, float]] | None = None

    def batch_end(self, state: State, logger: Logger) -> None:
        losses = dict(state.total_loss_dict)
        # The timestamp already counts the batch that just ended, so the first batch of a run is batch 1, as in the
        # checkpoint names (ba1).
        batch = int(state.timestamp.batch)
        bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
        if not bad:
            self.last_finite = (batch, losses)
            return

        if self.last_finite is None:
            previous = 'No earlier batch in this process had a finite loss.'
        else:
            previous = f'The last finite loss was {_format_losses(self.last_finite[1])} at batch {self.last_finite[0]}.'
        message = (
            f'Training loss is not finite at batch {batch} (epoch {int(state.timestamp.epoch)}): '
            f'{_format_losses(bad)}. {previous} Training stopped before batch {batch} was checkpointed, so the '
            f'latest checkpoint, if any, is from an earlier batch. Lower optimizer.base_lr, add '
            f'algorithms.gradient_clipping, or train in fp32 or amp_bf16 instead of amp_fp16, then resume from that '
            f'checkpoint. Set stop_on_nonfinite_loss: false to train on despite such losses.'
        )
        raise NonFiniteLossError(message)
