"""Image and region decoding at the gateway's edge (docs/DESIGN.md, "Image preprocessing").

Images arrive as encoded bytes. They are decoded with Pillow, converted to RGB and resized
bilinearly to the model's input size, kept as uint8 ``[H, W, 3]``; normalisation happens inside the
model graph. Regions are boolean masks ``[h, w]`` at the image's *own* size.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import InvalidArgument

# Larger inputs are refused rather than decoded: 64 MP is well above any camera image a client sends
# for explanation, and bounds the gateway's memory per request.
MAX_PIXELS = 64_000_000
# A points region is a few clicks; each point costs its disk's area, so the count is bounded too.
MAX_POINTS = 1024
# Pillow reports multi-picture JPEGs from cameras as "MPO": still JPEG.
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")


@dataclass(frozen=True)
class DecodedImage:
    """A request image: ``model_input`` uint8 ``[H, W, 3]`` at the model's input size, and the
    image's own ``size = (height, width)`` in pixels (heatmaps and regions use it)."""
    model_input: np.ndarray
    size: tuple[int, int]


def _open(data: bytes, what: str) -> Image.Image:
    if not data:
        raise InvalidArgument(f"{what} is empty: send the encoded bytes of a JPEG, PNG or WebP file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ACCEPTED_FORMATS:
                raise InvalidArgument(f"{what} is {img.format}; send JPEG, PNG or WebP")
            if img.width * img.height > MAX_PIXELS:
                raise InvalidArgument(f"{what} is {img.width}x{img.height} pixels; at most {MAX_PIXELS} pixels are accepted")
            img.load()
    except InvalidArgument:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidArgument(f"{what} is too large to decode: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise InvalidArgument(f"{what} ({len(data)} bytes) could not be decoded as JPEG, PNG or WebP: "
                              f"not a recognised image format") from exc
    except Exception as exc:  # Pillow raises many types for corrupt data; all mean "cannot decode"
        raise InvalidArgument(f"{what} ({len(data)} bytes) could not be decoded as JPEG, PNG or WebP: {exc}") from exc
    return img


def decode_image(data: bytes, input_size: tuple[int, int]) -> DecodedImage:
    """Encoded bytes -> :class:`DecodedImage` with the model input ``[H, W, 3]`` uint8 at
    ``input_size = (H, W)`` (Pillow RGB, bilinear resize)."""
    img = _open(data, "image").convert("RGB")
    own = (img.height, img.width)
    h, w = input_size
    if own != (h, w):
        img = img.resize((w, h), Image.BILINEAR)
    return DecodedImage(np.asarray(img, dtype=np.uint8), own)


def decode_mask(data: bytes, image_size: tuple[int, int]) -> np.ndarray:
    """Encoded mask -> bool ``[h, w]`` (non-zero grey pixels); must be exactly ``image_size``."""
    img = _open(data, "mask")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # An RGBA mask drawn in an editor usually marks the region by opacity.
        img = img.convert("RGBA")
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() != alpha.max():
            mask = alpha > 0
            return _check_mask(mask, image_size)
    mask = np.asarray(img.convert("L")) > 0
    return _check_mask(mask, image_size)


def _check_mask(mask: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    if mask.shape != tuple(image_size):
        raise InvalidArgument(f"mask is {mask.shape[1]}x{mask.shape[0]} (width x height) but the image is "
                              f"{image_size[1]}x{image_size[0]}; the mask must have the image's own size")
    return mask


def box_mask(box: tuple[float, float, float, float], image_size: tuple[int, int]) -> np.ndarray:
    """Box ``(x0, y0, x1, y1)`` in pixels -> bool ``[h, w]``: pixels whose centre lies in
    ``[x0, x1) x [y0, y1)``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InvalidArgument(f"box ({x0}, {y0}, {x1}, {y1}) has a non-finite coordinate")
    if not (x1 > x0 and y1 > y0):
        raise InvalidArgument(f"box ({x0}, {y0}, {x1}, {y1}) needs x1 > x0 and y1 > y0")
    h, w = image_size
    ys = np.arange(h) + 0.5
    xs = np.arange(w) + 0.5
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def points_mask(points: list[tuple[float, float]], radius: float, image_size: tuple[int, int]) -> np.ndarray:
    """Points ``(x, y)`` -> bool ``[h, w]``: union of disks of ``radius`` pixels (pixel centres within
    the radius). Every point must lie inside the image."""
    if not points:
        raise InvalidArgument("points region has no point")
    if not (np.isfinite(radius) and radius > 0):
        raise InvalidArgument(f"points radius must be a positive number of pixels, got {radius}")
    if len(points) > MAX_POINTS:
        raise InvalidArgument(f"points region has {len(points)} points; at most {MAX_POINTS} are accepted "
                              f"(send a mask_png for a region drawn with many points)")
    h, w = image_size
    mask = np.zeros((h, w), dtype=bool)
    for x, y in points:
        if not (np.isfinite(x) and np.isfinite(y) and 0 <= x <= w and 0 <= y <= h):
            raise InvalidArgument(f"point ({x}, {y}) lies outside the {w}x{h} image")
        # Only the disk's bounding window (one pixel of slack for rounding): the cost of a point is
        # its area, not the image's, so many small clicks on a large image stay cheap.
        y0, y1 = max(0, int(np.floor(y - radius)) - 1), min(h, int(np.ceil(y + radius)) + 1)
        x0, x1 = max(0, int(np.floor(x - radius)) - 1), min(w, int(np.ceil(x + radius)) + 1)
        yy = np.arange(y0, y1)[:, None] + 0.5
        xx = np.arange(x0, x1)[None, :] + 0.5
        mask[y0:y1, x0:x1] |= (yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2
    return mask


def require_nonempty(mask: np.ndarray, what: str = "region") -> np.ndarray:
    """Raise :class:`InvalidArgument` when ``mask`` selects no pixel."""
    if not mask.any():
        raise InvalidArgument(f"{what} is empty: it covers no pixel of the {mask.shape[1]}x{mask.shape[0]} image")
    return mask


def encode_png(array: np.ndarray) -> bytes:
    """uint8 ``[H, W]`` or ``[H, W, 3|4]`` -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
