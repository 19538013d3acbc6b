"""Pixel-level tests of the red-circle prompts (training/clip/prompts.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.clip.prompts import draw_circle_pil, prompts_normalized, prompts_uint8, ring_stencil
from salf.contract.grid import grid_points

pytestmark = pytest.mark.timeout(60)


def _random_image(size, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


@pytest.mark.parametrize("size,grid,radius", [((112, 112), (7, 7), 16), ((224, 224), (7, 7), 32),
                                              ((64, 96), (5, 3), 8)])
def test_batched_prompts_equal_pil_copies_pixel_for_pixel(size, grid, radius):
    """The device path equals Algorithm 1's per-prompt Pillow drawing on an RGB copy, for every cell."""
    images = [_random_image(size, seed) for seed in range(2)]
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    got = prompts_uint8(batch, ring_stencil(size, grid, radius)).permute(0, 1, 3, 4, 2).numpy()
    assert got.shape == (2, grid[0] * grid[1], *size, 3)
    for b, img in enumerate(images):
        pil = Image.fromarray(img)
        for g, centre in enumerate(grid_points(size, grid)):
            np.testing.assert_array_equal(got[b, g], np.asarray(draw_circle_pil(pil, centre, radius)),
                                          err_msg=f"image {b} cell {g} centre {centre}")


def test_ring_geometry_against_its_definition():
    """Independent of Pillow: centres from grid.py, 2-px ring at distance r and r-1 on the axes,
    every ring pixel within [r - 2, r + 0.5] of the centre, red (255, 0, 0), clipped at the borders."""
    size, grid, r = (112, 112), (7, 7), 16
    stencil = ring_stencil(size, grid, r).numpy()
    centres = grid_points(size, grid)
    assert centres[0] == (0, 0) and centres[8] == (18, 18) and centres[-1] == (108, 108)  # d = 112 // 6
    yy, xx = np.mgrid[:size[0], :size[1]]
    for g, (cy, cx) in enumerate(centres):
        ring = stencil[g]
        dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        assert ring.any()
        assert dist[ring].min() >= r - 2 and dist[ring].max() <= r + 0.5, (g, dist[ring].min(), dist[ring].max())
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            for k, inside in ((r, True), (r - 1, True), (r - 2, False), (r + 1, False)):
                y, x = cy + dy * k, cx + dx * k
                if 0 <= y < size[0] and 0 <= x < size[1]:
                    assert ring[y, x] == inside, (g, dy, dx, k)
    # The corner circle is clipped to a quarter ring; the interior one is the full ring.
    assert 0.2 < stencil[0].sum() / stencil[24].sum() < 0.3
    img = torch.zeros(1, 3, *size, dtype=torch.uint8)
    out = prompts_uint8(img, torch.from_numpy(stencil))[0, 24]
    assert out[:, stencil[24]].T.unique(dim=0).tolist() == [[255, 0, 0]]
    assert int(out[:, ~stencil[24]].max()) == 0


def test_ring_is_close_to_the_ideal_annulus():
    """Loose comparison with the annulus r - 1.5 < dist <= r + 0.5 (pixel centres within half a pixel of
    the 2-px band [r - 1, r]); Pillow's rasteriser differs from it on a few boundary pixels only."""
    size, r = (224, 224), 32
    stencil = ring_stencil(size, (7, 7), r).numpy()
    yy, xx = np.mgrid[:size[0], :size[1]]
    for g, (cy, cx) in enumerate(grid_points(size, (7, 7))):
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        ideal = (d2 > (r - 1.5) ** 2) & (d2 <= (r + 0.5) ** 2)
        iou = (ideal & stencil[g]).sum() / (ideal | stencil[g]).sum()
        assert iou > 0.9, (g, iou)


def test_normalised_prompts_equal_normalising_drawn_prompts_bitwise():
    size, grid, r = (112, 112), (7, 7), 16
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    images = torch.from_numpy(np.stack([_random_image(size, s) for s in range(3)])).permute(0, 3, 1, 2)
    stencil = ring_stencil(size, grid, r)
    fast = prompts_normalized(images, stencil, mean, std)
    drawn = prompts_uint8(images, stencil).reshape(-1, 3, *size).to(torch.float32)
    ref = (drawn / 255.0 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert fast.shape == (3 * 49, 3, *size) and fast.dtype == torch.float32
    assert torch.equal(fast, ref)


def test_radius_smaller_than_line_width_is_rejected():
    with pytest.raises(ValueError, match="radius"):
        ring_stencil((112, 112), (7, 7), 1)
