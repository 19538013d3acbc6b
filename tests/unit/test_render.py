"""clients/render.py: jet colormap, overlays, ROI outline, heatmap payload decoding."""
import io

import numpy as np
import pytest
from PIL import Image

from clients import render


def test_jet_endpoints_and_middle():
    np.testing.assert_array_equal(render.jet(np.array([[0.0, 0.5, 1.0]]))[0],
                                  [[0, 0, 128], [128, 255, 128], [128, 0, 0]])
    assert render.jet(np.array([[-3.0, 7.0]])).tolist() == render.jet(np.array([[0.0, 1.0]])).tolist()


def test_overlay_blends_and_checks_shape():
    image = np.full((4, 5, 3), 100, np.uint8)
    values = np.tile(np.linspace(0, 1, 5), (4, 1))
    out = render.overlay(image, values, alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], np.round(0.5 * 100 + 0.5 * np.array([0, 0, 128])).astype(np.uint8))
    with pytest.raises(ValueError, match="does not match"):
        render.overlay(image, values[:3])


def test_outline_is_the_border_band():
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    ring = render.outline(mask, width=1)
    assert ring.sum() == 6 * 4 - 4 and not ring[4, 4] and ring[2, 5]
    assert render.outline(mask, width=2).sum() == 36 - 4
    drawn = render.draw_outline(np.zeros((10, 10, 3), np.uint8), mask, (255, 0, 0), width=1)
    assert (drawn[ring] == [255, 0, 0]).all() and (drawn[~ring] == 0).all()


def test_heatmap_values_prefers_float16_and_rescales_png():
    from salf.v1 import gateway_pb2 as pb

    values = np.array([[-1.0, 0.0], [0.5, 3.0]], np.float32)
    hm = pb.Heatmap(height=2, width=2, min=-1.0, max=3.0, float16=values.astype("<f2").tobytes())
    np.testing.assert_array_equal(render.heatmap_values(hm), values)
    grey = np.round((values + 1) / 4 * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    hm = pb.Heatmap(height=2, width=2, min=-1.0, max=3.0, png=buf.getvalue())
    np.testing.assert_allclose(render.heatmap_values(hm), values, atol=4 / 255)
    with pytest.raises(ValueError, match="neither PNG nor float16"):
        render.heatmap_values(pb.Heatmap(height=2, width=2))
