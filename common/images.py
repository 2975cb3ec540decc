"""Decoding a PNG or JPEG into the model's uint8 [32, 32, 3] pixels, or a
clear reason why not. The folder source (job/image_folder.py) decodes its
training images here and the service decodes uploaded photos here, so a photo
sent to `/predict` reaches the model the way the training images did.
Nothing here trusts its input."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

SIZE = 32
# A decompression bomb is refused before it is decoded: 40 megapixels is
# far above any photo a person uploads.
Image.MAX_IMAGE_PIXELS = 40_000_000


class BadInput(ValueError):
    """Bytes that are not an image we can classify: the service answers 400,
    the folder source names the file."""


def decode(data: bytes) -> np.ndarray:
    """PNG or JPEG bytes of any size -> uint8 [32, 32, 3]."""
    if not data:
        raise BadInput("the image is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ("PNG", "JPEG"):
                raise BadInput(f"expected a PNG or JPEG image, got {image.format or 'an unknown format'}")
            # Pillow itself only refuses above twice MAX_IMAGE_PIXELS (it merely warns in between).
            if image.width * image.height > Image.MAX_IMAGE_PIXELS:
                raise BadInput(f"the image is {image.width}x{image.height} pixels; "
                               f"at most {Image.MAX_IMAGE_PIXELS} pixels are decoded")
            image = image.convert("RGB")
            if image.size != (SIZE, SIZE):
                image = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR, reducing_gap=None)
            return np.asarray(image, dtype=np.uint8)
    except BadInput:
        raise
    except UnidentifiedImageError:  # Pillow's own message shows the repr of a BytesIO object
        raise BadInput("cannot decode the image: it is not a PNG or JPEG file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # Pillow raises SyntaxError for some corrupt PNGs (e.g. a garbage chunk type after the first IDAT).
        raise BadInput(f"cannot decode the image: {exc}") from None
