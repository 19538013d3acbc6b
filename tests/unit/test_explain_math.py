"""salf/contract/explain.py against PyTorch (the reference for bilinear upsampling) and brute force.

Torch is imported here only: the tests may use it, serving/ may not.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from salf.contract import explain


def _torch_upsample(maps: np.ndarray, size) -> np.ndarray:
    t = torch.from_numpy(maps.astype(np.float64))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()


@pytest.mark.parametrize("out_size,in_size", [(64, 7), (100, 7), (7, 7), (13, 5), (1, 1), (5, 1), (3, 7), (224, 14)])
def test_bilinear_matrix_matches_torch(out_size, in_size):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(1, in_size))
    ours = explain.bilinear_matrix(out_size, in_size) @ v[0]
    ref = F.interpolate(torch.from_numpy(v)[None], size=out_size, mode="linear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(explain.bilinear_matrix(out_size, in_size).sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("size", [(64, 64), (97, 131), (7, 7), (300, 41)])
def test_upsample_matches_torch(size):
    maps = np.random.default_rng(1).normal(size=(5, 7, 7)).astype(np.float32)
    np.testing.assert_allclose(explain.upsample(maps, size), _torch_upsample(maps, size), atol=1e-5)


@pytest.mark.parametrize("size,grid", [((64, 64), (7, 7)), ((97, 131), (7, 7)), ((480, 640), (7, 7)), ((50, 40), (4, 9))])
def test_explain_anything_equals_naive_upsample_multiply_sum(size, grid):
    rng = np.random.default_rng(2)
    maps = rng.normal(size=(20, *grid)).astype(np.float32)
    mask = rng.random(size) < 0.3
    mask[: size[0] // 3, : size[1] // 2] = True
    naive = (_torch_upsample(maps, size) * mask[None]).sum(axis=(1, 2))
    fast = explain.region_activations(maps, explain.project_region(mask, grid))
    assert fast.shape == (20,)
    np.testing.assert_allclose(fast, naive, rtol=1e-4, atol=1e-4 * np.abs(naive).max())


def test_projection_weights_have_grid_shape_and_preserve_mass():
    # A full mask's weights sum to the pixel count: every pixel distributes weight 1 over the grid.
    w = explain.project_region(np.ones((123, 77), dtype=bool), (7, 7))
    assert w.shape == (7, 7)
    assert w.sum() == pytest.approx(123 * 77)


def _coverage_by_supersampling(mask: np.ndarray, grid, factor: int) -> np.ndarray:
    """Reference: upscale the mask by an integer factor so every cell holds whole sub-pixels."""
    big = np.kron(mask.astype(np.float64), np.ones((factor, factor)))
    gh, gw = grid
    ch, cw = big.shape[0] // gh, big.shape[1] // gw
    assert ch * gh == big.shape[0] and cw * gw == big.shape[1]
    return big.reshape(gh, ch, gw, cw).mean(axis=(1, 3))


@pytest.mark.parametrize("size,grid,factor", [((10, 10), (3, 3), 3), ((64, 64), (7, 7), 7), ((20, 35), (4, 7), 1)])
def test_grid_coverage_is_fraction_of_each_cell(size, grid, factor):
    rng = np.random.default_rng(3)
    mask = rng.random(size) < 0.4
    np.testing.assert_allclose(explain.grid_coverage(mask, grid), _coverage_by_supersampling(mask, grid, factor),
                               atol=1e-12)
    np.testing.assert_allclose(explain.grid_coverage(np.ones(size, bool), grid), 1.0, atol=1e-12)
    np.testing.assert_allclose(explain.grid_coverage(np.zeros(size, bool), grid), 0.0)


def test_apply_edits_adds_beta_times_region_and_leaves_input_alone():
    maps = np.zeros((3, 2, 2), np.float32)
    region = np.array([[1.0, 0.5], [0.0, 0.25]])
    edited = explain.apply_edits(maps, [(1, 2.0, region), (1, -1.0, region), (2, 4.0, region)])
    np.testing.assert_array_equal(maps, 0)
    np.testing.assert_allclose(edited[0], 0)
    np.testing.assert_allclose(edited[1], region)
    np.testing.assert_allclose(edited[2], 4 * region)



def test_apply_edits_rounds_each_edited_map_once_and_writes_into_out():
    """Same values as summing every edit in float64 over the whole stack and rounding once (the
    definition), whether the result is a new array or written into the caller's ``out``."""
    rng = np.random.default_rng(3)
    maps = rng.standard_normal((6, 3, 4)).astype(np.float32)
    edits = [(m, float(b), rng.random((3, 4))) for m, b in ((1, 0.3), (4, -2.5), (1, 1e-3), (1, 7.0))]
    reference = maps.astype(np.float64)
    for m, beta, region in edits:
        reference[m] += beta * region
    reference = reference.astype(np.float32)
    np.testing.assert_array_equal(explain.apply_edits(maps, edits), reference)
    out = np.full((2, 6, 3, 4), np.nan, np.float32)
    returned = explain.apply_edits(maps, edits, out=out[1])
    assert np.shares_memory(returned, out)
    np.testing.assert_array_equal(out[1], reference)
    assert np.isnan(out[0]).all()

def _numpy_head(maps, weight, bias, mean, std):
    scores = (maps.reshape(maps.shape[0], -1).mean(axis=1) - mean) / std
    return weight @ scores + bias


def test_positive_edit_raises_logit_by_predicted_amount_under_avg_pooling():
    rng = np.random.default_rng(4)
    m, l, grid = 6, 3, (7, 7)
    maps = rng.normal(size=(m, *grid))
    weight, bias = rng.normal(size=(l, m)), rng.normal(size=l)
    mean, std = rng.normal(size=m), rng.random(m) + 0.5
    mask = np.zeros((64, 64), bool)
    mask[10:40, 5:30] = True
    region = explain.grid_coverage(mask, grid)
    beta, concept = 3.0, 2
    delta = _numpy_head(explain.apply_edits(maps, [(concept, beta, region)]), weight, bias, mean, std) \
        - _numpy_head(maps.astype(np.float32), weight, bias, mean, std)
    expected = weight[:, concept] * beta * region.mean() / std[concept]
    np.testing.assert_allclose(delta, expected, atol=1e-5)
    # The grid region's mean is the mask's pixel fraction: cells tile the image evenly.
    assert region.mean() == pytest.approx(mask.mean())


def test_contributions_and_top_contributors():
    weight = np.array([[0.0, 2.0, -3.0, 0.5], [1.0, 0.0, 0.0, 0.0]])
    scores = np.array([5.0, 1.0, 1.0, -10.0])
    np.testing.assert_allclose(explain.contributions(weight, scores, 0), [0.0, 2.0, -3.0, -5.0])
    # Zero-weight concepts never explain a class; order is by |S|.
    assert explain.top_contributors(weight, scores, 0, 10) == [3, 2, 1]
    assert explain.top_contributors(weight, scores, 0, 2) == [3, 2]
    assert explain.top_contributors(weight, scores, 1, 3) == [0]


def test_class_rules_sorted_by_magnitude_non_zero_only():
    weight = np.array([[0.0, -2.0, 1.0], [0.0, 0.0, 0.0]])
    assert explain.class_rules(weight) == [[(1, -2.0), (2, 1.0)], []]


def test_softmax_stable_and_top_k_desc():
    p = explain.softmax(np.array([1000.0, 1000.0, -1000.0]))
    np.testing.assert_allclose(p, [0.5, 0.5, 0.0], atol=1e-12)
    assert explain.top_k_desc(np.array([0.1, 0.7, 0.7, 0.2]), 3) == [1, 2, 3]


def test_bad_sizes_rejected():
    with pytest.raises(ValueError, match="positive"):
        explain.bilinear_matrix(0, 7)
    with pytest.raises(ValueError, match="positive"):
        explain.cell_coverage_matrix(10, 0)


def test_upsample_needs_no_more_memory_than_its_result():
    """Heatmaps are as large as the image: the upsampling must not hold float64 copies of them (numpy
    reports its allocations to tracemalloc)."""
    import tracemalloc

    maps = np.random.default_rng(2).normal(size=(5, 7, 7)).astype(np.float32)
    size = (1000, 1200)
    tracemalloc.start()
    try:
        up = explain.upsample(maps, size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert up.dtype == np.float32 and up.shape == (5, *size)
    assert peak < 1.2 * up.nbytes, f"peak {peak / 2**20:.0f} MiB for a {up.nbytes / 2**20:.0f} MiB result"
    np.testing.assert_allclose(up[:, ::97, ::89], _torch_upsample(maps, size)[:, ::97, ::89], atol=1e-5)


def test_region_projections_do_not_copy_the_mask_to_float64():
    """Explain Anything and Intervene on a large image: the grid weights equal the one-shot products,
    and the temporaries stay far below a float64 copy of the mask (8 bytes per pixel)."""
    import tracemalloc

    rng = np.random.default_rng(4)
    mask = np.zeros((2000, 3000), bool)
    mask[300:1700, 250:2900] = True
    mask &= rng.random(mask.shape) < 0.7
    tracemalloc.start()
    try:
        w = explain.project_region(mask, (7, 7))
        cov = explain.grid_coverage(mask, (7, 7))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < mask.size * 8 / 2, f"peak {peak / 2**20:.0f} MiB for a {mask.size / 1e6:.0f} Mpx mask"
    m64 = mask.astype(np.float64)
    np.testing.assert_allclose(w, explain.bilinear_matrix(2000, 7).T @ m64 @ explain.bilinear_matrix(3000, 7), rtol=1e-12)
    np.testing.assert_allclose(cov, explain.cell_coverage_matrix(2000, 7) @ m64 @ explain.cell_coverage_matrix(3000, 7).T,
                               rtol=1e-12)


@pytest.mark.parametrize("rows,cols", [((0, 1), (0, 1)), ((0, 97), (0, 131)), ((10, 60), (3, 4)), ((96, 97), (5, 131)),
                                       ((33, 70), (40, 100))])
def test_rectangles_project_separably_to_the_same_weights(rows, cols):
    """A box (any mask filling its bounding box) takes the separable path; a mask one pixel short of
    its box, and a float mask, take the general one; all equal the plain product."""
    size, grid = (97, 131), (7, 7)
    ry, rx = explain.bilinear_matrix(size[0], grid[0]), explain.bilinear_matrix(size[1], grid[1])
    ay, ax = explain.cell_coverage_matrix(size[0], grid[0]), explain.cell_coverage_matrix(size[1], grid[1])
    box = np.zeros(size, bool)
    box[rows[0]:rows[1], cols[0]:cols[1]] = True
    assert explain._rectangle(box) == (slice(*rows), slice(*cols))
    holed = box.copy()
    holed[(rows[0] + rows[1]) // 2, (cols[0] + cols[1]) // 2] = False  # the middle: never a smaller rectangle
    for mask in (box, holed, box.astype(np.float32)):
        if mask is holed and not mask.any():
            continue
        m64 = mask.astype(np.float64)
        np.testing.assert_allclose(explain.project_region(mask, grid), ry.T @ m64 @ rx, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(explain.grid_coverage(mask, grid), ay @ m64 @ ax.T, rtol=1e-12, atol=1e-12)
    if holed.any():
        assert explain._rectangle(holed) is None


def test_top_k_desc_partitioned_path_equals_a_full_sort():
    """The partition shortcut (k << N) gives exactly a full sort's answer: ties by lower index, NaN and
    infinities included."""
    from salf.contract.explain import top_k_desc

    rng = np.random.default_rng(0)
    for trial in range(2000):
        n = int(rng.integers(1, 400))
        v = (rng.integers(-3, 4, n) if trial % 2 else rng.normal(size=n)).astype(np.float32)
        for every, value in ((7, np.nan), (11, np.inf), (13, -np.inf)):
            if trial % every == 0:
                v[rng.integers(0, n)] = value
        k = int(rng.integers(0, n + 2))
        full = np.lexsort((np.arange(n), -v.astype(np.float64)))[:k]
        assert top_k_desc(v, k) == [int(i) for i in full], (v, k)
