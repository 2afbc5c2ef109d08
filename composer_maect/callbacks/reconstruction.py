"""Callback that saves MAE reconstructions of training images as a PNG grid."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torchvision.utils
from composer.core import Callback, Event, State, Time, TimeUnit, get_precision_context
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist, format_name_with_dist, format_name_with_dist_and_time
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from composer_maect.evaluation.features import eval_mode
from composer_maect.models.mae import MAEModel, normalize_patches, unpatchify

__all__ = ['ReconstructionImages']

log = logging.getLogger(__name__)

# Value in [0, 1] pixel space that fills masked patches in the "masked input" row.
_MASKED_PATCH_GREY = 0.5
# Width in pixels of the white border that torchvision.utils.make_grid draws around every image.
_GRID_PADDING = 2


def _fork_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Fork the random state of the CPU and of ``device``, so the extra masking leaves training randomness as is."""
    if device.type == 'cuda':
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index])
    return torch.random.fork_rng(devices=[])


class ReconstructionImages(Callback):
    """Save a PNG grid of MAE reconstructions of training images at a fixed interval and at the end of training.

    The grid has one column per image and three rows: the input, the input with its masked patches grey, and the
    reconstruction. The reconstruction shows the visible patches of the input and the model's prediction for the
    masked ones. With ``norm_pix_loss`` the prediction is mapped back to pixels with the mean and variance of the
    input patch it replaces. Images are de-normalised with ``mean`` and ``std`` and clipped to ``[0, 1]``.

    Events: at ``BATCH_START`` it keeps a copy of the first ``num_images`` images of the batch (key ``'image'``, or
    ``'view0'`` for multi-view batches, or a bare image tensor). At ``BATCH_END`` (batch interval) or ``EPOCH_END``
    (epoch interval), when the interval has passed, it runs the model on that copy in eval mode under
    ``torch.no_grad``, with a forked random state so that training randomness is unchanged. At ``FIT_END`` it saves
    once more unless the last batch was already saved, so every run produces at least one grid. The forward pass
    runs on every rank, which FSDP needs, and only rank 0 writes the file, calls ``logger.log_images`` and
    ``logger.upload_file``. The callback keeps no state in checkpoints.

    Args:
        interval: How often to save: a Time string in batches or epochs (``'500ba'``, ``'1ep'``), or an int
            number of epochs.
        num_images: Images per grid, taken from the start of the batch on each rank (fewer if the batch is
            smaller).
        folder: Local folder of the PNG files. Format keys: ``{run_name}`` and Composer's distributed keys such as
            ``{rank}``.
        filename: PNG file name. Format keys: ``{run_name}``, ``{epoch}``, ``{batch}`` and the distributed keys.
        remote_file_name: Name under which logger destinations upload the file, with the same format keys as
            ``filename``. Default: ``'{run_name}/reconstructions/'`` followed by ``filename``.
        mean: Per-channel mean that the data pipeline subtracted (default: ImageNet). A single number applies to
            every channel.
        std: Per-channel standard deviation that the data pipeline divided by (default: ImageNet). A single number
            applies to every channel.

    Raises:
        ValueError: If ``interval`` is not a positive number of batches or epochs, ``num_images`` is below 1, or
            ``mean``/``std`` are empty, of different lengths, or ``std`` is not positive.
    """

    def __init__(
        self,
        interval: str | int | Time = '1ep',
        num_images: int = 8,
        folder: str = '{run_name}/reconstructions',
        filename: str = 'reconstruction-ep{epoch}-ba{batch}.png',
        *,
        remote_file_name: str | None = None,
        mean: Sequence[float] | float = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] | float = IMAGENET_DEFAULT_STD,
    ) -> None:
        mean = (mean,) if isinstance(mean, (int, float)) else tuple(mean)
        std = (std,) if isinstance(std, (int, float)) else tuple(std)
        time_interval = Time.from_input(interval, TimeUnit.EPOCH)
        if time_interval.unit not in (TimeUnit.BATCH, TimeUnit.EPOCH) or time_interval.value <= 0:
            raise ValueError(
                f"interval must be a positive number of batches or epochs (e.g. '500ba' or '1ep'), got {interval!r}."
            )
        if num_images < 1:
            raise ValueError(f'num_images must be at least 1, got {num_images}.')
        if len(mean) == 0 or len(mean) != len(std):
            raise ValueError(f'mean and std must be non-empty and of equal length, got mean={mean} and std={std}.')
        if any(s <= 0 for s in std):
            raise ValueError(f'std must be positive in every channel, got {std}.')

        self.interval = time_interval
        self.num_images = num_images
        self.folder = folder
        self.filename = filename
        self.remote_file_name = remote_file_name or '{run_name}/reconstructions/' + filename
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

        self._is_due = create_interval_scheduler(time_interval, include_end_of_training=False, checkpoint_events=False)
        self._images: torch.Tensor | None = None
        self._last_saved_batch: int | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        del logger
        _find_mae_model(state.model)  # fails before the first batch if the model is not an MAEModel

    def batch_start(self, state: State, logger: Logger) -> None:
        del logger
        images = _images_from_batch(state.batch)
        self._images = images[: self.num_images].detach().clone()

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._is_due(state, Event.BATCH_END):
            self._save(state, logger)

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self._is_due(state, Event.EPOCH_END):
            self._save(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._images is None:
            log.info('No training batch was seen, so no reconstruction grid is saved at the end of training.')
            return
        if self._last_saved_batch != int(state.timestamp.batch):
            self._save(state, logger)

    def _save(self, state: State, logger: Logger) -> None:
        if self._images is None:
            return
        model = _find_mae_model(state.model)
        grid = self.build_grid(model, state.device.tensor_to_device(self._images), state)
        self._last_saved_batch = int(state.timestamp.batch)
        if dist.get_global_rank() != 0:
            return

        folder = format_name_with_dist(self.folder, state.run_name)
        filename = format_name_with_dist_and_time(self.filename, state.run_name, state.timestamp)
        path = os.path.join(folder, filename)
        os.makedirs(folder, exist_ok=True)
        torchvision.utils.save_image(grid, path)

        logger.log_images(grid, name='maect/reconstructions', step=int(state.timestamp.batch), use_table=False)
        remote_file_name = format_name_with_dist_and_time(self.remote_file_name, state.run_name, state.timestamp)
        logger.upload_file(remote_file_name=remote_file_name, file_path=path, overwrite=True)
        log.info('Saved a reconstruction grid of %d images to %s.', self._images.shape[0], path)

    def build_grid(self, model: MAEModel, images: torch.Tensor, state: State | None = None) -> torch.Tensor:
        """Reconstruct ``images`` ``[n, C, H, W]`` and return the grid ``[3, grid_height, grid_width]`` in ``[0, 1]``.

        ``state`` supplies the precision context of the training run. Without it the forward pass runs in the
        default precision. The result is on the CPU and in float32.
        """
        channels = images.shape[1]
        if len(self.mean) not in (1, channels):
            raise ValueError(
                f'The callback has {len(self.mean)} mean/std values but the images have {channels} channels. '
                'Pass mean and std with one value per channel.'
            )
        precision = (
            get_precision_context(state.precision, state.precision_config) if state else contextlib.nullcontext()
        )
        with torch.no_grad(), eval_mode(model), _fork_rng(images.device), precision:
            outputs = model({'image': images})

        pred = outputs['pred'].float()
        target = outputs['target'].float()
        mask = outputs['mask'].float().unsqueeze(-1)  # [n, N, 1]
        if model.norm_pix_loss:
            _, patch_mean, patch_var = normalize_patches(target)
            pred = pred * (patch_var + 1e-6) ** 0.5 + patch_mean

        encoder = model.encoder
        pasted = target * (1 - mask) + pred * mask  # [n, N, P]
        reconstruction = unpatchify(pasted, encoder.patch_size, encoder.grid_size, channels)
        mask_image = unpatchify(mask.expand_as(target), encoder.patch_size, encoder.grid_size, channels)

        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        inputs = images.float() * std + mean
        masked_inputs = inputs * (1 - mask_image) + _MASKED_PATCH_GREY * mask_image
        reconstruction = reconstruction * std + mean

        rows = torch.cat([inputs, masked_inputs, reconstruction], dim=0).clamp(0.0, 1.0).cpu()
        return torchvision.utils.make_grid(rows, nrow=images.shape[0], padding=_GRID_PADDING, pad_value=1.0)


def _find_mae_model(model: nn.Module) -> MAEModel:
    """Return the MAEModel inside ``model``, looking through one DDP-style ``.module`` wrapper."""
    if isinstance(model, MAEModel):
        return model
    inner = getattr(model, 'module', None)
    if isinstance(inner, MAEModel):
        return inner
    raise TypeError(
        f'ReconstructionImages needs an MAEModel (directly or wrapped in DDP), got {type(model).__name__}. '
        'Remove the callback for other models.'
    )


def _images_from_batch(batch: Any) -> torch.Tensor:
    """Return the ``[B, C, H, W]`` images of ``batch``: ``'image'``, else ``'view0'``, or the batch tensor itself."""
    if isinstance(batch, torch.Tensor):
        images = batch
    elif isinstance(batch, Mapping) and 'image' in batch:
        images = batch['image']
    elif isinstance(batch, Mapping) and 'view0' in batch:
        images = batch['view0']
    elif isinstance(batch, Mapping):
        raise KeyError(f"ReconstructionImages needs a batch key 'image' or 'view0', but the keys are {sorted(batch)}.")
    else:
        raise TypeError(f"ReconstructionImages needs a dict batch with 'image' or 'view0', got {type(batch).__name__}.")
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f'ReconstructionImages needs images of shape [B, C, H, W], got {shape}.')
    return images
