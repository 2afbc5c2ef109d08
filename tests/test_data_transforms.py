"""The view pipelines: shapes, determinism, options, flips and the photometric steps of the asymmetric pair."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.transforms import v2

from composer_maect.data.transforms import TRANSFORM_NAMES, PILGaussianBlur, build_transform


def _noise_image(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _left_bright_image(size: int = 32) -> Image.Image:
    """A square image with a grey left half and a black right half, so a flip is visible.

    The grey level 100 keeps the left half brighter after any colour jitter, grayscale or solarization at 128.
    """
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, : size // 2] = 100
    return Image.fromarray(pixels)


def _as_pipelines(transform) -> list:
    return list(transform) if isinstance(transform, tuple) else [transform]


@pytest.mark.parametrize('name', TRANSFORM_NAMES)
def test_each_transform_output_shape(name):
    torch.manual_seed(0)
    pipelines = _as_pipelines(build_transform(name, img_size=24))
    assert len(pipelines) == (2 if name == 'contrastive_aug' else 1)
    for pipeline in pipelines:
        output = pipeline(_noise_image())
        assert output.shape == (3, 24, 24)
        assert output.dtype == torch.float32


@pytest.mark.parametrize('name', TRANSFORM_NAMES)
def test_each_transform_accepts_uint8_tensor(name):
    image = torch.from_numpy(np.array(_noise_image())).permute(2, 0, 1).contiguous()
    for pipeline in _as_pipelines(build_transform(name, img_size=16)):
        assert pipeline(image).shape == (3, 16, 16)


def test_small_images_with_blur():
    view1, view2 = build_transform('contrastive_aug', img_size=8)
    for _ in range(5):
        assert view1(_noise_image(10, 9)).shape == (3, 8, 8)
        assert view2(_noise_image(10, 9)).shape == (3, 8, 8)


def test_eval_deterministic():
    transform = build_transform('eval', img_size=24)
    image = _noise_image()
    torch.testing.assert_close(transform(image), transform(image), rtol=0, atol=0)


def test_eval_resize_then_centre_crop():
    transform = build_transform('eval', img_size=28, mean=(0, 0, 0), std=(1, 1, 1))
    resize = transform.transforms[0]
    assert isinstance(resize, v2.Resize)
    assert resize.size == [32]  # int(28 * 256 / 224)
    assert resize.interpolation == v2.InterpolationMode.BICUBIC
    assert resize.antialias is True

    image = _noise_image(64, 48)
    resized = image.resize((42, 32), Image.BICUBIC)  # Shorter side 48 -> 32 keeps the aspect ratio.
    left, top = (42 - 28) // 2, (32 - 28) // 2
    expected = torch.from_numpy(np.array(resized.crop((left, top, left + 28, top + 28)))).permute(2, 0, 1) / 255
    torch.testing.assert_close(transform(image), expected, rtol=0, atol=1 / 255 + 1e-6)


def test_eval_resize_size_option():
    transform = build_transform('eval', img_size=16, resize_size=20)
    assert transform.transforms[0].size == [20]
    with pytest.raises(ValueError, match='resize_size'):
        build_transform('eval', img_size=16, resize_size=8)


def test_normalization_default_and_custom():
    grey = Image.new('RGB', (20, 20), (128, 128, 128))
    output = build_transform('eval', img_size=16)(grey)
    for channel in range(3):
        expected = (128 / 255 - IMAGENET_DEFAULT_MEAN[channel]) / IMAGENET_DEFAULT_STD[channel]
        torch.testing.assert_close(output[channel], torch.full((16, 16), expected), rtol=0, atol=1e-5)

    output = build_transform('eval', img_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(grey)
    torch.testing.assert_close(output, torch.full((3, 16, 16), (128 / 255 - 0.5) / 0.5), rtol=0, atol=1e-5)


def test_unknown_name_lists_valid():
    with pytest.raises(ValueError, match=r"Unknown transform 'simclr'. Valid names: \['mae', 'contrastive'"):
        build_transform('simclr', img_size=16)


def test_unknown_option_lists_valid():
    with pytest.raises(ValueError, match=r"Unknown options \['blur'\].*Valid options: \['hflip', 'interpolation'"):
        build_transform('mae', img_size=16, blur=True)
    with pytest.raises(ValueError, match=r"Unknown options \['scale'\] for transform 'eval'.*\['interpolation', "):
        build_transform('eval', img_size=16, scale=(0.5, 1.0))


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'img_size': 0}, 'img_size'),
        ({'img_size': 16, 'scale': (0.5, 0.2)}, 'scale'),
        ({'img_size': 16, 'scale': (0.0, 1.0)}, 'scale'),
        ({'img_size': 16, 'scale': 0.5}, 'scale'),
        ({'img_size': 16, 'ratio': (2.0, 1.0)}, 'ratio'),
        ({'img_size': 16, 'hflip': 'no'}, 'hflip'),
        ({'img_size': 16, 'interpolation': 'cubic'}, "Valid: \\['nearest'"),
        ({'img_size': 16, 'mean': (0.5, 0.5)}, 'mean'),
        ({'img_size': 16, 'std': (0.5, 0.0, 0.5)}, 'std'),
    ],
)
def test_invalid_values_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_transform('probe_train', **kwargs)


def test_options_override_defaults():
    transform = build_transform('mae', img_size=16, scale=(0.5, 0.9), ratio=(1.0, 1.0), interpolation='bilinear')
    crop = transform.transforms[0]
    assert crop.scale == (0.5, 0.9)
    assert crop.ratio == (1.0, 1.0)
    assert crop.interpolation == v2.InterpolationMode.BILINEAR


@pytest.mark.parametrize(
    ('name', 'scale'), [('mae', (0.2, 1.0)), ('contrastive', (0.08, 1.0)), ('probe_train', (0.08, 1.0))]
)
def test_crop_defaults(name, scale):
    crop = build_transform(name, img_size=16).transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop)
    assert crop.scale == scale
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == v2.InterpolationMode.BICUBIC
    assert crop.antialias is True


def _left_minus_right(output: torch.Tensor) -> float:
    half = output.shape[-1] // 2
    return float(output[..., :half].mean() - output[..., half:].mean())


@pytest.mark.parametrize('name', ['mae', 'contrastive', 'contrastive_aug', 'probe_train'])
def test_hflip_false_never_flips(name):
    torch.manual_seed(0)
    # The full-image crop with a square ratio makes every difference between runs a flip.
    pipelines = _as_pipelines(build_transform(name, img_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False))
    for pipeline in pipelines:
        assert not any(isinstance(step, v2.RandomHorizontalFlip) for step in pipeline.transforms)
        for _ in range(40):
            assert _left_minus_right(pipeline(_left_bright_image())) > 0


def test_hflip_default_flips_sometimes():
    torch.manual_seed(0)
    transform = build_transform('probe_train', img_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    signs = {_left_minus_right(transform(_left_bright_image())) > 0 for _ in range(40)}
    assert signs == {True, False}


def test_contrastive_aug_steps():
    view1, view2 = build_transform('contrastive_aug', img_size=64)
    steps1, steps2 = view1.transforms, view2.transforms

    jitter = steps1[3]
    assert isinstance(jitter, v2.RandomApply)
    assert jitter.p == 0.8
    assert isinstance(jitter.transforms[0], v2.ColorJitter)
    assert jitter.transforms[0].brightness == (0.6, 1.4)
    assert jitter.transforms[0].contrast == (0.6, 1.4)
    assert jitter.transforms[0].saturation == (0.8, 1.2)
    assert jitter.transforms[0].hue == (-0.1, 0.1)

    assert isinstance(steps1[4], PILGaussianBlur), 'view 1 always blurs'
    assert steps1[4].sigma == (0.1, 2.0)
    assert isinstance(steps2[4], v2.RandomApply)
    assert steps2[4].p == 0.1
    assert isinstance(steps2[4].transforms[0], PILGaussianBlur)

    for steps in (steps1, steps2):
        grayscale = next(step for step in steps if isinstance(step, v2.RandomGrayscale))
        assert grayscale.p == 0.2
    assert not any(isinstance(step, v2.RandomSolarize) for step in steps1)
    solarize = next(step for step in steps2 if isinstance(step, v2.RandomSolarize))
    assert solarize.p == 0.2
    assert solarize.threshold == 128
    to_float = next(position for position, step in enumerate(steps2) if isinstance(step, v2.ToDtype))
    assert steps2.index(solarize) < to_float, 'solarize must act on 0..255 values'


def test_solarize_threshold_on_uint8_values():
    _, view2 = build_transform('contrastive_aug', img_size=8)
    solarize = next(step for step in view2.transforms if isinstance(step, v2.RandomSolarize))
    always = v2.RandomSolarize(threshold=solarize.threshold, p=1.0)
    pixels = np.array([[[100, 127, 128], [200, 255, 0]]], dtype=np.uint8)
    output = np.asarray(always(Image.fromarray(pixels)))
    np.testing.assert_array_equal(output, [[[100, 127, 127], [55, 0, 0]]])


def test_pair_views_differ():
    torch.manual_seed(0)
    view1, view2 = build_transform('contrastive_aug', img_size=16)
    image = _noise_image()
    assert not torch.equal(view1(image), view2(image))


def _drawn_sigma(seed: int, low: float = 0.1, high: float = 2.0) -> float:
    """The sigma that ``PILGaussianBlur`` draws first after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return torch.empty(1).uniform_(low, high).item()


def test_pil_blur_matches_pil_filter():
    image = _noise_image(30, 20)
    for seed in range(3):
        expected = image.filter(ImageFilter.GaussianBlur(radius=_drawn_sigma(seed)))
        torch.manual_seed(seed)
        blurred = PILGaussianBlur()(image)
        assert isinstance(blurred, Image.Image)
        assert np.array_equal(np.asarray(blurred), np.asarray(expected)), seed
    assert not np.array_equal(np.asarray(blurred), np.asarray(image))


def test_pil_blur_gives_tensors_the_pixels_of_pil():
    image = _noise_image(30, 20)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    torch.manual_seed(0)
    from_pil = PILGaussianBlur()(image)
    torch.manual_seed(0)
    from_tensor = PILGaussianBlur()(tensor)
    assert type(from_tensor) is torch.Tensor
    assert from_tensor.dtype == torch.uint8
    assert torch.equal(from_tensor, torch.from_numpy(np.array(from_pil)).permute(2, 0, 1))

    torch.manual_seed(0)
    wrapped = PILGaussianBlur()(tv_tensors.Image(tensor))
    assert isinstance(wrapped, tv_tensors.Image)
    assert torch.equal(wrapped.as_subclass(torch.Tensor), from_tensor)


def test_pil_blur_grey_tensor_keeps_one_channel():
    grey = torch.from_numpy(np.array(_noise_image(12, 10).convert('L'))).unsqueeze(0)
    blurred = PILGaussianBlur((2.0, 2.0))(grey)
    assert blurred.shape == (1, 10, 12)
    assert float(blurred.float().std()) < float(grey.float().std())


@pytest.mark.parametrize(
    ('tensor', 'message'),
    [
        (torch.rand(3, 8, 8), 'Apply the step before converting the image to float'),
        (torch.zeros(4, 8, 8, dtype=torch.uint8), r'with C 1 \(grey\) or 3 \(RGB\), got shape \(4, 8, 8\)'),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), r'expected one image \[C, H, W\]'),
    ],
)
def test_pil_blur_rejects_other_tensors(tensor, message):
    with pytest.raises(TypeError, match=message):
        PILGaussianBlur()(tensor)


def test_pil_blur_rejects_unsupported_pil_mode():
    with pytest.raises(TypeError, match=r"PIL mode 'P' cannot be blurred.*image.convert"):
        PILGaussianBlur()(Image.new('P', (8, 8)))


@pytest.mark.parametrize('sigma', [(0.0, 1.0), (2.0, 1.0), (1.0,)])
def test_pil_blur_rejects_bad_sigma(sigma):
    with pytest.raises(ValueError, match='sigma'):
        PILGaussianBlur(sigma)
