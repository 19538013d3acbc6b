"""The region options of explain / explain-region / intervene (clients/commands/regions.py): parsing,
usage errors, the Region message, and the mask drawn for figures."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import typer

from salf import load_api
from clients.client import SalfClient
from clients.commands.regions import check_region_options, numbers, parse_region, region_mask


@pytest.fixture
def client():
    fake = SimpleNamespace(pb=load_api()[0])
    fake.region = lambda **kw: SalfClient.region(fake, **kw)
    return fake


def test_numbers_parse_exactly_n_comma_separated_values():
    assert numbers("1,2.5,-3,4", 4, "--box", "x0,y0,x1,y1") == [1.0, 2.5, -3.0, 4.0]
    with pytest.raises(typer.BadParameter, match=r"^--box must be x0,y0,x1,y1 in pixels, got '1,2,3'$"):
        numbers("1,2,3", 4, "--box", "x0,y0,x1,y1")
    with pytest.raises(typer.BadParameter, match=r"^--point must be x,y in pixels, got 'a,b'$"):
        numbers("a,b", 2, "--point", "x,y")


def test_check_region_options_catches_every_malformed_flag():
    check_region_options(None, None)
    check_region_options("0,0,10,10", ["1,2", "3,4"])
    with pytest.raises(typer.BadParameter, match="--box must be"):
        check_region_options("0,0,10", None)
    with pytest.raises(typer.BadParameter, match=r"--point must be x,y in pixels, got '5'"):
        check_region_options(None, ["1,2", "5"])


def test_parse_region_takes_exactly_one_kind(client, tmp_path):
    mask = tmp_path / "m.png"
    mask.write_bytes(b"\x89PNG not decoded here")
    with pytest.raises(typer.BadParameter, match="give only one of --roi, --box, --point"):
        parse_region(client, mask, "0,0,1,1", None, 0.0, required=False)
    with pytest.raises(typer.BadParameter, match="give only one"):
        parse_region(client, None, "0,0,1,1", ["1,1"], 0.0, required=False)
    with pytest.raises(typer.BadParameter, match="this command needs a region: --roi, --box or --point"):
        parse_region(client, None, None, [], 0.0, required=True)
    assert parse_region(client, None, None, None, 0.0, required=False) is None


def test_parse_region_builds_the_region_message(client, tmp_path):
    mask = tmp_path / "m.png"
    mask.write_bytes(b"png bytes")
    assert parse_region(client, mask, None, None, 0.0, required=True).mask_png == b"png bytes"
    box = parse_region(client, None, "1,2,30,40", None, 0.0, required=True).box
    assert (box.x0, box.y0, box.x1, box.y1) == (1, 2, 30, 40)
    pts = parse_region(client, None, None, ["3,4", "5.5,6"], 7.0, required=True).points
    assert [(p.x, p.y) for p in pts.points] == [(3, 4), (5.5, 6)] and pts.radius == 7.0


def test_region_mask_draws_what_the_gateway_draws(client):
    assert region_mask(None, (4, 4), 1.0) is None
    box = region_mask(client.region(box=[1, 0, 3, 2]), (4, 4), 1.0)
    assert box.dtype == bool and box.shape == (4, 4)
    assert box.tolist() == [[False, True, True, False]] * 2 + [[False] * 4] * 2
    # radius 0 in the message: the model's prompt radius (default_radius) is used
    point = region_mask(client.region(points=[[0.5, 0.5]], radius=0.0), (3, 3), 1.0)
    assert point.sum() == 3 and point[0, 0] and point[0, 1] and point[1, 0]
    assert region_mask(client.region(box=[3, 3, 1, 1]), (4, 4), 1.0) is None  # does not fit: no mask


def test_region_mask_of_an_undecodable_png_is_none(client):
    assert region_mask(client.region(mask_png=b"not a png"), (4, 4), 1.0) is None
    ok = np.zeros((4, 4), bool)
    ok[1:3, 1:3] = True
    from salf.contract.images import encode_png

    drawn = region_mask(client.region(mask_png=encode_png(ok.astype(np.uint8) * 255)), (4, 4), 1.0)
    assert drawn.tolist() == ok.tolist()
    assert region_mask(client.region(mask_png=encode_png(ok.astype(np.uint8) * 255)), (5, 4), 1.0) is None  # size
