"""Random resized crops and flips made on the device, one per sample, in one batched resampling call."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ['random_resized_crop_flip']


def _crop_boxes(
    batch: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    image_aspect: float,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw crop sizes ``[B, 2]`` (width, height) and centres ``[B, 2]`` in units of the image side, like
    torchvision's RandomResizedCrop: area uniform in ``scale``, aspect ratio in pixels log-uniform in ``ratio``.

    ``image_aspect`` is the image's width / height in pixels. Instead of torchvision's ten rejection trials, a box
    wider or taller than the image is clamped to it.
    """
    area = torch.empty(batch, device=device).uniform_(scale[0], scale[1])
    log_ratio = torch.empty(batch, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    # A crop of relative size (w, h) has w * W / (h * H) pixels of width per pixel of height.
    aspect = torch.exp(log_ratio) / image_aspect
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    size = torch.stack([width, height], dim=1)
    centre = size / 2 + torch.rand(batch, 2, device=device) * (1 - size)
    return size, centre


def random_resized_crop_flip(
    images: torch.Tensor,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
) -> torch.Tensor:
    """Return one random resized crop (and horizontal flip with probability 0.5) of every image.

    The crops keep the input resolution and are resampled bilinearly with ``grid_sample``, so the whole batch takes
    one kernel call on the device and draws its random numbers from the device's generator.

    Args:
        images: ``[B, C, H, W]`` float images, already normalised.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height, in pixels).
        hflip: flip each crop horizontally with probability 0.5.

    Returns:
        ``[B, C, H, W]`` crops.
    """
    if images.ndim != 4:
        raise ValueError(f'images must have shape [B, C, H, W], got {tuple(images.shape)}.')
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f'Invalid crop scale {scale}: expected 0 < min <= max <= 1.')
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f'Invalid crop ratio {ratio}: expected 0 < min <= max.')
    batch = images.shape[0]
    device = images.device
    size, centre = _crop_boxes(batch, scale, ratio, images.shape[-1] / images.shape[-2], device)

    # affine_grid works in [-1, 1] coordinates: a crop of relative size s centred at c maps x to s * x + (2c - 1).
    theta = torch.zeros(batch, 2, 3, device=device, dtype=torch.float32)
    theta[:, 0, 0] = size[:, 0]
    theta[:, 1, 1] = size[:, 1]
    theta[:, :, 2] = 2 * centre - 1
    if hflip:
        flip = torch.rand(batch, device=device) < 0.5
        theta[:, 0, 0] = torch.where(flip, -theta[:, 0, 0], theta[:, 0, 0])
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode='bilinear', padding_mode='border', align_corners=False).to(
        images.dtype
    )
