"""Image and mask decoding, and the model-input preprocessing: one definition for training, export
parity, the gateway and the clients (docs/DESIGN.md, "Image preprocessing").

Decoding (:func:`open_image`, then :func:`upright_rgb`):

- the first frame of an animated or multi-frame file (GIF, APNG, animated WebP, MPO);
- EXIF orientation applied (a phone photo is explained the way it is shown, not sideways);
- 16-bit greyscale (Pillow modes ``I;16*`` and ``I``) scaled to 8 bits by its high byte (Pillow's own
  ``convert("RGB")`` clips it, which turns most 16-bit images white); 16-bit RGB PNGs Pillow already
  reads as 8-bit RGB by their high bytes; 32-bit float (``F``) is clipped to [0, 255];
- palette, grey, CMYK and every other mode through Pillow's ``convert("RGB")``; an alpha channel is
  dropped (the colour underneath is kept, no compositing).

Preprocessing (:func:`model_input`): bilinear resize to the model's ``(H, W)`` (Pillow
``Image.BILINEAR``), uint8 ``[H, W, 3]``. Normalisation (``/255``, mean, std) happens inside the model.
A JPEG at least twice the model input on both axes is decoded at a reduced scale (Pillow's ``draft``:
1/2, 1/4 or 1/8 in the DCT, never below the input size) before that resize: a 12 MP phone photo then
costs a fraction of its full decode. Every part decodes through here, so they agree on it.

Masks (:func:`decode_mask`): same orientation and first-frame rule; the size is checked against the
image's from the header, before the pixels are decoded. A mask with an alpha channel (RGBA, LA, PA,
or a palette with transparency) that is not fully opaque selects its non-transparent pixels
(alpha > 0), whatever their colour: a fully transparent layer selects nothing. A fully opaque mask,
and a mask without alpha, selects its non-zero grey pixels.
"""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from . import ContractError

Source = Union[bytes, bytearray, str, Path]

# Pillow reports multi-picture JPEGs from cameras as "MPO": still JPEG.
WIRE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(ContractError):
    """An image or mask that cannot be decoded, is of a refused format, or is too large."""


@dataclass(frozen=True)
class DecodedImage:
    """An image prepared for the model: ``model_input`` uint8 ``[H, W, 3]`` at the model's input size,
    and the upright image's own ``size = (height, width)`` in pixels (heatmaps and regions use it)."""
    model_input: np.ndarray
    size: tuple[int, int]


def _describe(source: Source) -> str:
    return f"{len(source)} bytes" if isinstance(source, (bytes, bytearray)) else str(source)


_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _header_size(img: Image.Image) -> tuple[int, int]:
    """``(height, width)`` of the upright image, from the header (before the pixels are decoded)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block: the pixels decide later
        orientation = 1
    return (img.width, img.height) if orientation in _TRANSPOSED else (img.height, img.width)


def open_image(source: Source, what: str = "image", max_pixels: int | None = None,
               formats: tuple[str, ...] | None = None, draft_to: tuple[int, int] | None = None,
               expect_size: tuple[int, int] | None = None) -> Image.Image:
    """Open and load the first frame of an image file or encoded bytes.

    ``max_pixels``: refuse larger images before decoding their pixels. ``formats``: the accepted Pillow
    formats (None: any Pillow reads). ``draft_to = (H, W)``: decode a JPEG at least twice that size at a
    reduced DCT scale (module docstring). ``expect_size = (h, w)``: the upright size the file must have,
    checked before decoding. Raises :class:`ImageDecodeError` naming ``what`` and the problem.
    After a draft reduction, the upright size of the full image is ``img.info["salf_size"]``.
    """
    if isinstance(source, (bytes, bytearray)) and not source:
        raise ImageDecodeError(f"{what} is empty: send the encoded bytes of a JPEG, PNG or WebP file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            if formats is not None and img.format not in formats:
                raise ImageDecodeError(f"{what} is {img.format}; send {_wire(formats)}")
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageDecodeError(f"{what} is {img.width}x{img.height} pixels; at most {max_pixels} pixels "
                                       f"are accepted")
            size = _header_size(img)
            if expect_size is not None and size != tuple(expect_size):
                raise ImageDecodeError(_size_mismatch(size, expect_size))
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            if draft_to is not None and img.format in ("JPEG", "MPO"):
                h, w = draft_to
                if img.height >= 2 * h and img.width >= 2 * w:
                    img.draft("RGB", (w, h) if size == (img.height, img.width) else (h, w))
                    img.info["salf_size"] = size  # the pixels decoded below are fewer than the image's
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"{what} is too large to decode: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{what} ({_describe(source)}) could not be decoded as {_wire(formats)}: "
                               f"not a recognised image format") from exc
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"{what} {source} does not exist") from exc
    except Exception as exc:  # Pillow raises many types for corrupt data; all mean "cannot decode"
        raise ImageDecodeError(f"{what} ({_describe(source)}) could not be decoded as {_wire(formats)}: {exc}") from exc
    return img


def _wire(formats) -> str:
    return "JPEG, PNG or WebP" if formats in (None, WIRE_FORMATS) else ", ".join(formats)


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says (a copy when turned; ``img`` itself otherwise)."""
    turned = ImageOps.exif_transpose(img)
    return img if turned is None else turned


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB 8-bit per channel, with the module's rules for 16-bit and float images."""
    if img.mode in _SIXTEEN_BIT:
        a = np.asarray(img).astype(np.int64)
        grey = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "F":
        grey = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _size_mismatch(size, expected) -> str:
    return (f"mask is {size[1]}x{size[0]} (width x height) but the image is {expected[1]}x{expected[0]}; "
            f"the mask must have the image's own size")


def upright_rgb(img: Image.Image) -> Image.Image:
    """The decoding rules of the module docstring: upright, RGB, 8-bit."""
    return to_rgb(upright(img))


def model_input(img: Image.Image, input_size: tuple[int, int] | None) -> np.ndarray:
    """RGB ``img`` -> uint8 ``[H, W, 3]``, bilinear-resized to ``input_size = (H, W)`` when given."""
    if input_size is not None:
        h, w = (int(v) for v in input_size)
        if (img.height, img.width) != (h, w):
            img = img.resize((w, h), Image.BILINEAR)
    return np.array(img, dtype=np.uint8)


def decode_image(source: Source, input_size: tuple[int, int] | None, max_pixels: int | None = None,
                 formats: tuple[str, ...] | None = None) -> DecodedImage:
    """A file or encoded bytes -> :class:`DecodedImage` (decoding and preprocessing rules above)."""
    opened = open_image(source, "image", max_pixels, formats, draft_to=input_size)
    img = upright_rgb(opened)
    size = opened.info.get("salf_size", (img.height, img.width))
    return DecodedImage(model_input(img, input_size), tuple(size))


def load_image(source: Source, input_size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 ``[H, W, 3]`` model input of a file or encoded bytes (any format Pillow reads)."""
    return decode_image(source, input_size).model_input


def load_rgb(source: Source) -> np.ndarray:
    """uint8 RGB ``[h, w, 3]`` at the upright image's own size (for overlays)."""
    return decode_image(source, None).model_input


def decode_mask(source: Source, image_size: tuple[int, int] | None = None, max_pixels: int | None = None,
                formats: tuple[str, ...] | None = None) -> np.ndarray:
    """A mask file or encoded bytes -> bool ``[h, w]`` (the mask rule of the module docstring).

    ``image_size = (h, w)``: the mask must have the image's own (upright) size.
    """
    img = upright(open_image(source, "mask", max_pixels, formats, expect_size=image_size))
    mask = None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = np.asarray(img.convert("RGBA").getchannel("A"))
        if alpha.min() < 255:
            mask = alpha > 0
    if mask is None and img.mode in (*_SIXTEEN_BIT, "F"):
        mask = np.asarray(img) > 0  # any non-zero sample, before the 8-bit scaling would drop small values
    if mask is None:
        mask = np.asarray(img.convert("L")) > 0
    if image_size is not None and mask.shape != tuple(image_size):
        raise ImageDecodeError(_size_mismatch(mask.shape, image_size))
    return mask


_PNG_COLOUR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA), 8 bits each


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 ``[H, W]`` or ``[H, W, 3|4]`` -> PNG bytes (lossless at every level).

    Written here with zlib rather than through Pillow, for a measured reason: every row uses PNG's "Sub"
    filter (each byte minus the one a pixel to its left, mod 256), which suits smooth heatmaps, and
    there is no per-image Pillow overhead. A 500x375 heatmap: 0.84 ms and 20 KB against Pillow's 2.6 ms
    and 31 KB at the same zlib level 1; 112x112: 0.08 ms against 0.40 ms (measured once on the 2-core
    EPYC, 2026-12-06; at the paper's size the five heatmaps of an Explain were 28% of its time at
    Pillow's default level 6, and most of a demo-size Explain's gateway time after it). Any PNG decoder reads it; tests/unit/test_images.py checks it against Pillow's."""
    a = np.asarray(array)
    channels = 1 if a.ndim == 2 else (a.shape[2] if a.ndim == 3 else 0)
    if a.dtype != np.uint8 or channels not in _PNG_COLOUR_TYPE or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"encode_png takes a non-empty uint8 [H, W] or [H, W, 3|4] array, got {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    rows = np.ascontiguousarray(a).reshape(h, w * channels)
    raw = np.empty((h, w * channels + 1), dtype=np.uint8)
    raw[:, 0] = 1  # filter type Sub
    raw[:, 1:channels + 1] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=raw[:, channels + 1:])  # uint8: wraps mod 256
    header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOUR_TYPE[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), compress_level)) + _png_chunk(b"IEND", b""))


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of the upright image at ``path``, read from its header (and EXIF)."""
    with Image.open(path) as im:
        return _header_size(im)
