"""Decoding of the encoded image bytes that the shards store, shared by the converter and the dataset.

The converter decodes every file with ``decode_image`` before writing it, so that an image that the dataset cannot
turn into RGB is left out and reported while converting, not found while training.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

__all__ = ['DECODE_ERRORS', 'decode_image']

# Errors that PIL raises for bytes it cannot open or decode, and the ValueError of decode_image for pixel values
# without an 8-bit scale.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

_MAX_16_BIT = 65535


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
    with Image.open(io.BytesIO(data)) as image:
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
