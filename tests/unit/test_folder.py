"""ImageFolderSplit (training/data/folder.py): order, preprocessing, masks, user datasets, errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from training.data.folder import DatasetError, ImageFolderSplit, read_dataset_info, resize_masks_nearest


def _user_dataset(root):
    """A user ImageFolder without metadata: mixed formats and modes, a class missing from val."""
    rng = np.random.default_rng(0)
    files = {
        ("train", "zebra", "b.jpg"): "RGB", ("train", "zebra", "a.png"): "RGBA", ("train", "apple", "c.webp"): "RGB",
        ("train", "apple", "B.JPEG"): "L", ("val", "mango", "x.png"): "P", ("test", "apple", "y.png"): "RGB",
    }
    for (split, cls, name), mode in files.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(root / split / cls / name)
    (root / "train" / "apple" / "notes.txt").write_text("not an image")
    return root


def test_order_labels_and_classes(synth_data):
    ds = ImageFolderSplit(synth_data, "train")
    classes = (synth_data / "classes.txt").read_text().split()
    assert ds.classes == classes
    assert len(ds) == 12 * len(classes)
    keys = [(classes.index(p.parent.name), p.name) for p in ds.paths]
    assert keys == sorted(keys)
    assert ds.labels == [classes.index(p.parent.name) for p in ds.paths]
    img, label = ds[13]
    assert label == 1 and img.shape == (112, 112, 3) and img.dtype == torch.uint8


def test_preprocessing_is_pillow_bilinear(synth_data):
    ds = ImageFolderSplit(synth_data, "val", input_size=(64, 80))
    img, _ = ds[7]
    with Image.open(ds.paths[7]) as im:
        ref = np.asarray(im.convert("RGB").resize((80, 64), Image.BILINEAR))
    assert img.shape == (64, 80, 3)
    np.testing.assert_array_equal(img.numpy(), ref)
    native = ImageFolderSplit(synth_data, "val")[7][0]
    with Image.open(ds.paths[7]) as im:
        np.testing.assert_array_equal(native.numpy(), np.asarray(im.convert("RGB")))


def test_masks_at_input_size(synth_data):
    full = ImageFolderSplit(synth_data, "test")
    half = ImageFolderSplit(synth_data, "test", input_size=(56, 56))
    m = full.load_masks(3)
    assert m.dtype == np.bool_ and m.shape == (19, 112, 112)
    np.testing.assert_array_equal(half.load_masks(3), m[:, 1::2, 1::2])  # pixel-centre nearest sampling


def test_resize_masks_nearest_matches_torch():
    rng = np.random.default_rng(1)
    m = rng.random((2, 13, 17)) > 0.5
    got = resize_masks_nearest(m, (29, 8))
    ref = torch.nn.functional.interpolate(torch.from_numpy(m)[None].float(), size=(29, 8), mode="nearest-exact")
    np.testing.assert_array_equal(got, ref[0].bool().numpy())


def test_user_dataset_without_metadata(tmp_path):
    root = _user_dataset(tmp_path / "user")
    info = read_dataset_info(root)
    assert info.classes == ["apple", "mango", "zebra"]  # union over splits, sorted
    assert info.concepts is None and not info.has_masks
    train = ImageFolderSplit(root, "train", input_size=(16, 16))
    assert [p.name for p in train.paths] == ["B.JPEG", "c.webp", "a.png", "b.jpg"]
    assert train.labels == [0, 0, 2, 2]
    assert all(train[i][0].shape == (16, 16, 3) for i in range(len(train)))
    val = ImageFolderSplit(root, "val")
    assert val.labels == [1] and val[0][0].shape == (20, 30, 3)
    with pytest.raises(DatasetError, match="no concept masks"):
        train.load_masks(0)


def test_errors(tmp_path, synth_data):
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset_info(tmp_path / "nowhere")
    root = _user_dataset(tmp_path / "user")
    with pytest.raises(DatasetError, match="split folder .*extra.* does not exist"):
        ImageFolderSplit(root, "extra")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no images"):
        ImageFolderSplit(tmp_path / "empty", "train")
    (root / "classes.txt").write_text("apple\nzebra\n")
    with pytest.raises(DatasetError, match="mango"):
        ImageFolderSplit(root, "val")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DatasetError, match="no classes"):
        read_dataset_info(tmp_path / "nothing")
    ds = ImageFolderSplit(synth_data, "val")
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="input_size"):
        ImageFolderSplit(synth_data, "val", input_size=(0, 5))


def test_metadata_from_dataset_json_only(tmp_path):
    root = _user_dataset(tmp_path / "user")
    (root / "dataset.json").write_text('{"classes": ["zebra", "apple", "mango"], "concepts": ["stripes", "peel"]}')
    info = read_dataset_info(root)
    assert info.classes == ["zebra", "apple", "mango"] and info.concepts == ["stripes", "peel"]
    assert ImageFolderSplit(root, "train").labels == [0, 0, 1, 1]
    (root / "concepts.txt").write_text("stripes\n")
    with pytest.raises(DatasetError, match="concepts disagree"):
        read_dataset_info(root)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="invalid JSON"):
        read_dataset_info(root)
