"""Turning what clients send into uint8 [N, 32, 32, 3] pixels, or a clear
reason why not: base64 strings, `{"b64": ...}` instances and pixel lists.
The image bytes themselves are decoded by common/images.py, as the training
job's folder source decodes its images, within the worker's decoding budget
(serve/budget.py) and the request's deadline. Nothing here trusts its input."""

from __future__ import annotations

import base64
import binascii

import numpy as np

from common import images
from common.images import SIZE, BadInput
from serve.budget import DECODING


def _b64(text) -> bytes:
    if not isinstance(text, str):
        raise BadInput('"b64" must be a base64 string')
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(f'"b64" is not valid base64: {exc}') from None


def decode(data: bytes) -> np.ndarray:
    """PNG or JPEG bytes -> uint8 [32, 32, 3], once the worker's decoding budget has room for them."""
    return images.decode(data, DECODING.reserve)


def decode_b64(text) -> np.ndarray:
    return decode(_b64(text))


def encoded(value, where: str) -> bytes:
    """A `{"b64": ...}` instance's image bytes, for a signature that decodes them itself. They are
    decoded here too, only as a check: a decompression bomb or a non-image is a 400 before the model
    sees it."""
    if not isinstance(value, dict) or set(value) != {"b64"}:
        raise BadInput(f'{where}: expected {{"b64": "<PNG or JPEG bytes>"}}')
    data = _b64(value["b64"])
    decode(data)
    return data


def pixels(values, where: str, expected: str = "numbers from 0 to 255") -> np.ndarray:
    """Pixel values as a client sent them (nested or flat lists) -> uint8, by the
    one rule every route applies: whole numbers from 0 to 255. 12.0 is 12; 12.5
    is refused, as TF Serving refuses a fraction for a uint8 input."""
    try:
        # Pixels are nearly always integers: read as such they need no float copy.
        array = np.asarray(values)
        if array.dtype.kind not in "iu":
            array = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):  # ragged, not numbers, or an integer beyond float64
        raise BadInput(f"{where}: expected {expected}") from None
    # NaN fails the whole-number test; infinities the range.
    if array.size and (array.min() < 0 or array.max() > 255
                       or (array.dtype.kind == "f" and np.any(array != np.rint(array)))):
        raise BadInput(f"{where}: pixel values are whole numbers from 0 to 255")
    return array.astype(np.uint8)


def from_nested(value, where: str) -> np.ndarray:
    """A 32x32x3 nested list of pixel values -> uint8 [32, 32, 3]."""
    array = pixels(value, where, "a 32x32x3 nested list of numbers from 0 to 255")
    if array.shape != (SIZE, SIZE, 3):
        raise BadInput(f"{where}: expected shape [32, 32, 3], got {list(array.shape)}")
    return array


def instance(value, where: str) -> np.ndarray:
    """One TF Serving REST instance: nested pixels or {"b64": ...}."""
    if isinstance(value, dict):
        if set(value) != {"b64"}:
            raise BadInput(f'{where}: an object instance must be {{"b64": "<PNG or JPEG bytes>"}}')
        return decode_b64(value["b64"])
    return from_nested(value, where)
