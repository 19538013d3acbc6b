"""The explorer's HTTP API (clients/ui/app.py) without a browser: a real ExplorerServer on a free port
in front of a real gateway that requires a token. Inputs a stranger brings (an EXIF-rotated phone
photo, a 16-bit PNG, garbage), expired explanations, and the token never leaving the server."""
from __future__ import annotations

import base64
import io
import json
from http.client import HTTPConnection
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.gateway import TOKEN, sample_image, save_image

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
SECRET = "test-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def explorer(token_gateway, tmp_path_factory):
    from clients.client import SalfClient
    from clients.ui.app import ExplorerServer
    from clients.ui.session import Explorer

    folder = tmp_path_factory.mktemp("folder")
    for k in range(3):
        Image.fromarray(sample_image(k)).save(folder / f"{k}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    client = SalfClient.connect(token_gateway.url, token=TOKEN)
    server = ExplorerServer(Explorer(client, folder), "127.0.0.1", 0, SECRET).start()
    yield server
    server.shutdown()
    server.server_close()
    client.close()


class Api:
    def __init__(self, server):
        self.port = server.port
        self.bodies: list[bytes] = []

    def __call__(self, method: str, path: str, body=None, headers=None):
        conn = HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = {"X-Salf-Secret": SECRET, **(headers or {})}
        if isinstance(body, dict):
            body, h["Content-Type"] = json.dumps(body).encode(), "application/json"
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        self.bodies.append(data)
        return r.status, (json.loads(data) if r.getheader("Content-Type") == "application/json" else data)


@pytest.fixture()
def api(explorer):
    return Api(explorer)


def _exif_rotated(rgb: np.ndarray) -> bytes:
    """A JPEG stored rotated, with EXIF orientation 6 ("rotate 90 CW to display"): upright it is ``rgb``."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return save_image(Image.fromarray(np.rot90(rgb, 1)), "JPEG", quality=95, exif=exif)


def test_exif_photo_is_shown_upright_and_regions_mean_the_gateways_pixels(api, explorer):
    upright = sample_image(3, size=(84, 112))  # h 84, w 112
    data = _exif_rotated(upright)
    status, doc = api("POST", "/api/image", data, {"X-Filename": "ph%C3%B6to.jpg"})
    assert status == 200, doc
    assert (doc["width"], doc["height"]) == (112, 84) and doc["name"] == "phöto.jpg"
    status, png = api("GET", f"/api/image/{doc['key']}.png")
    shown = Image.open(io.BytesIO(png))
    assert shown.size == (112, 84)

    status, e = api("POST", "/api/explain", {"key": doc["key"], "top_k": 3})
    assert status == 200 and e["image_width"] == 112 and e["image_height"] == 84
    box = [60.0, 10.0, 112.0, 50.0]  # right half: on the stored (rotated) pixels this would be the top
    status, r = api("POST", "/api/region", {"key": doc["key"], "explanation_id": e["explanation_id"],
                                            "region": {"box": box}, "top_k": 4})
    assert status == 200, r
    client = explorer.explorer.client
    expected = client.explain_region(client.region(box=box), image=data, top_k=4)
    assert [c["name"] for c in r["concepts"]] == [c.name for c in expected.concepts]
    assert r["area"] == expected.region_area == 52 * 40


def test_brushed_mask_points_and_an_expired_explanation(api, explorer):
    rgb = sample_image(5)
    data = save_image(Image.fromarray(rgb), "PNG")
    _, doc = api("POST", "/api/image", data)
    mask = np.zeros((84, 112, 4), np.uint8)
    mask[20:50, 30:70] = 255  # the page's brush: opaque inside, transparent outside
    png = base64.b64encode(save_image(Image.fromarray(mask, "RGBA"), "PNG")).decode()
    # an explanation id the gateway does not hold: the explorer resends the image once
    status, r = api("POST", "/api/region", {"key": doc["key"], "explanation_id": "expired-id",
                                            "region": {"mask_png": png}})
    assert status == 200, r
    assert r["area"] == 30 * 40
    client = explorer.explorer.client
    expected = client.explain_region(client.region(box=[30, 20, 70, 50]), image=data)
    assert [c["name"] for c in r["concepts"]] == [c.name for c in expected.concepts]

    status, r = api("POST", "/api/region", {"key": doc["key"], "region": {"points": [[20, 20], [80, 60]]}})
    assert status == 200 and r["area"] > 0
    concept = client.info.concepts[0]
    status, r = api("POST", "/api/intervene", {"key": doc["key"], "region": {"box": [0, 0, 56, 42]},
                                               "edits": [{"concept": concept, "beta": 2.0},
                                                         {"concept": client.info.concepts[1], "beta": -1.0}]})
    assert status == 200, r
    direct = client.intervene([client.edit(client.region(box=[0, 0, 56, 42]), 2.0, concept),
                               client.edit(client.region(box=[0, 0, 56, 42]), -1.0, client.info.concepts[1])],
                              image=data)
    assert r["logits_after"] == pytest.approx(list(direct.logits_after), abs=1e-5)
    assert set(r["logit_deltas"]) == set(client.info.classes)


def test_sixteen_bit_png_opens(api):
    grey16 = (np.arange(60 * 80, dtype=np.uint32).reshape(60, 80) * 13 % 65536).astype(np.uint16)
    status, doc = api("POST", "/api/image", save_image(Image.fromarray(grey16), "PNG"))
    assert status == 200 and (doc["width"], doc["height"]) == (80, 60)


@pytest.mark.parametrize("method, path, body, status, words", [
    ("POST", "/api/image", b"", 400, "empty"),
    ("POST", "/api/image", b"GIF89a garbage", 400, "could not be decoded"),
    ("POST", "/api/explain", b"{not json", 400, "not JSON"),
    ("POST", "/api/explain", {"key": "0123456789abcdef"}, 404, "no longer open"),
    ("POST", "/api/region", {"key": "0123456789abcdef", "region": {"box": [0, 0, 1, 1]}}, 404, "no longer open"),
    ("GET", "/api/gallery?concept=nope", None, 400, "unknown concept"),
    ("GET", "/api/nothing", None, 404, "no GET"),
    ("POST", "/api/folder/open", {"index": 99}, 400, "no folder image 99"),
])
def test_bad_requests_get_clear_errors(api, method, path, body, status, words):
    got, doc = api(method, path, body)
    assert got == status, doc
    assert words in doc["error"]["message"]


def test_bad_regions_and_edits_get_clear_errors(api):
    _, doc = api("POST", "/api/image", save_image(Image.fromarray(sample_image(7)), "PNG"))
    key = doc["key"]
    cases = [({"box": [10, 10, 5, 5]}, "x1 > x0"), ({"box": [1, 2]}, "box must be"), ({}, "exactly one"),
             ({"points": [[500, 5]]}, "outside"), ({"mask_png": "!!!"}, "bad region"),
             ("box", "must be an object")]
    for region, words in cases:
        status, r = api("POST", "/api/region", {"key": key, "region": region})
        assert status == 400 and words in r["error"]["message"], (region, r)
    status, r = api("POST", "/api/intervene", {"key": key, "region": {"box": [0, 0, 9, 9]}, "edits": []})
    assert status == 400 and "at least one concept" in r["error"]["message"]
    status, r = api("POST", "/api/intervene", {"key": key, "region": {"box": [0, 0, 9, 9]},
                                               "edits": [{"concept": "no such concept", "beta": 1}]})
    assert status == 400 and r["error"]["code"] == "INVALID_ARGUMENT" and "no such concept" in r["error"]["message"]
    status, _ = api("GET", "/api/info")
    assert status == 200  # still up


def test_folder_gallery_skips_unreadable_files_and_the_token_never_reaches_the_page(api, explorer):
    status, info = api("GET", "/api/info")
    assert info["files"] == ["0.png", "1.png", "2.png", "broken.png"]
    concept = info["model"]["concepts"][0]
    status, g = api("GET", f"/api/gallery?concept={quote(concept)}&k=5")
    assert status == 200, g
    assert g["scored"] == 3 and len(g["images"]) == 3
    scores = [i["score"] for i in g["images"]]
    assert scores == sorted(scores, reverse=True)
    status, thumb = api("GET", "/api/folder/thumb/0.png")
    assert status == 200 and max(Image.open(io.BytesIO(thumb)).size) == 96
    for name in ("index.html", "app.js", "app.css"):
        assert api("GET", f"/static/{name}")[0] == 200
    assert api("GET", "/?secret=" + SECRET)[0] == 200
    assert all(TOKEN.encode() not in body for body in api.bodies)


def test_security_headers(explorer):
    conn = HTTPConnection("127.0.0.1", explorer.port, timeout=10)
    conn.request("GET", "/?secret=" + SECRET)
    r = conn.getresponse()
    r.read()
    assert r.status == 200
    assert "script-src 'self'" in r.getheader("Content-Security-Policy")
    assert "frame-ancestors 'none'" in r.getheader("Content-Security-Policy")
    assert r.getheader("Access-Control-Allow-Origin") is None
    cookie = r.getheader("Set-Cookie")
    assert SECRET in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    conn.request("OPTIONS", "/api/explain", headers={"Origin": "http://evil.example",
                                                      "Access-Control-Request-Method": "POST"})
    r = conn.getresponse()
    r.read()
    assert r.status == 403 and r.getheader("Access-Control-Allow-Origin") is None
    conn.close()


def test_static_modules_have_a_javascript_type_and_nothing_outside_static_is_served(explorer):
    from pathlib import Path

    import clients.ui.app as app_module

    static = Path(app_module.__file__).parent / "static"
    modules = sorted(p.relative_to(static).as_posix() for p in static.rglob("*.js"))
    assert "app.js" in modules and "js/geometry.js" in modules
    conn = HTTPConnection("127.0.0.1", explorer.port, timeout=10)

    def get(path):
        conn.request("GET", path, headers={"X-Salf-Secret": SECRET})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type"), r.read()

    for name in modules:
        status, kind, body = get(f"/static/{name}")
        assert status == 200 and kind == "text/javascript; charset=utf-8", (name, status, kind)
        assert body == (static / name).read_bytes()
    assert get("/static/app.css")[:2] == (200, "text/css; charset=utf-8")
    secret_source = (static.parent / "app.py").read_bytes()
    for path in ["/static/../app.py", "/static/js/../../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py",
                 "/static/js/..%2f..%2fapp.py", "/static/%2E%2E%2Fapp.py", "/static/..\\app.py", "/static//app.py",
                 "/static/js/../../../../../../etc/passwd", "/static/app.py", "/static/__init__.py",
                 "/static/js/nothing.js", "/static/js/", "/static/"]:
        status, kind, body = get(path)
        assert status == 404 and kind == "application/json", (path, status)
        assert json.loads(body)["error"]["code"] == "NOT_FOUND" and secret_source not in body
    conn.close()
