"""Grid geometry (salf/contract/grid.py): centres, row-major order, disks against a pixel-level reference."""
import numpy as np
import pytest

from salf.contract.grid import disk_mask, disk_matrix, grid_centres, grid_points


def test_centres_paper_default():
    assert grid_centres(224, 7) == [0, 37, 74, 111, 148, 185, 222]


def test_centres_tiny_preset():
    assert grid_centres(112, 7) == [0, 18, 36, 54, 72, 90, 108]


def test_centres_clip_to_last_pixel():
    # d = floor(8 / 2) = 4 -> 0, 4, 8: the last centre would be outside an 8-pixel image
    assert grid_centres(8, 3) == [0, 4, 7]


def test_single_point_is_the_middle():
    assert grid_centres(9, 1) == [4]


@pytest.mark.parametrize("size,n", [(10, 0), (10, -2), (5, 7)])
def test_bad_grids_are_errors(size, n):
    with pytest.raises(ValueError):
        grid_centres(size, n)


def test_points_row_major():
    pts = grid_points((9, 12), (2, 3))
    assert pts == [(0, 0), (0, 6), (0, 11), (8, 0), (8, 6), (8, 11)]


def test_disk_mask_pixel_reference():
    got = disk_mask((6, 7), (2, 3), 1.5)
    ref = np.zeros((6, 7), bool)
    for y in range(6):
        for x in range(7):
            ref[y, x] = (y - 2) ** 2 + (x - 3) ** 2 <= 2.25
    np.testing.assert_array_equal(got, ref)
    assert got.sum() == 9  # the 3x3 block: corners are at distance sqrt(2) < 1.5


def test_disk_matrix_columns_are_clipped_disks():
    mat = disk_matrix((9, 9), (3, 3), 1)
    assert mat.shape == (81, 9) and mat.dtype == np.float32
    # corner centre (0, 0): itself and two neighbours; edge centre (0, 4): four; inner (4, 4): five
    assert mat.sum(axis=0).tolist() == [3, 4, 3, 4, 5, 4, 3, 4, 3]
    for g, centre in enumerate(grid_points((9, 9), (3, 3))):
        np.testing.assert_array_equal(mat[:, g].reshape(9, 9), disk_mask((9, 9), centre, 1))


def test_disk_matrix_rejects_negative_radius():
    with pytest.raises(ValueError, match="radius"):
        disk_matrix((9, 9), (3, 3), -1)


def test_cell_centre_placement():
    """"cells": the centre of each of G equal cells, where the bottleneck's bilinear resize (align_corners
    False) samples grid cell i: 16 + 32 i at 224 px, 8 + 16 i at 112 px."""
    import torch
    import torch.nn.functional as F

    from salf.contract.grid import grid_centres, grid_points

    assert grid_centres(224, 7, "cells") == [16 + 32 * i for i in range(7)]
    assert grid_centres(112, 7, "cells") == [8 + 16 * i for i in range(7)]
    assert grid_centres(224, 7) == [0, 37, 74, 111, 148, 185, 222]  # the default stays the paper's stride
    assert grid_points((112, 224), (7, 7), "cells")[8] == (24, 48)
    # resizing a 224-px ramp to 7 cells gives each cell the value at its cell centre (the continuous one,
    # 15.5 + 32 i in pixel-index coordinates: floor puts it on pixel 16 + 32 i - 1 / 2)
    ramp = torch.arange(224, dtype=torch.float32).view(1, 1, 1, 224).expand(1, 1, 224, 224)
    cells = F.interpolate(ramp, size=(7, 7), mode="bilinear", align_corners=False)[0, 0, 0]
    assert torch.allclose(cells, torch.tensor([15.5 + 32 * i for i in range(7)]))
    with pytest.raises(ValueError, match="placement"):
        grid_centres(224, 7, "middle")
