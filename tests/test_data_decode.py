"""The dataset's decoders: ``decode_jpeg`` for JPEGs under ``'auto'``, PIL for other formats and under ``'pil'``."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import MDSWriter

from composer_maect.data.convert import COLUMNS
from composer_maect.data.dataset import CorruptSampleError, ImageStreamingDataset, build_image_dataloader
from composer_maect.data.decode import DECODERS, decode_image, decode_rgb
from composer_maect.data.transforms import build_transform


def _encoded(image: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def _photo_like(height: int = 40, width: int = 56) -> Image.Image:
    """A smooth colour gradient with noise, which JPEG encodes with visible loss."""
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([rows * 255 / height, cols * 255 / width, (rows + cols) * 127 / (height + width)], axis=-1)
    pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize('mode', ['RGB', 'L', 'CMYK'])
@pytest.mark.parametrize('save_kwargs', [{'quality': 75}, {'quality': 95, 'progressive': True}])
def test_auto_jpeg_matches_pil_pixels(mode, save_kwargs):
    data = _encoded(_photo_like().convert(mode), 'JPEG', **save_kwargs)

    decoded = decode_rgb(data)

    assert isinstance(decoded, torch.Tensor)
    assert decoded.dtype == torch.uint8
    assert decoded.shape == (3, 40, 56)
    expected = torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1)
    assert torch.equal(decoded, expected)


def test_auto_other_formats_use_pil():
    decoded = decode_rgb(_encoded(Image.new('LA', (5, 4), (90, 10)), 'PNG'))

    assert isinstance(decoded, Image.Image)
    assert decoded.mode == 'RGB'
    assert decoded.getpixel((0, 0)) == (90, 90, 90)


def test_pil_decoder_returns_pil_image():
    data = _encoded(_photo_like(), 'JPEG')

    decoded = decode_rgb(data, 'pil')

    assert isinstance(decoded, Image.Image)
    assert np.array_equal(np.asarray(decoded), np.asarray(decode_image(data)))


@pytest.mark.parametrize('decoder', DECODERS)
def test_truncated_jpeg_raises_pil_error(decoder):
    data = _encoded(_photo_like(), 'JPEG')[:300]

    with pytest.raises(OSError, match=r'(?i)truncated'):
        decode_rgb(data, decoder)


def test_unknown_decoder_lists_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown decoder 'turbo'.*\['auto', 'pil'\]"):
        decode_rgb(b'\xff\xd8\xff', 'turbo')
    with pytest.raises(ValueError, match="Unknown decoder 'turbo'"):
        ImageStreamingDataset(local='unused', decoder='turbo')


@pytest.fixture
def jpeg_shards(tmp_path) -> Path:
    """Shards of three JPEGs and one PNG, the images as written."""
    out = tmp_path / 'shards'
    with MDSWriter(columns=COLUMNS, out=str(out)) as writer:
        for index in range(3):
            image = _photo_like(32 + 8 * index, 48).rotate(90 * index, expand=True)
            writer.write({'image': _encoded(image, 'JPEG', quality=90), 'label': index, 'index': index})
        writer.write({'image': _encoded(_photo_like(24, 24), 'PNG'), 'label': 3, 'index': 3})
    return out


def test_decoders_same_untransformed_samples(jpeg_shards):
    auto = ImageStreamingDataset(local=str(jpeg_shards), decoder='auto')
    pil = ImageStreamingDataset(local=str(jpeg_shards), decoder='pil')

    for position in range(4):
        assert torch.equal(auto[position]['image'], pil[position]['image'])


def test_decoders_close_views(jpeg_shards):
    """The same random draws crop the same region, and tensor and PIL resizing differ only by rounding."""
    transform = build_transform('contrastive', img_size=24)
    kwargs = {'local': str(jpeg_shards), 'views': 2, 'transform': transform, 'augmentation_seed': 5}
    auto = ImageStreamingDataset(decoder='auto', **kwargs)
    pil = ImageStreamingDataset(decoder='pil', **kwargs)

    for position in range(3):
        for view in ('view0', 'view1'):
            difference = (auto[position][view] - pil[position][view]).abs()
            # Normalized values: 0.05 is about 3 of 255 levels.
            assert float(difference.mean()) < 0.05, (position, view)


def test_corrupt_jpeg_sample_names_shard(tmp_path):
    out = tmp_path / 'corrupt'
    with MDSWriter(columns=COLUMNS, out=str(out)) as writer:
        writer.write({'image': _encoded(_photo_like(), 'JPEG')[:300], 'label': 0, 'index': 0})
    dataset = ImageStreamingDataset(local=str(out))

    with pytest.raises(CorruptSampleError, match=r'sample 0 .*shard\.00000\.mds.*(?i:truncated)'):
        dataset[0]


def test_dataloader_workers_decode_jpegs(jpeg_shards):
    transform = build_transform('contrastive_aug', img_size=16)
    loader = build_image_dataloader(
        local=str(jpeg_shards), batch_size=2, views=2, transform=transform, shuffle=False, num_workers=1
    )

    batches = list(loader)

    assert len(batches) == 2
    for batch in batches:
        assert batch['view0'].shape == batch['view1'].shape == (2, 3, 16, 16)
        assert batch['view0'].dtype == torch.float32
        assert torch.isfinite(batch['view0']).all()
