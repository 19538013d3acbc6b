"""Image and region decoding at the gateway's edge: the contract's functions (``salf.contract.images``
and ``salf.contract.regions``, the one definition training and export use too) with the gateway's
input policy (accepted formats, pixel cap) and its error type (:class:`InvalidArgument`).
"""
from __future__ import annotations

import functools

import numpy as np

from salf.contract import ContractError
from salf.contract import images as _images
from salf.contract import regions as _regions
from salf.contract.images import WIRE_FORMATS as ACCEPTED_FORMATS, DecodedImage, encode_png
from salf.contract.regions import MAX_POINTS

from .errors import InvalidArgument

__all__ = ["ACCEPTED_FORMATS", "MAX_PIXELS", "MAX_POINTS", "DecodedImage", "box_mask", "decode_image", "decode_mask",
           "encode_png", "points_mask", "require_nonempty"]

# Larger inputs are refused from their header, before decoding: 40 MP is above the phone and camera
# photos a client sends for explanation (a 48 MP sensor bins to 12 MP by default) and bounds what one
# decode may allocate (40 MP RGB = 120 MB). `salfctl serve --max-pixels` changes it.
MAX_PIXELS = 40_000_000


def _as_invalid_argument(fn):
    """``fn`` with the contract's input errors raised as :class:`InvalidArgument` (same message)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ContractError as exc:
            raise InvalidArgument(str(exc)) from exc
    return wrapped


@_as_invalid_argument
def decode_image(data: bytes, input_size: tuple[int, int], max_pixels: int | None = None) -> DecodedImage:
    """Encoded bytes -> :class:`DecodedImage` (model input uint8 ``[H, W, 3]`` and the image's own size).
    ``max_pixels``: default :data:`MAX_PIXELS`."""
    return _images.decode_image(data, input_size, max_pixels=max_pixels or MAX_PIXELS, formats=ACCEPTED_FORMATS)


@_as_invalid_argument
def decode_mask(data: bytes, image_size: tuple[int, int], max_pixels: int | None = None) -> np.ndarray:
    """Encoded mask -> bool ``[h, w]``; must be exactly ``image_size`` (checked from the header first)."""
    return _images.decode_mask(data, image_size, max_pixels=max_pixels or MAX_PIXELS, formats=ACCEPTED_FORMATS)


box_mask = _as_invalid_argument(_regions.box_mask)
points_mask = _as_invalid_argument(_regions.points_mask)
require_nonempty = _as_invalid_argument(_regions.require_nonempty)
