"""MaskSimilarity (training/similarity.py): P[n,m,h,w] = fraction of the grid disk covered by mask m."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.folder import DatasetError
from training.data.synth import save_masks_npz
from salf.contract.grid import disk_mask, grid_points
from training.similarity import MaskSimilarity, SimilaritySource


def _write_tiny_dataset(root, masks_per_image, size=(9, 9), with_masks=True):
    """One class 'a', images 0.png, 1.png, ... of ``size`` with the given bool masks [M, H, W]."""
    (root / "train" / "a").mkdir(parents=True)
    m = masks_per_image[0].shape[0]
    for i, masks in enumerate(masks_per_image):
        Image.new("RGB", (size[1], size[0]), (i * 40, 0, 0)).save(root / "train" / "a" / f"{i}.png")
        if with_masks:
            (root / "masks" / "train" / "a").mkdir(parents=True, exist_ok=True)
            save_masks_npz(root / "masks" / "train" / "a" / f"{i}.npz", masks)
    (root / "classes.txt").write_text("a\n")
    (root / "concepts.txt").write_text("".join(f"c{k}\n" for k in range(m)))
    (root / "dataset.json").write_text(json.dumps({
        "name": "tiny", "seed": 0, "image_size": list(size), "classes": ["a"],
        "concepts": [f"c{k}" for k in range(m)], "splits": {"train": len(masks_per_image)},
        "has_masks": with_masks}))
    return root


def test_hand_computed_case(tmp_path):
    # 9x9 image, 3x3 grid -> centres 0, 4, 8 on each axis; radius 1 -> a plus-shaped disk of 5
    # pixels, clipped to 4 on an edge and 3 in a corner.
    masks = np.zeros((2, 9, 9), bool)
    masks[0, :5, :5] = True  # concept 0: the top-left 5x5 block (rows 0-4, cols 0-4)
    masks[1, 8, 8] = True  # concept 1: the bottom-right pixel only
    root = _write_tiny_dataset(tmp_path / "d", [masks, np.zeros_like(masks)])
    src = MaskSimilarity(root, "train", grid=(3, 3), radius=1)
    p = src.similarities([0, 1])
    assert p.shape == (2, 2, 3, 3) and p.dtype == torch.float32
    expected0 = np.array([
        # (0,0): {(0,0),(0,1),(1,0)} all inside the block -> 3/3
        # (0,4): {(0,4),(1,4),(0,3),(0,5)}: (0,5) is outside -> 3/4
        # (0,8): {(0,8),(1,8),(0,7)}: none -> 0
        [1.0, 3 / 4, 0.0],
        # (4,0): {(4,0),(3,0),(5,0),(4,1)}: (5,0) outside -> 3/4
        # (4,4): {(4,4),(3,4),(5,4),(4,3),(4,5)}: (4,4),(3,4),(4,3) inside -> 3/5
        [3 / 4, 3 / 5, 0.0],
        [0.0, 0.0, 0.0],
    ])
    expected1 = np.zeros((3, 3))
    expected1[2, 2] = 1 / 3  # the corner disk (8,8),(7,8),(8,7) holds the one pixel
    np.testing.assert_allclose(p[0, 0].numpy(), expected0, atol=1e-6)
    np.testing.assert_allclose(p[0, 1].numpy(), expected1, atol=1e-6)
    assert torch.count_nonzero(p[1]) == 0


def test_matches_pixel_loop_on_synth(synth_data):
    src = MaskSimilarity(synth_data, "val", grid=(7, 7), radius=16, input_size=(112, 112))
    indices = [0, 5, 31]
    p = src.similarities(indices).numpy()
    points = grid_points((112, 112), (7, 7))
    for b, i in enumerate(indices):
        masks = src.dataset.load_masks(i)
        for g, centre in enumerate(points):
            disk = disk_mask((112, 112), centre, 16)
            ref = (masks & disk).sum(axis=(1, 2)) / disk.sum()
            np.testing.assert_allclose(p[b, :, g // 7, g % 7], ref, atol=1e-6)


def test_protocol_order_and_cache(synth_data):
    src = MaskSimilarity(synth_data, "val", grid=(7, 7), radius=16, input_size=(112, 112))
    assert isinstance(src, SimilaritySource)
    assert src.concepts == (synth_data / "concepts.txt").read_text().split("\n")[:-1]
    assert src.grid == (7, 7)
    a = src.similarities([3, 1, 3])
    torch.testing.assert_close(a[0], a[2])
    torch.testing.assert_close(src.similarities([1])[0], a[1])
    a.zero_()  # callers get a copy: the cache stays intact
    assert src.similarities([3]).sum() > 0
    # every image has exactly one background concept and shapes cover part of it: fractions sum per cell
    # over the mutually exclusive layers (shapes, string, grass, backgrounds) to 1
    p = src.similarities(range(len(src)))
    layers = [k for k, c in enumerate(src.concepts)
              if c not in ("red", "green", "blue", "yellow", "purple", "stripes", "polka dots", "checkerboard")]
    torch.testing.assert_close(p[:, layers].sum(1), torch.ones(len(src), 7, 7))


def test_resized_input(synth_data):
    full = MaskSimilarity(synth_data, "test", grid=(7, 7), radius=16, input_size=(112, 112)).similarities([0])
    half = MaskSimilarity(synth_data, "test", grid=(7, 7), radius=8, input_size=(56, 56)).similarities([0])
    assert half.shape == full.shape
    # the same geometry at half resolution: fractions agree up to the discretisation of the disks
    assert (half - full).abs().mean() < 0.05


def test_errors(tmp_path, synth_data):
    masks = np.zeros((1, 9, 9), bool)
    no_masks = _write_tiny_dataset(tmp_path / "nm", [masks], with_masks=False)
    with pytest.raises(DatasetError, match="no concept masks"):
        MaskSimilarity(no_masks, "train", grid=(3, 3), radius=1)
    src = MaskSimilarity(synth_data, "val", grid=(7, 7), radius=16, input_size=(112, 112))
    with pytest.raises(IndexError):
        src.similarities([len(src)])
    with pytest.raises(IndexError):
        src.similarities([-1])


def test_concept_subset(synth_data):
    full = MaskSimilarity(synth_data, "val", grid=(7, 7), radius=16, input_size=(112, 112))
    sub = MaskSimilarity(synth_data, "val", grid=(7, 7), radius=16, input_size=(112, 112),
                         concepts=["grass", "circle"])
    assert sub.concepts == ["grass", "circle"]
    rows = [full.concepts.index("grass"), full.concepts.index("circle")]
    torch.testing.assert_close(sub.similarities([0, 9]), full.similarities([0, 9])[:, rows])
    with pytest.raises(DatasetError, match="'dragon'"):
        MaskSimilarity(synth_data, "val", grid=(7, 7), radius=16, concepts=["circle", "dragon"])


def test_class_concept_mode(synth_data):
    """Paper 4.2's class concepts on masks: concept k is the key object in images of class k, nothing
    elsewhere; the prompts follow the template."""
    from training.data.world import CLASS_NAMES, KEY_SHAPES
    from training.similarity import class_prompts

    src = MaskSimilarity.for_classes("An image of a {class}", KEY_SHAPES, synth_data, "train", (7, 7), 16, (112, 112))
    assert src.concepts == class_prompts("An image of a {class}", CLASS_NAMES)
    assert src.concepts[0] == "An image of a striped circle"
    plain = MaskSimilarity(synth_data, "train", (7, 7), 16, (112, 112), concepts=list(KEY_SHAPES))
    labels = src.dataset.labels
    idx = list(range(0, len(labels), 5))
    p, shapes = src.similarities(idx), plain.similarities(idx)
    for row, i in enumerate(idx):
        others = [k for k in range(len(CLASS_NAMES)) if k != labels[i]]
        assert float(p[row, others].abs().sum()) == 0.0
        # the class's map is the union of the shape masks: at least the largest single shape's fraction
        assert torch.all(p[row, labels[i]] >= shapes[row].max(dim=0).values - 1e-6)
        assert float(p[row, labels[i]].max()) > 0.2
    with pytest.raises(ValueError, match="placeholder"):
        class_prompts("An image of a thing", CLASS_NAMES)
