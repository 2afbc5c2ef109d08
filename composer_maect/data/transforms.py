"""View pipelines for MAE pre-training, contrastive tuning and evaluation, built from torchvision.transforms.v2.

Every pipeline takes an RGB PIL image (or a uint8 tensor ``[3, H, W]``) and returns a float32 tensor
``[3, img_size, img_size]`` normalized with ``mean`` and ``std``. All photometric steps run on 0..255 values before
the float conversion.

- ``mae``: RandomResizedCrop with scale (0.2, 1), then a horizontal flip with p 0.5.
- ``contrastive`` and ``probe_train``: RandomResizedCrop with scale (0.08, 1), then a horizontal flip with p 0.5.
- ``contrastive_aug``: a pair of pipelines for the two views. Both crop and flip as ``contrastive``, then apply
  ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8 (its four steps in random order), PIL's Gaussian blur with sigma
  in [0.1, 2] (``PILGaussianBlur``) and grayscale with p 0.2. View 1 always blurs. View 2 blurs with p 0.1 and then
  solarizes with p 0.2 at threshold 128.
- ``eval``: Resize of the shorter side to int(img_size * 256 / 224), then CenterCrop(img_size).

Crops draw aspect ratios from (3/4, 4/3). Every resize is bicubic with antialiasing, unless the ``interpolation``
option sets another mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

__all__ = ['TRANSFORM_NAMES', 'PILGaussianBlur', 'build_transform']

TRANSFORM_NAMES = ('mae', 'contrastive', 'contrastive_aug', 'probe_train', 'eval')

_CROP_DEFAULTS = {'ratio': (3 / 4, 4 / 3), 'hflip': True, 'interpolation': 'bicubic'}

# Defaults of the options that each pipeline accepts. Any other option is rejected.
_DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    'mae': {'scale': (0.2, 1.0), **_CROP_DEFAULTS},
    'contrastive': {'scale': (0.08, 1.0), **_CROP_DEFAULTS},
    'contrastive_aug': {'scale': (0.08, 1.0), **_CROP_DEFAULTS},
    'probe_train': {'scale': (0.08, 1.0), **_CROP_DEFAULTS},
    'eval': {'resize_size': None, 'interpolation': 'bicubic'},
}

_BLUR_SIGMA = (0.1, 2.0)
# PIL image modes that ImageFilter.GaussianBlur accepts.
_BLUR_PIL_MODES = ('L', 'LA', 'RGB', 'RGBA', 'RGBX', 'CMYK')
_SOLARIZE_THRESHOLD = 128  # On 0..255 values: the step runs before the float conversion.

Transform = Callable[[Any], torch.Tensor]


def _parse_interpolation(value: str | InterpolationMode) -> InterpolationMode:
    if isinstance(value, InterpolationMode):
        return value
    valid = [mode.value for mode in InterpolationMode]
    if value not in valid:
        raise ValueError(f'Unknown interpolation {value!r}. Valid: {valid}.')
    return InterpolationMode(value)


def _parse_range(name: str, value: Sequence[float], upper: float) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f'{name} must be a pair (min, max), got {value!r}.')
    low, high = float(value[0]), float(value[1])
    if not 0.0 < low <= high <= upper:
        raise ValueError(f'{name} must satisfy 0 < min <= max <= {upper}, got {value!r}.')
    return low, high


def _parse_channel_stats(name: str, value: Sequence[float], positive: bool) -> tuple[float, float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f'{name} must have 3 values, one per RGB channel, got {value!r}.')
    stats = tuple(float(item) for item in value)
    if positive and not all(item > 0 for item in stats):
        raise ValueError(f'{name} values must be positive, got {value!r}.')
    return stats  # type: ignore[return-value]


def _resolve_options(name: str, img_size: int, options: dict[str, Any]) -> dict[str, Any]:
    """Merge ``options`` into the defaults of pipeline ``name`` and validate every value."""
    if name not in _DEFAULT_OPTIONS:
        raise ValueError(f'Unknown transform {name!r}. Valid names: {list(TRANSFORM_NAMES)}.')
    defaults = _DEFAULT_OPTIONS[name]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f'Unknown options {unknown} for transform {name!r}. Valid options: {sorted(defaults)}.')
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f'img_size must be a positive int, got {img_size!r}.')

    resolved = {**defaults, **options}
    resolved['interpolation'] = _parse_interpolation(resolved['interpolation'])
    if 'scale' in resolved:
        resolved['scale'] = _parse_range('scale', resolved['scale'], upper=1.0)
        resolved['ratio'] = _parse_range('ratio', resolved['ratio'], upper=math.inf)
        if not isinstance(resolved['hflip'], bool):
            raise ValueError(f'hflip must be a bool, got {resolved["hflip"]!r}.')
    if 'resize_size' in resolved:
        resize_size = resolved['resize_size']
        if resize_size is None:
            resolved['resize_size'] = int(img_size * 256 / 224)
        elif isinstance(resize_size, bool) or not isinstance(resize_size, int) or resize_size < img_size:
            raise ValueError(f'resize_size must be an int >= img_size ({img_size}), got {resize_size!r}.')
    return resolved


def _crop_and_flip(img_size: int, options: dict[str, Any]) -> list[v2.Transform]:
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(
            img_size,
            scale=options['scale'],
            ratio=options['ratio'],
            interpolation=options['interpolation'],
            antialias=True,
        )
    ]
    if options['hflip']:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    return steps


def _to_normalized_float(mean: tuple[float, ...], std: tuple[float, ...]) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std)]


class PILGaussianBlur(v2.Transform):
    """Blur with PIL's ``ImageFilter.GaussianBlur(radius=sigma)``, ``sigma`` drawn uniformly from ``sigma`` per call.

    The blur of the reference MAE-CT pipelines. PIL approximates the Gaussian with repeated box blurs and does not
    truncate its support, and it is several times faster than ``v2.GaussianBlur`` with the 13-tap kernel that
    sigma 2 needs (the ``contrastive_aug`` decode rows of ``python -m composer_maect.benchmark --rows data``).

    Takes PIL images and uint8 tensors ``[C, H, W]`` (C 1 or 3); tensors go through PIL and come back as uint8
    tensors of the same type. The sigma is drawn from torch's generator, so seeded pipelines stay reproducible.

    Raises:
        TypeError: a tensor that is not uint8 ``[C, H, W]`` with C 1 or 3 (blur before the float conversion), or a
            PIL image in a mode that PIL cannot blur, such as ``'P'`` or ``'F'``.
    """

    def __init__(self, sigma: Sequence[float] = _BLUR_SIGMA) -> None:
        super().__init__()
        self.sigma = _parse_range('sigma', sigma, upper=math.inf)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {'sigma': torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        blur = ImageFilter.GaussianBlur(radius=params['sigma'])
        if isinstance(inpt, Image.Image):
            if inpt.mode not in _BLUR_PIL_MODES:
                raise TypeError(
                    f'PILGaussianBlur: PIL mode {inpt.mode!r} cannot be blurred. Supported modes: '
                    f'{list(_BLUR_PIL_MODES)}. Convert the image first, for example with image.convert("RGB").'
                )
            return inpt.filter(blur)
        if not isinstance(inpt, torch.Tensor):
            return inpt  # Not an image, such as a label: v2 transforms pass it through.
        output = torch.from_numpy(np.array(_uint8_tensor_to_pil(inpt, 'PILGaussianBlur').filter(blur)))
        output = output.reshape(inpt.shape[1], inpt.shape[2], -1).permute(2, 0, 1)
        return tv_tensors.wrap(output, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else output


class _ToPIL(v2.Transform):
    """Turn a uint8 image tensor ``[C, H, W]`` (C 1 or 3) into a PIL image; pass PIL images and other inputs through.

    ``v2.ToPILImage`` hands PIL a transposed array, which PIL copies element by element. Making the tensor
    contiguous in torch first is faster.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, torch.Tensor) and not isinstance(inpt, tv_tensors.BoundingBoxes | tv_tensors.Mask):
            return _uint8_tensor_to_pil(inpt, 'The colour steps')
        return inpt


def _uint8_tensor_to_pil(image: torch.Tensor, step: str) -> Image.Image:
    if image.dtype != torch.uint8:
        raise TypeError(
            f'{step}: expected a uint8 image tensor, got {image.dtype}. Apply the step before converting the image '
            'to float.'
        )
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise TypeError(
            f'{step}: expected one image [C, H, W] with C 1 (grey) or 3 (RGB), got shape {tuple(image.shape)}.'
        )
    pixels = image.as_subclass(torch.Tensor).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(pixels[:, :, 0] if image.shape[0] == 1 else pixels)


def _color_distortion(blur_p: float, solarize_p: float) -> list[v2.Transform]:
    blur = PILGaussianBlur(_BLUR_SIGMA)
    steps: list[v2.Transform] = [
        # The colour steps run on PIL images, as in the reference pipelines, so a cropped uint8 tensor from the JPEG
        # decoder becomes one here. PIL's hue step is faster than the tensor kernel on a 224 x 224 crop.
        _ToPIL(),
        # v2.ColorJitter applies brightness, contrast, saturation and hue in a new random order for every image.
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        blur if blur_p == 1.0 else v2.RandomApply([blur], p=blur_p),
        v2.RandomGrayscale(p=0.2),
    ]
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=_SOLARIZE_THRESHOLD, p=solarize_p))
    return steps


def build_transform(
    name: str,
    *,
    img_size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    **options: Any,
) -> Transform | tuple[Transform, Transform]:
    """Build the view pipeline ``name`` (see the module docstring for the steps).

    Args:
        name: one of ``TRANSFORM_NAMES``.
        img_size: side of the square output in pixels.
        mean: per-channel mean of the normalization, on the 0..1 scale (default: timm's ImageNet mean).
        std: per-channel standard deviation of the normalization, on the 0..1 scale (default: timm's ImageNet std).
        **options: overrides of the pipeline's defaults. ``scale`` (crop area fraction, pair), ``ratio`` (crop aspect
            ratio, pair), ``hflip`` (bool; False for images whose mirror image is another class, such as digits)
            and ``interpolation`` (an ``InterpolationMode`` or its value, such as ``'bilinear'``) for the cropping
            pipelines. ``resize_size`` (pixels before the centre crop) and ``interpolation`` for ``'eval'``.

    Returns:
        A callable from an RGB PIL image to a float tensor ``[3, img_size, img_size]``. For ``'contrastive_aug'``,
        a tuple of two such callables: view 1 and view 2.

    Raises:
        ValueError: an unknown name or option (the message lists the valid ones), or an invalid value.
    """
    resolved = _resolve_options(name, img_size, options)
    mean = _parse_channel_stats('mean', mean, positive=False)
    std = _parse_channel_stats('std', std, positive=True)
    to_float = _to_normalized_float(mean, std)

    if name == 'eval':
        resize = v2.Resize(resolved['resize_size'], interpolation=resolved['interpolation'], antialias=True)
        return v2.Compose([resize, v2.CenterCrop(img_size), *to_float])

    crop = _crop_and_flip(img_size, resolved)
    if name == 'contrastive_aug':
        view1 = v2.Compose([*crop, *_color_distortion(blur_p=1.0, solarize_p=0.0), *to_float])
        # A second crop instance, so that the two pipelines share no module.
        view2_crop = _crop_and_flip(img_size, resolved)
        view2 = v2.Compose([*view2_crop, *_color_distortion(blur_p=0.1, solarize_p=0.2), *to_float])
        return view1, view2
    return v2.Compose([*crop, *to_float])
