"""Regions of an image as pixel masks: boxes and clicked points (a mask file goes through
:func:`salf.contract.images.decode_mask`). The gateway and the clients draw regions with these
functions, so the outline a client draws is the region the gateway explains.

Pixel ``(row y, column x)`` has its centre at ``(y + 0.5, x + 0.5)``; coordinates are in pixels of the
upright image at its own size.
"""
from __future__ import annotations

import numpy as np

from . import ContractError

# A points region is a few clicks; each point costs its disk's area, so the count is bounded too.
MAX_POINTS = 1024


class RegionError(ContractError):
    """A region that cannot be drawn on the image: bad box, point outside, empty region."""


def box_mask(box: tuple[float, float, float, float], image_size: tuple[int, int]) -> np.ndarray:
    """Box ``(x0, y0, x1, y1)`` in pixels -> bool ``[h, w]``: pixels whose centre lies in
    ``[x0, x1) x [y0, y1)``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite(v) for v in (x0, y0, x1, y1)):
        raise RegionError(f"box ({x0}, {y0}, {x1}, {y1}) has a non-finite coordinate")
    if not (x1 > x0 and y1 > y0):
        raise RegionError(f"box ({x0}, {y0}, {x1}, {y1}) needs x1 > x0 and y1 > y0")
    h, w = image_size
    ys = np.arange(h) + 0.5
    xs = np.arange(w) + 0.5
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def points_mask(points: list[tuple[float, float]], radius: float, image_size: tuple[int, int],
                check=None) -> np.ndarray:
    """Points ``(x, y)`` -> bool ``[h, w]``: union of disks of ``radius`` pixels (pixel centres within
    the radius). Every point must lie inside the image; at most :data:`MAX_POINTS` points. ``check()``
    (if given) runs every 64 points (a caller's deadline or cancellation)."""
    if not points:
        raise RegionError("points region has no point")
    if not (np.isfinite(radius) and radius > 0):
        raise RegionError(f"points radius must be a positive number of pixels, got {radius}")
    if len(points) > MAX_POINTS:
        raise RegionError(f"points region has {len(points)} points; at most {MAX_POINTS} are accepted "
                          f"(send a mask_png for a region drawn with many points)")
    h, w = image_size
    mask = np.zeros((h, w), dtype=bool)
    for n, (x, y) in enumerate(points):
        if check is not None and n % 64 == 0:
            check()
        if not (np.isfinite(x) and np.isfinite(y) and 0 <= x <= w and 0 <= y <= h):
            raise RegionError(f"point ({x}, {y}) lies outside the {w}x{h} image")
        # Only the disk's bounding window (one pixel of slack for rounding): the cost of a point is
        # its area, not the image's, so many small clicks on a large image stay cheap.
        y0, y1 = max(0, int(np.floor(y - radius)) - 1), min(h, int(np.ceil(y + radius)) + 1)
        x0, x1 = max(0, int(np.floor(x - radius)) - 1), min(w, int(np.ceil(x + radius)) + 1)
        yy = np.arange(y0, y1)[:, None] + 0.5
        xx = np.arange(x0, x1)[None, :] + 0.5
        mask[y0:y1, x0:x1] |= (yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2
    return mask


def default_radius(image_size: tuple[int, int], input_size: tuple[int, int], grid: tuple[int, int],
                   radius: float) -> float:
    """The radius of a clicked point when the caller gives none: the model's prompt-circle ``radius``
    (pixels at ``input_size``) scaled to the image's own size; half a grid cell when the model records
    no radius (``radius <= 0``)."""
    h, w = image_size
    ih, iw = input_size
    if radius > 0:
        return float(radius * np.sqrt((h / ih) * (w / iw)))
    return 0.5 * min(h / grid[0], w / grid[1])


def require_nonempty(mask: np.ndarray, what: str = "region") -> np.ndarray:
    """``mask`` itself; :class:`RegionError` when it selects no pixel."""
    if not mask.any():
        raise RegionError(f"{what} is empty: it covers no pixel of the {mask.shape[1]}x{mask.shape[0]} image")
    return mask
