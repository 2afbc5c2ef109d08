"""random_resized_crop_flip: shapes, dtypes, crop geometry read back from coordinate ramps, flips and bad input.

The geometry tests crop an image whose channels are its own x and y coordinates in ``[-1, 1]`` (the coordinates of
pixel centres that ``grid_sample`` uses with ``align_corners=False``). Bilinear sampling reproduces a linear ramp
exactly, so the ramp's slope in the output is the crop's size as a fraction of the image side, its sign marks a flip,
and its value at the output centre is the crop's centre.
"""

import pytest
import torch

from composer_maect.models.views import random_resized_crop_flip


def coordinate_image(batch: int, height: int, width: int) -> torch.Tensor:
    """Images ``[batch, 3, height, width]``: channel 0 is x, channel 1 is y, channel 2 is zero."""
    ys = (torch.arange(height) * 2 + 1) / height - 1
    xs = (torch.arange(width) * 2 + 1) / width - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing='ij')
    image = torch.stack([grid_x, grid_y, torch.zeros_like(grid_x)])
    return image.expand(batch, -1, -1, -1).contiguous()


def crop_geometry(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return per-crop ``(width, height, centre_x)`` from crops of a coordinate image.

    Width and height are fractions of the image side, and the width is negative for a flipped crop. They are read
    between the two middle columns and rows, which sample inside the image for any crop of at least a quarter of the
    image side.
    """
    height, width = crops.shape[-2:]
    row, column = height // 2, width // 2
    crop_width = (crops[:, 0, row, column] - crops[:, 0, row, column - 1]) / (2 / width)
    crop_height = (crops[:, 1, row, column] - crops[:, 1, row - 1, column]) / (2 / height)
    centre_x = (crops[:, 0, row, column] + crops[:, 0, row, column - 1]) / 2
    return crop_width, crop_height, centre_x


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
def test_shape_and_dtype(dtype):
    images = torch.randn(5, 3, 24, 16).to(dtype)
    crops = random_resized_crop_flip(images)
    assert crops.shape == (5, 3, 24, 16)
    assert crops.dtype == dtype
    assert crops.device == images.device
    assert torch.isfinite(crops.float()).all()


def test_full_crop_without_flip_returns_image():
    images = torch.randn(4, 3, 32, 32)
    crops = random_resized_crop_flip(images, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    torch.testing.assert_close(crops, images, rtol=0, atol=1e-5)


def test_full_scale_other_ratio_is_clamped():
    # A box with another aspect ratio than the image is wider or taller than the image and is clamped to it, so
    # scale (1, 1) alone does not return the image.
    torch.manual_seed(0)
    images = coordinate_image(64, 32, 32)
    crop_width, crop_height, _ = crop_geometry(random_resized_crop_flip(images, scale=(1.0, 1.0), hflip=False))
    assert (torch.minimum(crop_width, crop_height) < 0.9999).all()
    assert torch.allclose(torch.maximum(crop_width, crop_height), torch.ones(64), atol=1e-5)


def test_flip_mirrors_full_crop():
    torch.manual_seed(0)
    images = torch.randn(64, 3, 16, 16)
    crops = random_resized_crop_flip(images, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True)

    same = (crops - images).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (crops - images.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (same ^ mirrored).all(), 'every crop is either the image or its mirror image'
    # Each sample flips with probability 0.5, so 64 samples of one kind have probability 2^-63.
    assert 0 < int(mirrored.sum()) < 64


def test_crop_size_and_aspect_within_ranges():
    torch.manual_seed(0)
    scale, ratio = (0.25, 0.5), (3 / 4, 4 / 3)
    crops = random_resized_crop_flip(coordinate_image(256, 32, 32), scale=scale, ratio=ratio, hflip=False)
    crop_width, crop_height, centre_x = crop_geometry(crops)

    area = crop_width * crop_height
    aspect = crop_width / crop_height
    assert area.min() >= scale[0] - 1e-4
    assert area.max() <= scale[1] + 1e-4
    assert aspect.min() >= ratio[0] - 1e-4
    assert aspect.max() <= ratio[1] + 1e-4
    # The crop lies inside the image: its centre is at least half its width from either edge.
    assert (centre_x.abs() <= 1 - crop_width + 1e-4).all()
    # The draws spread over the ranges instead of sitting at one value.
    assert area.max() - area.min() > 0.2
    assert aspect.max() / aspect.min() > 1.6


def test_aspect_ratio_counts_pixels_on_wide_images():
    # On an image twice as wide as high, a square crop in pixels covers half as much of the width as of the height.
    torch.manual_seed(0)
    height, width = 16, 32
    crops = random_resized_crop_flip(
        coordinate_image(64, height, width), scale=(0.2, 0.4), ratio=(1.0, 1.0), hflip=False
    )
    crop_width, crop_height, _ = crop_geometry(crops)

    pixel_aspect = crop_width * width / (crop_height * height)
    torch.testing.assert_close(pixel_aspect, torch.ones(64), rtol=0, atol=1e-4)
    area = crop_width * crop_height
    assert area.min() >= 0.2 - 1e-4
    assert area.max() <= 0.4 + 1e-4


def test_flip_negates_crop_width():
    torch.manual_seed(0)
    crops = random_resized_crop_flip(coordinate_image(128, 32, 32), scale=(0.25, 0.5), hflip=True)
    crop_width, crop_height, _ = crop_geometry(crops)
    assert (crop_height > 0).all()
    assert 0 < int((crop_width < 0).sum()) < 128


def test_samples_get_different_crops():
    torch.manual_seed(0)
    crops = random_resized_crop_flip(coordinate_image(16, 32, 32))
    crop_width, crop_height, centre_x = crop_geometry(crops)
    boxes = torch.stack([crop_width, crop_height, centre_x], dim=1)
    assert len({tuple(box.tolist()) for box in boxes}) == 16
    flat = crops.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(16) for j in range(i))


def test_same_seed_gives_same_crops():
    images = torch.randn(8, 3, 32, 32)
    torch.manual_seed(3)
    first = random_resized_crop_flip(images)
    torch.manual_seed(3)
    second = random_resized_crop_flip(images)
    third = random_resized_crop_flip(images)
    assert torch.equal(first, second)
    assert not torch.equal(second, third)


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'scale': (0.0, 1.0)}, r'Invalid crop scale \(0.0, 1.0\)'),
        ({'scale': (-0.5, 0.5)}, r'Invalid crop scale \(-0.5, 0.5\)'),
        ({'scale': (0.6, 0.2)}, r'Invalid crop scale \(0.6, 0.2\)'),
        ({'scale': (0.5, 1.5)}, r'Invalid crop scale \(0.5, 1.5\)'),
        ({'ratio': (0.0, 1.0)}, r'Invalid crop ratio \(0.0, 1.0\)'),
        ({'ratio': (2.0, 1.0)}, r'Invalid crop ratio \(2.0, 1.0\)'),
    ],
)
def test_rejects_bad_ranges(kwargs, message):
    with pytest.raises(ValueError, match=message):
        random_resized_crop_flip(torch.randn(2, 3, 8, 8), **kwargs)


@pytest.mark.parametrize('shape', [(3, 8, 8), (2, 1, 3, 8, 8)])
def test_rejects_images_that_are_not_4d(shape):
    with pytest.raises(ValueError, match=r'images must have shape \[B, C, H, W\], got ') as error:
        random_resized_crop_flip(torch.randn(shape))
    assert str(shape) in str(error.value)
