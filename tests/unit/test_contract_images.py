"""One decoding contract (salf.contract.images): the training data path, the export parity path and the
gateway's path give identical arrays for the same files, and those arrays are the right pixels."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from export.parity import load_images
from salf.contract.images import decode_mask, load_image
from serving.errors import InvalidArgument
from serving.images import decode_image, decode_mask as serving_decode_mask
from tests.fixtures.gateway import save_image as _save
from training.data.folder import ImageFolderSplit

INPUT = (40, 56)  # (H, W): every file is resized, so the resize is part of what must agree


def _rgb(h=30, w=44, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    base[: h // 2, : w // 3] = (250, 20, 20)  # a red block: orientation errors move it
    return base


def _exif_rotated_jpeg(rgb: np.ndarray) -> tuple[bytes, bytes]:
    """(JPEG whose pixels are stored rotated with EXIF orientation 6, the same JPEG without the tag)."""
    stored = Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90)  # what a phone sensor writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return _save(stored, "JPEG", quality=95, exif=exif), _save(stored, "JPEG", quality=95)


def _files() -> dict[str, bytes]:
    rgb = _rgb()
    grey16 = (np.random.default_rng(1).integers(0, 65536, (30, 44))).astype(np.uint16)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    rotated, _ = _exif_rotated_jpeg(rgb)
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    return {
        "rgb8.png": _save(Image.fromarray(rgb), "PNG"),
        "grey8.png": _save(Image.fromarray(rgb[..., 0]), "PNG"),
        "grey16.png": _save(Image.fromarray(grey16), "PNG"),
        "palette.png": _save(Image.fromarray(rgb).quantize(colors=16), "PNG"),
        "rgba.png": _save(Image.fromarray(rgba, mode="RGBA"), "PNG"),
        "exif6.jpg": rotated,
        "plain.jpg": _save(Image.fromarray(rgb), "JPEG", quality=90),
        "cmyk.jpg": _save(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90),
        "animated.png": _save(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "lossless.webp": _save(Image.fromarray(rgb), "WEBP", lossless=True),
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract-data")
    (root / "classes.txt").write_text("things\n")
    folder = root / "train" / "things"
    folder.mkdir(parents=True)
    files = _files()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return root, files


def test_training_parity_and_serving_paths_decode_identically(dataset):
    root, files = dataset
    split = ImageFolderSplit(root, "train", INPUT)
    by_name = {p.name: i for i, p in enumerate(split.paths)}
    assert sorted(by_name) == sorted(files)
    parity = load_images(split.paths, INPUT)
    for name, data in files.items():
        training = split.image(by_name[name])
        serving = decode_image(data, INPUT).model_input
        assert training.dtype == serving.dtype == np.uint8 and training.shape == (*INPUT, 3), name
        np.testing.assert_array_equal(training, serving, err_msg=name)
        np.testing.assert_array_equal(parity[by_name[name]], serving, err_msg=name)


def test_sixteen_bit_grey_is_its_high_byte_not_white():
    grey16 = (np.arange(30 * 44).reshape(30, 44) * 47 % 65536).astype(np.uint16)
    got = load_image(_save(Image.fromarray(grey16), "PNG"))
    want = np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(got, want)
    assert got.mean() < 200  # Pillow's convert("RGB") alone clips this image to white


def test_exif_orientation_is_applied_to_images_and_sizes():
    rgb = _rgb()
    tagged, untagged = _exif_rotated_jpeg(rgb)
    d = decode_image(tagged, INPUT)
    assert d.size == rgb.shape[:2]  # the upright size, not the stored one
    upright = Image.open(io.BytesIO(untagged)).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(load_image(tagged), np.asarray(upright))
    assert load_image(tagged)[:15, :14, 0].mean() > 200  # the red block is back at the top left


def test_animated_images_use_the_first_frame():
    rgb = _rgb()
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    np.testing.assert_array_equal(load_image(_save(frames[0], "PNG", save_all=True, append_images=frames[1:])), rgb)


def test_masks_follow_exif_and_the_alpha_rule():
    mask = np.zeros((30, 44), bool)
    mask[2:10, 3:20] = True
    stored = Image.fromarray(mask.astype(np.uint8) * 255).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    np.testing.assert_array_equal(decode_mask(_save(stored, "PNG", exif=exif), (30, 44)), mask)
    # alpha marks the region whenever some pixel is transparent, whatever the colour underneath
    rgba = np.zeros((30, 44, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = mask * 255
    np.testing.assert_array_equal(decode_mask(_save(Image.fromarray(rgba, "RGBA"), "PNG")), mask)
    # the gateway reports a size mismatch as a bad argument
    with pytest.raises(InvalidArgument, match="the mask must have the image's own size"):
        serving_decode_mask(_save(stored, "PNG"), (30, 44))  # no EXIF: stored 44x30 is not the image's size


def test_large_jpegs_decode_at_reduced_scale_with_their_own_size():
    """Draft decoding: a JPEG 4x the input is decoded at 1/2-1/4 scale; the model input stays close to a
    full decode + resize, and the reported size is the full image's."""
    rng = np.random.default_rng(3)
    low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(low).resize((640, 480), Image.BILINEAR))
    data = _save(Image.fromarray(big), "JPEG", quality=95)
    d = decode_image(data, (112, 112))
    assert d.size == (480, 640)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((112, 112), Image.BILINEAR))
    assert np.abs(d.model_input.astype(int) - full.astype(int)).mean() < 3.0
    assert load_image(data, (112, 112)).tobytes() == d.model_input.tobytes()  # one path for everyone


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 7), (17, 23), (375, 500), (9, 11, 3), (5, 4, 4), (1, 1, 3)])
def test_encode_png_round_trips_through_pillow(shape):
    from salf.contract.images import encode_png

    rng = np.random.default_rng(sum(shape))
    noise = rng.integers(0, 256, shape, dtype=np.uint8)  # every byte value, so Sub's mod-256 wrap is exercised
    ramp = (np.arange(int(np.prod(shape))) % 256).astype(np.uint8).reshape(shape)
    for a in (noise, ramp, np.zeros(shape, np.uint8), np.full(shape, 255, np.uint8)):
        for level in (0, 1, 9):
            with Image.open(io.BytesIO(encode_png(a, level))) as im:
                assert im.format == "PNG" and im.mode == {2: "L", 3: "RGB", 4: "RGBA"}[a.ndim if a.ndim == 2 else a.shape[2]]
                np.testing.assert_array_equal(np.asarray(im), a)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4), np.uint8),
                                 np.zeros(4, np.uint8), np.zeros((4, 4), np.float32)])
def test_encode_png_refuses_what_it_cannot_write(bad):
    from salf.contract.images import encode_png

    with pytest.raises(ValueError, match="uint8"):
        encode_png(bad)
