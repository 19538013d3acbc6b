"""Red-circle visual prompts (paper 3.2, Algorithm 1), made on the device from one decoded image.

Ring definition. The circle of grid cell ``(h, w)`` is the set of pixels that Pillow paints for
``ImageDraw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(255, 0, 0), width=2)`` on the image at
the CLIP input resolution, where ``(cy, cx)`` is the cell centre from ``salf/contract/grid.py``. That is a
ring of outer diameter ``2r + 1`` pixels, 2 pixels thick (the pixels at distance ``r`` and ``r - 1``
along the axes), clipped to the image; up to a few boundary pixels (IoU > 0.9, tested) it is the
annulus ``r - 1.5 < |p - c| <= r + 0.5``: pixel centres within half a pixel of the band [r - 1, r].
Pillow's rasteriser is what red-circle prompting code draws with, so the naive per-image loop
(``draw_circle_pil``) and the batched path agree pixel for pixel (tested on every cell).

Fast path. The ring pixels depend only on ``(H, W)``, the grid and ``r``: they are rasterised once
into a boolean stencil ``[G, H, W]`` (G = Gh*Gw) on one channel, cached, and moved to the device.
Prompts for a batch of decoded images are then one ``torch.where`` (no PIL copies per prompt), and the
red value is normalised with the same arithmetic as the image so drawing-then-normalising and
normalising-then-drawing give bit-identical inputs.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw

from salf.contract.grid import grid_points

RED = (255, 0, 0)
LINE_WIDTH = 2


def circle_bbox(centre: tuple[int, int], radius: int) -> tuple[int, int, int, int]:
    """Pillow bounding box ``(x0, y0, x1, y1)`` (inclusive) of the circle at ``centre = (y, x)``."""
    cy, cx = centre
    return (cx - radius, cy - radius, cx + radius, cy + radius)


def draw_circle_pil(image: Image.Image, centre: tuple[int, int], radius: int) -> Image.Image:
    """Reference drawing: a copy of ``image`` with the red ring at ``centre = (y, x)`` (Algorithm 1's Circle)."""
    out = image.copy()
    ImageDraw.Draw(out).ellipse(circle_bbox(centre, radius), outline=RED, width=LINE_WIDTH)
    return out


@lru_cache(maxsize=16)
def _stencil_np(image_size: tuple[int, int], grid: tuple[int, int], radius: int, placement: str = "stride"
                ) -> np.ndarray:
    h, w = image_size
    masks = []
    for centre in grid_points(image_size, grid, placement):
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).ellipse(circle_bbox(centre, radius), outline=255, width=LINE_WIDTH)
        masks.append(np.asarray(canvas) > 0)
    return np.stack(masks)


def ring_stencil(image_size: tuple[int, int], grid: tuple[int, int], radius: int,
                 device: torch.device | str = "cpu", placement: str = "stride") -> torch.Tensor:
    """Boolean ``[Gh*Gw, H, W]``: the ring pixels of every grid cell, in row-major grid order."""
    if radius < LINE_WIDTH:
        raise ValueError(f"circle radius must be at least the line width {LINE_WIDTH}, got {radius}")
    size = (int(image_size[0]), int(image_size[1]))
    return torch.from_numpy(_stencil_np(size, (int(grid[0]), int(grid[1])), int(radius), placement)).to(device)


def prompts_uint8(images: torch.Tensor, stencil: torch.Tensor) -> torch.Tensor:
    """uint8 images ``[B, 3, H, W]`` -> uint8 prompts ``[B, G, 3, H, W]`` with one red ring each."""
    red = torch.tensor(RED, dtype=images.dtype, device=images.device).view(1, 1, 3, 1, 1)
    return torch.where(stencil[None, :, None], red, images[:, None])


def normalization_constants(mean, std, device: torch.device | str = "cpu"):
    """``(mean, std, normalised red)`` as float32 ``[3, 1, 1]`` tensors on ``device`` (made once per run, so
    the per-batch path does no host-to-device copies)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    red = (torch.tensor(RED, dtype=torch.float32).view(3, 1, 1) / 255.0 - mean_t) / std_t
    return mean_t.to(device), std_t.to(device), red.to(device)


def prompts_normalized(images: torch.Tensor, stencil: torch.Tensor, mean=None, std=None,
                       constants: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 images ``[B, 3, H, W]`` -> normalised float32 prompts ``[B*G, 3, H, W]``.

    Equal, bit for bit, to normalising ``prompts_uint8`` with ``(x / 255 - mean) / std``; it normalises the
    B images once instead of the B*G prompts. Pass ``mean``/``std`` or ``normalization_constants(...)``.
    """
    mean_t, std_t, red = constants if constants is not None else normalization_constants(mean, std, images.device)
    norm = (images.to(torch.float32) / 255.0 - mean_t) / std_t
    out = torch.where(stencil[None, :, None], red[None, None], norm[:, None])
    b, g = out.shape[:2]
    return out.reshape(b * g, *out.shape[2:])
