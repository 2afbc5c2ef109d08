"""The converter on the colour modes and bit depths of common image files, and on files it must leave out.

Each good image has its own class folder, so its label identifies it after conversion. The good images are read back
through ImageStreamingDataset and compared with the pixels they were made from.
"""

import io
import json
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from composer_maect.data.convert import METADATA_FILENAME, convert
from composer_maect.data.dataset import ImageStreamingDataset

# 0, 257, 514, ..., 65535: every 16-bit value v * 257 has the top byte v.
GRADIENT_16 = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)
GRADIENT_8 = np.arange(256, dtype=np.uint8).reshape(16, 16)


def _pgm_16(pixels: np.ndarray) -> bytes:
    height, width = pixels.shape
    return f'P5\n{width} {height}\n65535\n'.encode() + pixels.astype('>u2').tobytes()


def _png_rgb_16(pixels: np.ndarray) -> bytes:
    """Encode [H, W, 3] uint16 pixels as a 48-bit RGB PNG, which PIL cannot write."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    rows = b''.join(b'\0' + pixels[row].astype('>u2').tobytes() for row in range(height))
    header = struct.pack('>IIBBBBB', width, height, 16, 2, 0, 0, 0)  # 16 bits per channel, colour type RGB
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b'')


def _palette_image(transparent: bool) -> Image.Image:
    image = Image.fromarray(np.array([[0, 1], [1, 2]], dtype=np.uint8), mode='P')
    image.putpalette([200, 10, 20, 30, 220, 40, 50, 60, 230] + [0] * (256 * 3 - 9))
    if transparent:
        image.info['transparency'] = 0
    return image


@pytest.fixture
def mixed_folder(tmp_path) -> dict:
    root = tmp_path / 'images'
    good = {
        'cmyk': ('a.jpg', Image.new('CMYK', (8, 8), (0, 255, 255, 0))),
        'grey': ('a.png', Image.fromarray(GRADIENT_8)),
        'grey16_pgm': ('a.pgm', None),
        'grey16_png': ('a.png', Image.fromarray(GRADIENT_16)),
        'grey16_tiff': ('a.tif', Image.fromarray(GRADIENT_16)),
        'grey_alpha': ('a.png', Image.fromarray(np.stack([GRADIENT_8, 255 - GRADIENT_8], axis=-1), mode='LA')),
        'palette': ('a.png', _palette_image(transparent=False)),
        'palette_transparent': ('a.png', _palette_image(transparent=True)),
        'rgb': ('a.jpg', Image.new('RGB', (8, 8), (250, 128, 5))),
        'rgb16_png': ('a.png', None),
    }
    for name, (filename, image) in good.items():
        (root / name).mkdir(parents=True)
        if name == 'grey16_pgm':
            (root / name / filename).write_bytes(_pgm_16(GRADIENT_16))
        elif name == 'rgb16_png':
            pixels = np.stack([GRADIENT_16, 65535 - GRADIENT_16, np.full_like(GRADIENT_16, 0x8000)], axis=-1)
            (root / name / filename).write_bytes(_png_rgb_16(pixels))
        else:
            image.save(root / name / filename)

    bad_folder = root / 'rgb'
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, format='PNG')
    (bad_folder / 'truncated.png').write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    Image.fromarray(GRADIENT_16.astype(np.float32)).save(bad_folder / 'float.tif')
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)).save(bad_folder / 'int32.tif')
    os.symlink(root / 'nowhere.jpg', bad_folder / 'dangling.jpg')
    (bad_folder / 'labels.csv').write_text('a,1\n')
    (bad_folder / '.DS_Store').write_bytes(b'\0\0\0\1Bud1')
    (root / 'zz_empty').mkdir()
    bad = {
        str(bad_folder / 'truncated.png'): 'truncated',
        str(bad_folder / 'float.tif'): 'mode F',
        str(bad_folder / 'int32.tif'): 'pixels in 70000..70000',
        str(bad_folder / 'dangling.jpg'): 'read failed',
        str(bad_folder / 'labels.csv'): 'not an image file extension',
        str(bad_folder / '.DS_Store'): 'not an image file extension',
    }
    return {'root': root, 'classes': [*good, 'zz_empty'], 'bad': bad}


def _images_by_class(out: Path, classes: list[str]) -> dict[str, torch.Tensor]:
    """Return each converted image as RGB uint8 [3, H, W], keyed by class name."""
    dataset = ImageStreamingDataset(local=str(out), split='train', batch_size=1)
    items = [dataset[position] for position in range(dataset.num_samples)]
    return {classes[item['label']]: (item['image'] * 255).round().to(torch.uint8) for item in items}


def test_bad_files_listed_and_counted(mixed_folder, tmp_path, caplog):
    out = tmp_path / 'out'
    with caplog.at_level(logging.WARNING, logger='composer_maect.data.convert'):
        report = convert(str(mixed_folder['root']), str(out), progress=False)

    errors = {item.path: item.error for item in report.skipped}
    assert set(errors) == set(mixed_folder['bad'])
    for path, reason in mixed_folder['bad'].items():
        assert reason in errors[path], (path, errors[path])
    assert report.counts['train'] == {name: 1 for name in mixed_folder['classes'][:-1]} | {'zz_empty': 0}

    metadata = json.loads((out / METADATA_FILENAME).read_text())
    assert metadata['num_skipped'] == len(errors)
    assert {item['path']: item['error'] for item in metadata['skipped']} == errors
    warnings = '\n'.join(record.getMessage() for record in caplog.records)
    assert f'Skipped {len(errors)} unreadable or non-image files' in warnings
    for path in errors:
        assert path in warnings
    assert 'zz_empty' in warnings


def test_modes_and_depths_become_rgb(mixed_folder, tmp_path):
    out = tmp_path / 'out'
    convert(str(mixed_folder['root']), str(out), progress=False)
    images = _images_by_class(out, mixed_folder['classes'])

    grey = torch.from_numpy(GRADIENT_8).expand(3, 16, 16)
    # 16-bit grey keeps its top byte: the 0..65535 gradient gives 0..255, not mostly white.
    for name in ('grey', 'grey16_png', 'grey16_tiff', 'grey16_pgm', 'grey_alpha'):
        assert torch.equal(images[name], grey), name
    # The alpha channel and palette transparency are dropped: each pixel keeps its stored colour.
    palette = torch.tensor([[[200, 10, 20], [30, 220, 40]], [[30, 220, 40], [50, 60, 230]]], dtype=torch.uint8)
    for name in ('palette', 'palette_transparent'):
        assert torch.equal(images[name], palette.permute(2, 0, 1)), name
    rgb16 = torch.stack([grey[0], 255 - grey[0], torch.full((16, 16), 128, dtype=torch.uint8)])
    assert torch.equal(images['rgb16_png'], rgb16)
    red, green, blue = images['cmyk'].float().mean(dim=(1, 2))
    assert red > 200
    assert green < 50
    assert blue < 50
    assert (images['rgb'].float().mean(dim=(1, 2)) - torch.tensor([250.0, 128.0, 5.0])).abs().max() < 4
