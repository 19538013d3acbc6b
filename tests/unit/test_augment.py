"""Aligned augmentation (training/augment.py): a view's masks move with its pixels, views are seeded,
and the CBL's validation split never trains on a view of a validation image."""
import numpy as np
import pytest
import torch

from training.augment import AffineRange, AugmentedViews, draw_theta, warp_view
from training.cbl import carve_validation
from training.data import world
from training.data.folder import ImageFolderSplit


def test_identity_and_pure_zoom():
    image = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    masks = np.zeros((1, 32, 48), bool)
    masks[0, 8:24, 12:36] = True
    same, m = warp_view(image, masks, np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    np.testing.assert_array_equal(same, image)
    np.testing.assert_array_equal(m, masks)
    # zoom out by 2 around the centre: the box keeps its centre and halves each side; outside is mid-grey
    _, m2 = warp_view(image, masks, np.array([[2.0, 0, 0], [0, 2.0, 0]]))
    ys, xs = np.nonzero(m2[0])
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (12, 19, 18, 29)
    out, _ = warp_view(image, masks, np.array([[2.0, 0, 0], [0, 2.0, 0]]))
    assert (out[0, 0] == 128).all()


def test_theta_ranges():
    r = AffineRange(zoom=(0.5, 2.0), aspect=(1.0, 1.0), shift=0.0, flip=False)
    theta = draw_theta(500, np.random.default_rng(1), r)
    zoom = 1 / theta[:, 0, 0]
    assert zoom.min() >= 0.5 - 1e-9 and zoom.max() <= 2.0 + 1e-9 and (zoom < 1).any() and (zoom > 1).any()
    np.testing.assert_allclose(theta[:, 0, 0], theta[:, 1, 1])
    assert (np.abs(theta[:, :, 2]) <= np.abs(1 - theta[:, [0, 1], [0, 1]]) + 1e-9).all()  # stays in frame


def test_views_keep_masks_on_their_pixels(synth_data):
    split = ImageFolderSplit(synth_data, "train", (112, 112))
    views = AugmentedViews(split, 3, seed=0)
    assert len(views) == 3 * len(split) and views.labels[:3] == [split.labels[0]] * 3
    np.testing.assert_array_equal(views.image(0), split.image(0))  # view 0 is the image itself
    again = AugmentedViews(split, 3, seed=0)
    np.testing.assert_array_equal(views.image(4), again.image(4))
    assert not np.array_equal(views.image(4), AugmentedViews(split, 3, seed=1).image(4))
    far = []
    for k in range(1, 60, 3):
        image, masks = views.image(k), views.load_masks(k)
        assert masks.shape == (len(world.CONCEPTS), 112, 112)
        for colour, rgb in world.COLOURS.items():
            sel = masks[world.CONCEPT_INDEX[colour]]
            if sel.sum() > 30:  # the colour's mask still lies on that colour's pixels (or its texture tint)
                pix = image[sel].astype(float).mean(0)
                dists = {c: np.linalg.norm(pix - (0.8 * np.array(v) + 0.2 * 255)) for c, v in world.COLOURS.items()}
                far.append(min(dists, key=dists.get) != colour)
    assert far and np.mean(far) < 0.1


def test_validation_split_groups_views():
    labels = torch.tensor([c for c in range(4) for _ in range(10) for _ in range(3)])
    split = carve_validation(len(labels), 0.2, 0, labels, views=3)
    val_images = {i // 3 for i in split.val_indices}
    assert all(i % 3 == 0 for i in split.val_indices)
    assert not val_images & {i // 3 for i in split.train_indices}
    assert len(split.train_indices) == 3 * (40 - len(val_images))
    with pytest.raises(ValueError, match="views"):
        carve_validation(10, 0.2, 0, None, views=3)


def test_warp_batch_moves_masks_with_pixels():
    """The backbone's on-the-fly zoom warps low-resolution masks with the image (presence labels)."""
    from training.augment import warp_batch

    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(8, 1, 16, 16)
    masks[:, 0, 4:10, 6:12] = 1.0
    x = masks.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3).expand(8, 3, 64, 64).clone()  # the mask, 4x
    wx, wm = warp_batch(x, g, AffineRange(zoom=(0.5, 2.0)), masks)
    assert wx.shape == x.shape and wm.shape == masks.shape
    up = wm.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)[:, 0] > 0.5
    agree = ((wx[:, 0] > 0.5) == up).float().mean()
    assert agree > 0.97  # the same affine: only boundary pixels differ between the two resolutions
    assert not torch.equal(wx, x)
