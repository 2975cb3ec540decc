"""Decoding a PNG or JPEG into the model's uint8 [32, 32, 3] pixels, or a
clear reason why not. The folder source (job/image_folder.py) decodes its
training images here and the service decodes uploaded photos here, so a photo
sent to `/predict` reaches the model the way the training images did.
Nothing here trusts its input: an image's size is checked in its header,
before a pixel is decoded."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

SIZE = 32
# What is decoded at most: 4096x4096, 128 times a 32x32 image's side. That is
# 64 MiB in Pillow (4 bytes a pixel, RGB included), twice that while it is
# converted to RGB. A PNG is decoded whole, so a larger one is refused; a JPEG
# is decoded reduced (1/2, 1/4 or 1/8, by libjpeg's DCT scaling) under it, so
# a phone's photo (12 to 48 megapixels) is not.
DECODED_PIXELS = 4096 * 4096
# What a JPEG may declare at most: 1/8 of 8192x8192 decodes at 1024x1024.
Image.MAX_IMAGE_PIXELS = 8192 * 8192


class BadInput(ValueError):
    """Bytes that are not an image we can classify: the service answers 400,
    the folder source names the file."""


def decode(data: bytes, reserve=None) -> np.ndarray:
    """PNG or JPEG bytes -> uint8 [32, 32, 3]. `reserve(nbytes)`, when given, is a context manager
    held while the image's pixels (at most `nbytes` of memory) are decoded: the service's budget."""
    if not data:
        raise BadInput("the image is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            if image.format not in ("PNG", "JPEG"):
                raise BadInput(f"expected a PNG or JPEG image, got {image.format or 'an unknown format'}")
            declared, pixels = image.size, image.width * image.height
            if image.format == "JPEG" and pixels > DECODED_PIXELS:
                # Pillow itself only refuses above twice MAX_IMAGE_PIXELS (it merely warns in between).
                if pixels > Image.MAX_IMAGE_PIXELS:
                    raise BadInput(_too_large(declared, Image.MAX_IMAGE_PIXELS, "in a JPEG"))
                image.draft("RGB", reduced(declared))
            if image.width * image.height > DECODED_PIXELS:
                raise BadInput(_too_large(declared, DECODED_PIXELS, "are decoded"))
            with (reserve or _unbounded)(decoded_bytes(image.size, image.mode)):
                if image.mode != "RGB":  # convert copies even an RGB image
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


def reduced(size: tuple[int, int]) -> tuple[int, int]:
    """The size to ask JPEG's draft for: the least reduction (2, 4 or 8) that brings `size` within
    DECODED_PIXELS, or 8 (which the declared limit then keeps within it)."""
    width, height = size
    scale = next((s for s in (2, 4) if -(-width // s) * -(-height // s) <= DECODED_PIXELS), 8)
    return max(1, width // scale), max(1, height // scale)


def decoded_bytes(size: tuple[int, int], mode: str) -> int:
    """The memory decoding an image of `size` in `mode` holds at most: 4 bytes a pixel (what Pillow
    takes for RGB and RGBA, and more than for L, P or I;16), twice unless it is RGB already,
    for the RGB copy."""
    return size[0] * size[1] * 4 * (1 if mode == "RGB" else 2)


def _too_large(size: tuple[int, int], limit: int, what: str) -> str:
    side = int(limit**0.5)
    return f"the image is {size[0]}x{size[1]} pixels; at most {side}x{side} ({limit} pixels) {what}"


@contextlib.contextmanager
def _unbounded(nbytes: int):
    yield
