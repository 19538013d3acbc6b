"""training/quality/readers.py on small files written in the real layouts."""
import numpy as np
import pytest
from PIL import Image

from training.data.folder import DatasetError
from training.quality.readers import CubSplit, ImageNetSegmentation


def write_gtsegs(path, images, masks):
    """A file in gtsegs_ijcv.mat's layout (MATLAB v7.3): /value/img and /value/gt hold [N, 1] object
    references; an image is stored [3, W, H], a mask behind a [1, 1] cell of references as [W, H]."""
    import h5py

    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_refs = np.empty((len(images), 1), dtype=h5py.ref_dtype)
        gt_refs = np.empty((len(images), 1), dtype=h5py.ref_dtype)
        for i, (im, m) in enumerate(zip(images, masks)):
            img_refs[i, 0] = refs.create_dataset(f"img{i}", data=im.transpose(2, 1, 0)).ref
            mask_ref = refs.create_dataset(f"mask{i}", data=m.astype(np.uint8).transpose(1, 0)).ref
            cell = refs.create_dataset(f"cell{i}", data=np.array([[mask_ref]], dtype=h5py.ref_dtype))
            gt_refs[i, 0] = cell.ref
        value = f.create_group("value")
        value.create_dataset("img", data=img_refs)
        value.create_dataset("gt", data=gt_refs)


def test_imagenet_segmentation_reads_the_mat_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), rng.integers(0, 256, (25, 20, 3), dtype=np.uint8)]
    masks = [rng.random((30, 40)) < 0.3, rng.random((25, 20)) < 0.5]
    path = tmp_path / "gtsegs_ijcv.mat"
    write_gtsegs(path, images, masks)
    ds = ImageNetSegmentation(path)
    assert len(ds) == 2
    for k in range(2):
        image, mask = ds[k]
        assert image.dtype == np.uint8 and mask.dtype == bool
        np.testing.assert_array_equal(image, images[k])  # height, width, channels the right way round
        np.testing.assert_array_equal(mask, masks[k])
    with pytest.raises(IndexError):
        ds[2]
    ds.close()


def test_imagenet_segmentation_refuses_other_files(tmp_path):
    import h5py

    with pytest.raises(DatasetError, match="does not exist"):
        ImageNetSegmentation(tmp_path / "missing.mat")
    (tmp_path / "text.mat").write_text("MATLAB 5.0 MAT-file, not HDF5")
    with pytest.raises(DatasetError, match="not an HDF5"):
        ImageNetSegmentation(tmp_path / "text.mat")
    with h5py.File(tmp_path / "other.mat", "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(DatasetError, match="no /value/img"):
        ImageNetSegmentation(tmp_path / "other.mat")


def _cub(root, items):
    """items: (relative path, class id 1-based, is_train)."""
    (root / "images").mkdir(parents=True)
    classes = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross"}
    (root / "classes.txt").write_text("".join(f"{k} {v}\n" for k, v in classes.items()))
    lines = {"images.txt": [], "train_test_split.txt": [], "image_class_labels.txt": []}
    for n, (rel, cls, train) in enumerate(items, 1):
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((10 + n, 12, 3), n * 20, np.uint8)).save(root / "images" / rel)
        lines["images.txt"].append(f"{n} {rel}")
        lines["train_test_split.txt"].append(f"{n} {int(train)}")
        lines["image_class_labels.txt"].append(f"{n} {cls}")
    for name, rows in lines.items():
        (root / name).write_text("\n".join(rows) + "\n")


def test_cub_reads_its_own_layout(tmp_path):
    _cub(tmp_path, [("001.Black_footed_Albatross/a.jpg", 1, True), ("002.Laysan_Albatross/b.jpg", 2, False),
                    ("002.Laysan_Albatross/c.jpg", 2, True)])
    train, test = CubSplit(tmp_path, "train"), CubSplit(tmp_path, "test", input_size=(8, 8))
    assert train.classes == ["Black footed Albatross", "Laysan Albatross"]
    assert [p.name for p in train.paths] == ["a.jpg", "c.jpg"] and train.labels == [0, 1]
    assert len(test) == 1 and test.labels == [1]
    image, label = test[0]
    assert tuple(image.shape) == (8, 8, 3) and label == 1
    assert train.image(0).shape == (11, 12, 3)  # no input size: the file's own
    with pytest.raises(DatasetError, match="train and test"):
        CubSplit(tmp_path, "val")
    (tmp_path / "image_class_labels.txt").write_text("1 1\nx 2\n")
    with pytest.raises(DatasetError, match="expected '<id> <class id>'"):
        CubSplit(tmp_path, "train")
