"""Prompting-grid geometry shared by every similarity source (paper 3.2, Algorithm 1).

Algorithm 1's loop bounds are ambiguous; two placements (``PLACEMENTS``), chosen per model
(``grid_placement`` in the training config, recorded in the bundle's ``similarity``):

- ``"stride"``: ``G`` centres per axis at ``i * d`` for ``i = 0..G-1`` with the integer stride
  ``d = floor(S / (G - 1))`` of the paper, clipped to the last pixel ``S - 1``. For ``S = 224, G = 7``:
  ``d = 37`` and centres ``0, 37, 74, 111, 148, 185, 222``.
- ``"cells"``: the centre of each of ``G`` equal cells, ``floor((i + 1/2) * S / G)``: ``16, 48, ..., 208``
  at 224. This is where the bottleneck's bilinear resize of the backbone's map (``align_corners=False``)
  puts grid cell ``i``, so the target of cell ``i`` describes the region its feature comes from.

Grid cell ``(h, w)`` is centred at ``(centres_y[h], centres_x[w])`` in pixel coordinates of the image
at the CLIP/backbone input resolution. Which one localises better is measured by ``make bench-quality``
(docs/results.md, "Grid placement").
"""
from __future__ import annotations

import numpy as np


PLACEMENTS = ("stride", "cells")


def grid_centres(size: int, n: int, placement: str = "stride") -> list[int]:
    """Centres along one axis of ``size`` pixels for an ``n``-point grid (module docstring)."""
    if n < 1:
        raise ValueError(f"grid needs at least one point per axis, got {n}")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown grid placement {placement!r}; choose one of {PLACEMENTS}")
    if placement == "cells":
        if n > size:
            raise ValueError(f"grid of {n} cells does not fit in {size} pixels")
        return [(2 * i + 1) * size // (2 * n) for i in range(n)]
    if n == 1:
        return [size // 2]
    d = size // (n - 1)
    if d < 1:
        raise ValueError(f"grid of {n} points does not fit in {size} pixels")
    return [min(i * d, size - 1) for i in range(n)]


def grid_points(image_size: tuple[int, int], grid: tuple[int, int], placement: str = "stride"
                ) -> list[tuple[int, int]]:
    """All ``(y, x)`` centres in row-major grid order (``h`` outer, ``w`` inner): ``Gh * Gw`` points."""
    ys = grid_centres(image_size[0], grid[0], placement)
    xs = grid_centres(image_size[1], grid[1], placement)
    return [(y, x) for y in ys for x in xs]


def disk_mask(image_size: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    """Boolean ``[H, W]``: pixels whose centre lies within ``radius`` of ``centre`` (inclusive)."""
    h, w = image_size
    yy, xx = np.ogrid[:h, :w]
    cy, cx = centre
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2


def disk_matrix(image_size: tuple[int, int], grid: tuple[int, int], radius: float, placement: str = "stride"
                ) -> np.ndarray:
    """Every grid cell's disk as a column: float32 ``[H * W, Gh * Gw]`` of 0/1, pixels row-major,
    cells in :func:`grid_points` order. Disks are clipped to the image (pixels outside do not exist).
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    h, w = image_size
    points = grid_points(image_size, grid, placement)
    cols = np.empty((h * w, len(points)), dtype=np.float32)
    for g, centre in enumerate(points):
        cols[:, g] = disk_mask(image_size, centre, radius).reshape(-1)
    return cols
