"""Decoding of the encoded image bytes that the shards store, shared by the converter and the dataset.

The converter decodes every file with ``decode_image`` (PIL) before writing it, so that an image that the dataset
cannot turn into RGB is left out and reported while converting, not found while training.

The dataset decodes with ``decode_rgb``. With the ``'auto'`` decoder, JPEG bytes go to ``torchvision.io.decode_jpeg``,
which gives the same pixels as PIL (both use libjpeg-turbo) and, with the view transforms run on the uint8 tensor,
about twice the samples per CPU second (``python -m composer_maect.benchmark --rows data``). Other formats, and
JPEGs that ``decode_jpeg`` rejects, go to PIL.
"""

from __future__ import annotations

import io
import struct
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

__all__ = ['DECODERS', 'DECODE_ERRORS', 'check_decoder', 'decode_image', 'decode_rgb']

DECODERS = ('auto', 'pil')

# Errors that PIL raises for bytes it cannot open or decode, and the ValueError of decode_image for pixel values
# without an 8-bit scale.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

_MAX_16_BIT = 65535

# Every JPEG file starts with the start-of-image marker followed by the first marker's 0xFF.
_JPEG_START = b'\xff\xd8\xff'


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image.

    Grey, grey with alpha, palette (with or without transparency) and CMYK images become RGB, and an alpha channel
    is dropped, so a transparent pixel gets its stored colour. 16-bit grey images (PIL modes ``I;16*``, and ``I`` for
    16-bit PGM and older PNG decoders) keep their top 8 bits instead of being clipped at 255 by PIL's
    ``convert('RGB')``.

    Raises:
        ValueError: a floating-point image (mode ``F``) or an integer image (mode ``I``) with values outside
            0..65535, which have no standard 8-bit scale.
        OSError, SyntaxError, ValueError, EOFError, struct.error, PIL.Image.DecompressionBombError: the bytes are not
            a readable image.
    """
    try:
        opened = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # PIL's message contains the address of the in-memory buffer, which is of no use to the reader.
        raise UnidentifiedImageError('the bytes are not in an image format that PIL can identify') from None
    with opened as image:
        if image.mode == 'F':
            raise ValueError(
                'floating-point pixels (PIL mode F) have no standard 8-bit scale; convert the image to 8-bit or '
                '16-bit integers before converting the data set'
            )
        if image.mode.startswith('I;16') or image.mode == 'I':
            pixels = np.asarray(image, dtype=np.int64)
            low, high = (int(pixels.min()), int(pixels.max())) if pixels.size else (0, 0)
            if low < 0 or high > _MAX_16_BIT:
                raise ValueError(
                    f'32-bit integer pixels in {low}..{high} (PIL mode {image.mode}) have no standard 8-bit scale; '
                    'only 0..65535 (16-bit) is read. Convert the image to 8-bit or 16-bit before converting the data '
                    'set'
                )
            # NOTE: mode 'I' with values in 0..65535 is read as 16-bit, so a 32-bit file that contains 8-bit values
            # comes out nearly black.
            return Image.fromarray((pixels >> 8).astype(np.uint8)).convert('RGB')
        return image.convert('RGB')


def check_decoder(decoder: str) -> str:
    """Return ``decoder`` if it is one of ``DECODERS``, else raise ``ValueError`` naming the valid ones."""
    if decoder not in DECODERS:
        raise ValueError(f'Unknown decoder {decoder!r}. Valid decoders: {list(DECODERS)}.')
    return decoder


def decode_rgb(data: bytes, decoder: str = 'auto') -> torch.Tensor | Image.Image:
    """Decode encoded image bytes into RGB for the view transforms.

    Args:
        data: the encoded bytes of one image.
        decoder: ``'auto'`` decodes JPEG bytes with ``torchvision.io.decode_jpeg`` into a uint8 tensor
            ``[3, H, W]`` and anything else with ``decode_image``. ``'pil'`` always uses ``decode_image`` and
            returns a PIL image.

    Raises:
        ValueError: ``decoder`` is not one of ``DECODERS``.
        The errors of ``decode_image``: a JPEG that ``decode_jpeg`` rejects is decoded again by PIL, so a corrupt
        or truncated file raises PIL's error.
    """
    check_decoder(decoder)
    if decoder == 'auto' and data[:3] == _JPEG_START:
        # Imported here, so that the converter, which decodes with PIL only, does not import torch.
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # PIL decodes the JPEG variants that libjpeg-turbo in torchvision rejects, or raises a clear error.
    return decode_image(data)
