"""Explanation math, plain numpy (paper 3.5-3.6): the one definition the gateway and training use. No gRPC, no torch.

Shapes: ``M`` concepts, ``L`` classes, ``Gh x Gw`` the concept-map grid, ``H x W`` the image's own
size (heatmaps, regions).

Bilinear upsampling of a grid map to ``H x W`` (``F.interpolate(mode="bilinear",
align_corners=False)``) is separable and linear: ``up = Ry @ map @ Rx.T`` with ``Ry [H, Gh]`` and
``Rx [W, Gw]``. Explain Anything therefore never upsamples the M maps: the mask is projected once onto
grid weights ``w = Ry.T @ I @ Rx`` ``[Gh, Gw]`` and ``a = maps[M, G] @ w[G]`` (cost independent of the
image size beyond that single projection).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def _bilinear_matrix_cached(out_size: int, in_size: int) -> np.ndarray:
    # Same source coordinate as PyTorch's upsample_bilinear2d with align_corners=False:
    # src = (i + 0.5) * in / out - 0.5, clamped at 0; the right neighbour is clamped to in - 1.
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    r = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(r, (rows, i0), 1.0 - frac)
    np.add.at(r, (rows, i1), frac)
    r.setflags(write=False)
    return r


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """``[out_size, in_size]`` float64 matrix R with ``R @ v`` = 1-D bilinear upsampling of ``v``
    (``align_corners=False``). Rows sum to 1. Read-only (cached)."""
    if out_size < 1 or in_size < 1:
        raise ValueError(f"sizes must be positive, got out={out_size}, in={in_size}")
    return _bilinear_matrix_cached(int(out_size), int(in_size))


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Concept maps ``[..., Gh, Gw]`` -> bilinear heatmaps ``[..., H, W]`` float32 at ``size = (H, W)``."""
    gh, gw = maps.shape[-2:]
    ry = bilinear_matrix(size[0], gh).astype(np.float32)
    rx = bilinear_matrix(size[1], gw).astype(np.float32)
    # float32 throughout and the small product first: the only image-size array is the result itself
    # (a float64 pass needed three times its memory: ~3 GB for five heatmaps of a 64 MP image).
    return (ry @ maps.astype(np.float32)) @ rx.T


# Rows of the mask converted to float64 at a time: a 64 MP mask as one float64 array is 512 MB per request.
_ROW_BLOCK = 256


def _rectangle(mask: np.ndarray) -> tuple[slice, slice] | None:
    """``(rows, cols)`` when the bool ``mask`` is exactly one filled axis-aligned rectangle (a box region,
    or any mask that fills its bounding box), else None. Three passes over the mask's bytes."""
    if mask.dtype != np.bool_:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if (r1 - r0) * (c1 - c0) != int(np.count_nonzero(mask)):
        return None
    return slice(r0, r1), slice(c0, c1)


def _sandwich(left: np.ndarray, mask: np.ndarray, right: np.ndarray, check=None) -> np.ndarray:
    """``left [G1, H] @ mask [H, W] @ right [W, G2]`` float64, converting ``_ROW_BLOCK`` mask rows at a
    time so the temporary memory stays ``_ROW_BLOCK * W`` however large the image. ``check()`` (if given)
    runs before each block: a caller's deadline or cancellation stops a large projection.

    A rectangular mask is separable: ``outer(left[:, rows].sum(1), right[cols].sum(0))``, the same value
    up to float64 summation order, without touching the mask again (a box on a 500x375 image: 0.3 ms
    of an Intervene's projection before, measured; boxes are what the UI and ``--box`` send)."""
    rect = _rectangle(mask)
    if rect is not None:
        return np.outer(left[:, rect[0]].sum(axis=1), right[rect[1]].sum(axis=0))
    out = np.zeros((left.shape[0], right.shape[1]), dtype=np.float64)
    for r0 in range(0, mask.shape[0], _ROW_BLOCK):
        if check is not None:
            check()
        block = mask[r0:r0 + _ROW_BLOCK].astype(np.float64)
        out += left[:, r0:r0 + _ROW_BLOCK] @ (block @ right)
    return out


def project_region(mask: np.ndarray, grid: tuple[int, int], check=None) -> np.ndarray:
    """Image-size mask ``[H, W]`` (bool or float) -> grid weights ``w = Ry.T @ I @ Rx`` ``[Gh, Gw]``
    float64, so that ``sum(I * upsample(map)) == sum(w * map)`` for every grid map."""
    h, w = mask.shape
    ry = bilinear_matrix(h, grid[0])
    rx = bilinear_matrix(w, grid[1])
    return _sandwich(ry.T, mask, rx, check)


def region_activations(maps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Explain Anything: ``a[m] = sum(w * maps[m])`` for maps ``[M, Gh, Gw]`` and grid weights
    ``[Gh, Gw]`` from :func:`project_region`; returns ``[M]`` float64."""
    m = maps.shape[0]
    return maps.reshape(m, -1).astype(np.float64) @ weights.reshape(-1)


def cell_coverage_matrix(size: int, cells: int) -> np.ndarray:
    """``[cells, size]`` float64: entry ``[g, p]`` is the fraction of cell ``g`` covered by pixel ``p``
    when ``cells`` equal cells tile ``size`` pixels (cell boundaries may fall inside pixels)."""
    if size < 1 or cells < 1:
        raise ValueError(f"sizes must be positive, got size={size}, cells={cells}")
    edges = np.arange(cells + 1, dtype=np.float64) * size / cells
    lo = np.arange(size, dtype=np.float64)
    overlap = np.clip(np.minimum(edges[1:, None], lo[None, :] + 1) - np.maximum(edges[:-1, None], lo[None, :]),
                      0.0, None)
    return overlap / (size / cells)


def grid_coverage(mask: np.ndarray, grid: tuple[int, int], check=None) -> np.ndarray:
    """Intervention region on the grid: fraction ``[Gh, Gw]`` in [0, 1] of each grid cell covered by
    the image-size mask ``[H, W]`` (the grid's cells tile the image evenly)."""
    h, w = mask.shape
    ay = cell_coverage_matrix(h, grid[0])
    ax = cell_coverage_matrix(w, grid[1])
    return _sandwich(ay, mask, ax.T, check)


def apply_edits(maps: np.ndarray, edits: list[tuple[int, float, np.ndarray]], out: np.ndarray | None = None
                ) -> np.ndarray:
    """Local intervention (paper 3.6): for each ``(concept m, beta, I_grid [Gh, Gw])``,
    ``c[m] += beta * I_grid``. ``maps`` ``[M, Gh, Gw]`` is not modified; returns float32 edited maps
    (written into ``out`` when given, a float32 array of the maps' shape). Each edited concept's map
    is summed in float64 and rounded once, however many edits it has; the others are copied as they are."""
    if out is None:
        edited = maps.astype(np.float32, copy=True)
    else:
        np.copyto(out, maps)
        edited = out
    rows: dict[int, np.ndarray] = {}
    for m, beta, region in edits:
        if m not in rows:
            rows[m] = maps[m].astype(np.float64, copy=True)
        rows[m] += beta * region
    for m, row in rows.items():
        edited[m] = row
    return edited


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float64, stable for large logits."""
    z = logits.astype(np.float64) - np.max(logits, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def contributions(weights: np.ndarray, scores: np.ndarray, target: int) -> np.ndarray:
    """Contribution scores ``S[m] = W[target, m] * c*_m`` (paper eq. 4) for head weights ``[L, M]`` and
    standardised concept scores ``[M]``; returns ``[M]`` float64."""
    return weights[target].astype(np.float64) * scores.astype(np.float64)


def top_contributors(weights: np.ndarray, scores: np.ndarray, target: int, k: int) -> list[int]:
    """Indices of at most ``k`` concepts with non-zero ``W[target, m]``, by ``|S|`` largest first
    (ties: lower index first)."""
    s = contributions(weights, scores, target)
    candidates = np.flatnonzero(weights[target] != 0)
    order = candidates[np.lexsort((candidates, -np.abs(s[candidates])))]
    return [int(i) for i in order[:k]]


def top_k_desc(values: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` largest entries of ``values`` ``[N]``, largest first (ties: lower index).

    For ``k`` much smaller than ``N`` (5 of 4741 concepts) only the entries at or above the k-th largest
    value are sorted (a partition first): the same answer as sorting everything, ties included."""
    neg = -values.astype(np.float64)
    n = neg.shape[0]
    if 0 < k < n // 4:
        kth = np.partition(neg, k - 1)[k - 1]
        if np.isfinite(kth):  # NaN/inf among the top: sort everything, as below
            cand = np.flatnonzero(neg <= kth)
            order = cand[np.lexsort((cand, neg[cand]))]
            return [int(i) for i in order[:k]]
    order = np.lexsort((np.arange(n), neg))
    return [int(i) for i in order[:k]]


def class_rules(weights: np.ndarray) -> list[list[tuple[int, float]]]:
    """Global decision rules (paper 3.5): for each class, its ``(concept, weight)`` pairs with non-zero
    weight, by ``|weight|`` largest first. ``weights`` ``[L, M]``."""
    rules = []
    for row in weights:
        nz = np.flatnonzero(row != 0)
        order = nz[np.lexsort((nz, -np.abs(row[nz])))]
        rules.append([(int(m), float(row[m])) for m in order])
    return rules
