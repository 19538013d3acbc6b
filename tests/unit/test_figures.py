"""salf/figures.py: the jet colormap, region outlines, composed explanation figures (layout, the common
scale, the region outline)."""
import numpy as np
import pytest

from salf import figures
from salf.figures import PAD, Panel, compose, display_size


def _panel_means(fig, n, size):
    dh, dw = display_size(size)
    a = np.asarray(fig.convert("RGB")).astype(float)
    top = 34 + PAD + 34
    return [a[top:top + dh, PAD + k * (dw + PAD): PAD + k * (dw + PAD) + dw] for k in range(n)]


def test_common_scale_shows_a_weak_concept_cold_and_per_map_does_not():
    rgb = np.full((60, 80, 3), 128, np.uint8)
    weak, strong = Panel("weak", 0.1, np.full((7, 7), 0.1)), Panel("strong", 2.0, np.full((7, 7), 1.0))
    weak.grid_map[3, 3] = 0.12
    strong.grid_map[3, 3] = 1.02  # same shape, ten times the strength
    common = _panel_means(compose(rgb, [weak, strong], "t"), 3, (60, 80))
    red = lambda tile: tile[..., 0].mean() - tile[..., 2].mean()
    assert red(common[2]) > red(common[1]) + 50  # strong is hot, weak is cold
    per_map = _panel_means(compose(rgb, [weak, strong], "t", scale="per-map"), 3, (60, 80))
    assert abs(red(per_map[2]) - red(per_map[1])) < 1  # each stretched to its own range: alike


def test_layout_is_display_sized_whatever_the_image_size_and_the_region_is_outlined():
    big = np.zeros((4500, 6000, 3), np.uint8)
    mask = np.zeros((4500, 6000), bool)
    mask[1000:3000, 2000:4000] = True
    fig = compose(big, [Panel("a", 1.0, np.random.default_rng(0).random((7, 7)))], "big", mask)
    dh, dw = display_size((4500, 6000))
    assert (dh, dw) == (192, 256) and fig.height < 400 and fig.width >= PAD + 2 * (dw + PAD)
    image_tile = _panel_means(fig, 1, (4500, 6000))[0]
    assert ((image_tile[..., 0] > 200) & (image_tile[..., 1] < 60)).sum() > 200  # red outline on the image


def test_unknown_scale_is_refused():
    with pytest.raises(ValueError, match="scale must be one of"):
        compose(np.zeros((8, 8, 3), np.uint8), [], "t", scale="log")


def test_rules_figure_draws_signed_weighted_flows():
    from salf.figures import rules_figure

    fig = np.asarray(rules_figure([("cat", [("whiskers", 2.0), ("wheels", -0.5)]), ("car", [("wheels", 1.0)])]))
    green = (fig[..., 1] > 120) & (fig[..., 0] < 80) & (fig[..., 2] < 100)
    red = (fig[..., 0] > 160) & (fig[..., 1] < 80) & (fig[..., 2] < 80)
    assert green.sum() > 4 * red.sum() > 0  # two positive flows, the widest of 10 px; one thin negative one


def test_rules_plot_from_salfctl_and_no_silent_overwrite(tmp_path):
    from typer.testing import CliRunner

    from clients.salfctl import app
    from export.repository import export_repository
    from tests.fixtures.bundles import make_random_bundle

    repo = tmp_path / "repo"
    export_repository(make_random_bundle(tmp_path / "bundle"), repo, flavour="python", parity=False)
    plot = tmp_path / "rules.png"
    r = CliRunner().invoke(app, ["rules", "-m", str(repo), "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    assert plot.is_file() and "wrote" in r.stderr
    r = CliRunner().invoke(app, ["rules", "-m", str(repo), "--plot", str(plot)])
    assert r.exit_code == 2 and "already exists" in r.stderr


def test_jet_endpoints_and_middle():
    np.testing.assert_array_equal(figures.jet(np.array([[0.0, 0.5, 1.0]]))[0],
                                  [[0, 0, 128], [128, 255, 128], [128, 0, 0]])
    assert figures.jet(np.array([[-3.0, 7.0]])).tolist() == figures.jet(np.array([[0.0, 1.0]])).tolist()


def test_outline_is_the_border_band():
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    ring = figures.outline(mask, width=1)
    assert ring.sum() == 6 * 4 - 4 and not ring[4, 4] and ring[2, 5]
    assert figures.outline(mask, width=2).sum() == 36 - 4
    drawn = figures.draw_outline(np.zeros((10, 10, 3), np.uint8), mask, (255, 0, 0), width=1)
    assert (drawn[ring] == [255, 0, 0]).all() and (drawn[~ring] == 0).all()
