"""serving/images.py: decoding, preprocessing per docs/DESIGN.md, and region masks."""
import io
import time

import numpy as np
import pytest
from PIL import Image

from serving.errors import InvalidArgument
from serving.images import box_mask, decode_image, decode_mask, points_mask, require_nonempty


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)


def test_png_decodes_and_resizes_bilinearly_to_input_size(rgb):
    d = decode_image(_encode(rgb, "PNG"), (64, 32))
    assert d.size == (50, 80)
    assert d.model_input.dtype == np.uint8 and d.model_input.shape == (64, 32, 3)
    expected = np.asarray(Image.fromarray(rgb).resize((32, 64), Image.BILINEAR))
    np.testing.assert_array_equal(d.model_input, expected)


def test_same_size_image_is_not_resampled(rgb):
    np.testing.assert_array_equal(decode_image(_encode(rgb, "PNG"), (50, 80)).model_input, rgb)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_accepted(rgb, fmt):
    assert decode_image(_encode(rgb, fmt), (16, 16)).size == (50, 80)


def test_greyscale_and_rgba_become_rgb(rgb):
    grey = decode_image(_encode(rgb[..., 0], "PNG"), (50, 80)).model_input
    np.testing.assert_array_equal(grey[..., 1], rgb[..., 0])
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    np.testing.assert_array_equal(decode_image(_encode(rgba, "PNG"), (50, 80)).model_input, rgb)


@pytest.mark.parametrize("data,match", [
    (b"", "image is empty"),
    (b"not an image at all", r"could not be decoded as JPEG, PNG or WebP"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, r"could not be decoded"),
])
def test_undecodable_images_are_invalid_argument(data, match):
    with pytest.raises(InvalidArgument, match=match):
        decode_image(data, (8, 8))


def test_other_formats_are_refused(rgb):
    with pytest.raises(InvalidArgument, match="GIF; send JPEG, PNG or WebP"):
        decode_image(_encode(rgb, "GIF"), (8, 8))


def test_mask_png_nonzero_pixels_and_size_check():
    m = np.zeros((50, 80), np.uint8)
    m[10:20, 30:60] = 255
    got = decode_mask(_encode(m, "PNG"), (50, 80))
    assert got.dtype == bool and got.sum() == 300
    with pytest.raises(InvalidArgument, match=r"mask is 80x50 \(width x height\) but the image is 60x40"):
        decode_mask(_encode(m, "PNG"), (40, 60))


def test_rgba_mask_uses_opacity():
    m = np.zeros((10, 10, 4), np.uint8)
    m[..., :3] = 255  # white everywhere: only alpha marks the region
    m[2:5, 2:5, 3] = 255
    assert decode_mask(_encode(m, "PNG"), (10, 10)).sum() == 9


def test_box_mask_pixel_centres():
    mask = box_mask((2, 1, 5, 3), (6, 8))
    assert mask.sum() == 3 * 2
    assert mask[1:3, 2:5].all()
    assert box_mask((-10, -10, 100, 100), (6, 8)).all()  # clipped to the image
    with pytest.raises(InvalidArgument, match="x1 > x0"):
        box_mask((5, 1, 5, 3), (6, 8))
    with pytest.raises(InvalidArgument, match="non-finite"):
        box_mask((0, 0, float("nan"), 3), (6, 8))


def test_points_mask_disks_and_validation():
    mask = points_mask([(5.5, 5.5)], 1.0, (11, 11))
    assert mask.sum() == 5 and mask[5, 5]  # centre plus its four neighbours
    assert points_mask([(0, 0), (11, 11)], 1.0, (11, 11)).sum() == 2
    with pytest.raises(InvalidArgument, match="outside the 11x11 image"):
        points_mask([(12, 3)], 1.0, (11, 11))
    with pytest.raises(InvalidArgument, match="no point"):
        points_mask([], 1.0, (11, 11))
    with pytest.raises(InvalidArgument, match="radius must be a positive"):
        points_mask([(1, 1)], -1.0, (11, 11))


def test_empty_region_rejected():
    with pytest.raises(InvalidArgument, match="region is empty: it covers no pixel of the 7x5 image"):
        require_nonempty(np.zeros((5, 7), bool))
    assert box_mask((100, 100, 200, 200), (6, 8)).sum() == 0


def test_too_many_pixels_refused_before_decoding(monkeypatch, rgb):
    import serving.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(InvalidArgument, match=r"is 80x50 pixels; at most 1000 pixels are accepted"):
        decode_image(_encode(rgb, "PNG"), (8, 8))


def test_points_mask_equals_full_image_disks_and_costs_only_the_disks():
    """The windowed disks equal the whole-image definition (pixel centres within the radius), at the
    edges and with fractional radii; many points are bounded (each used to cost the whole image)."""
    from serving.images import MAX_POINTS

    rng = np.random.default_rng(3)
    h, w = 37, 53
    yy, xx = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    for radius in (0.5, 1.0, 2.7, 6.0, 80.0):
        pts = [(float(x), float(y)) for x, y in rng.uniform(0, 1, (6, 2)) * (w, h)] + [(0.0, 0.0), (w, h), (w, 0.0)]
        expected = np.zeros((h, w), bool)
        for x, y in pts:
            expected |= (yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2
        np.testing.assert_array_equal(points_mask(pts, radius, (h, w)), expected)
    with pytest.raises(InvalidArgument, match=f"at most {MAX_POINTS} are accepted"):
        points_mask([(1.0, 1.0)] * (MAX_POINTS + 1), 1.0, (11, 11))
    start = time.perf_counter()
    points_mask([(float(x), float(y)) for x, y in rng.uniform(0, 2000, (MAX_POINTS, 2))], 3.0, (2000, 2000))
    assert time.perf_counter() - start < 2.0  # whole-image disks: ~1024 x 4 Mpx, tens of seconds
