"""`salfctl` client commands against real gateways (both backends) and `salfctl serve` as a real process.

In-process runs use typer's CliRunner on the real app (a real gRPC connection to the gateway); the
subprocess runs check what only a process shows: exit codes, fail-fast timing, SIGTERM shutdown.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.fixtures.gateway import (ROOT, SALFCTL, TOKEN, encode, free_port, sample_image, start_salfctl_serve)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two images (84x112), an ROI mask of the same size, and an undecodable 'image'."""
    d = tmp_path_factory.mktemp("salfctl")
    paths = {}
    for n in range(2):
        paths[f"img{n}"] = d / f"img{n}.png"
        paths[f"img{n}"].write_bytes(encode(sample_image(n)))
    mask = np.zeros((84, 112), np.uint8)
    mask[20:60, 30:80] = 255
    paths["mask"] = d / "roi.png"
    paths["mask"].write_bytes(encode(mask))
    paths["bad"] = d / "broken.png"
    paths["bad"].write_bytes(b"\x89PNG this is not an image")
    return paths


def salfctl(*args: str):
    from clients.salfctl import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture()
def client(gateway):
    from clients.client import SalfClient

    with SalfClient.connect(gateway.url, timeout=10) as c:
        yield c


# ------------------------------------------------------------------ every command, both backends

def test_predict_many_images_as_json_lines(gateway, files, client):
    r = salfctl("predict", files["img0"], files["img1"], "-u", gateway.url, "--top-k", "2", "--json")
    assert r.exit_code == 0, r.output
    rows = _jsonl(r.stdout)
    assert [row["image"] for row in rows] == [str(files["img0"]), str(files["img1"])]
    for row, key in zip(rows, ("img0", "img1")):
        direct = client.predict(files[key].read_bytes(), top_k=2)
        assert [c["index"] for c in row["classes"]] == [c.index for c in direct.classes]
        np.testing.assert_allclose([c["probability"] for c in row["classes"]], [c.probability for c in direct.classes],
                                   rtol=1e-6)


def test_explain_roi_writes_one_figure_with_the_grid_maps_in_the_json(gateway, files, client, tmp_path):
    out = tmp_path / "out"
    r = salfctl("explain", files["img0"], "--roi", files["mask"], "--top-k", "3", "--out", out, "--save-npz",
                "-u", gateway.url, "--json")
    assert r.exit_code == 0, r.output
    (row,) = _jsonl(r.stdout)
    assert 1 <= len(row["concepts"]) <= 3
    # the numbers: every concept's grid map, equal to the RPC's, with the geometry to place it
    direct = client.explain(files["img0"].read_bytes(), top_k=3, heatmaps="none")
    assert row["geometry"]["grid"] == [7, 7] and row["geometry"]["image_size"] == [84, 112]
    for c, d in zip(row["concepts"], direct.concepts):
        assert len(c["grid_map"]) == 49
        np.testing.assert_allclose(c["grid_map"], list(d.grid_map), rtol=1e-6)
    npz = np.load(row["npz"])
    assert npz["grid_maps"].shape == (len(row["concepts"]), 7, 7)
    np.testing.assert_allclose(npz["grid_maps"][0].ravel(), row["concepts"][0]["grid_map"], rtol=1e-6)
    # one figure per image: the image panel (region outlined in red) and one panel per concept
    figure = np.asarray(Image.open(row["figure"]).convert("RGB"))
    from salf.figures import PAD, PANEL, display_size

    dh, dw = display_size((84, 112))
    assert dw == PANEL and figure.shape[1] >= PAD + (1 + len(row["concepts"])) * (dw + PAD)
    red = (figure[..., 0] > 200) & (figure[..., 1] < 60) & (figure[..., 2] < 60)
    assert red.sum() > 100  # the ROI outline
    assert sorted(p.name for p in out.iterdir()) == ["img0.npz", "img0.png"]
    # The region table equals ExplainRegion through the client library.
    direct = client.explain_region(client.region(mask_png=files["mask"].read_bytes()),
                                   image=files["img0"].read_bytes(), top_k=3)
    assert [a["index"] for a in row["region"]["concepts"]] == [a.index for a in direct.concepts]
    np.testing.assert_allclose([a["activation"] for a in row["region"]["concepts"]],
                               [a.activation for a in direct.concepts], rtol=1e-5)
    assert row["region"]["area"] == 40 * 50
    # nothing is overwritten without --force
    again = salfctl("explain", files["img0"], "--out", out, "-u", gateway.url)
    assert again.exit_code == 2 and "img0.png already exist" in again.stderr and "--force" in again.stderr
    assert salfctl("explain", files["img0"], "--out", out, "-u", gateway.url, "--force").exit_code == 0


def test_explain_same_file_names_from_two_folders_get_two_figures(gateway, tmp_path):
    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    for n, p in enumerate((a, b)):
        p.parent.mkdir()
        p.write_bytes(encode(sample_image(n)))
    out = tmp_path / "out"
    r = salfctl("explain", a, b, "--out", out, "-u", gateway.url, "--json")
    assert r.exit_code == 0, r.output
    rows = _jsonl(r.stdout)
    assert [Path(row["figure"]).name for row in rows] == ["a__x.png", "b__x.png"]
    assert all(Path(row["figure"]).is_file() for row in rows)


def test_explain_tables_and_requested_class(gateway, files):
    r = salfctl("explain", files["img1"], "--class", "class_2", "--box", "0,0,50,40", "-u", gateway.url)
    assert r.exit_code == 0, r.output
    assert "class_2" in r.stdout and "contribution" in r.stdout and "region of 2000 px" in r.stdout


def test_intervene_matches_the_rpc(gateway, files, client):
    r = salfctl("intervene", files["img0"], "--roi", files["mask"], "--concept", "concept 1", "--beta", "2.5",
                "-u", gateway.url, "--json")
    assert r.exit_code == 0, r.output
    (row,) = _jsonl(r.stdout)
    direct = client.intervene([client.edit(client.region(mask_png=files["mask"].read_bytes()), 2.5, "concept 1")],
                              image=files["img0"].read_bytes())
    np.testing.assert_allclose(list(row["logit_deltas"].values()), direct.logit_deltas, rtol=1e-5, atol=1e-6)
    assert row["predicted_after"]["index"] == direct.predicted_after.index
    by_index = salfctl("intervene", files["img0"], "--box", "0,0,20,20", "--concept", "3", "--beta", "-1",
                       "-u", gateway.url, "--json")
    assert by_index.exit_code == 0, by_index.output
    assert _jsonl(by_index.stdout)[0]["concept"] == "concept 3"
    table = salfctl("intervene", files["img0"], "--box", "0,0,20,20", "--concept", "concept 3", "--beta", "-1",
                    "-u", gateway.url)
    assert table.exit_code == 0, table.output
    assert "delta" in table.stdout and "edited region" in table.stdout


def test_rules_and_info(gateway):
    r = salfctl("rules", "--class", "class_1", "-u", gateway.url, "--json")
    assert r.exit_code == 0, r.output
    (rule,) = _jsonl(r.stdout)
    assert rule["class"] == "class_1" and all(t["weight"] != 0 for t in rule["terms"])
    r = salfctl("info", "-u", gateway.url, "--json")
    (info,) = _jsonl(r.stdout)
    assert info["backend"] == gateway.backend and info["grid"] == [7, 7] and len(info["concepts"]) == 6
    assert "class_0" in salfctl("rules", "-u", gateway.url).stdout


def test_request_errors_exit_1_with_the_reason(gateway, files):
    r = salfctl("predict", files["img0"], files["bad"], "-u", gateway.url, "--json")
    assert r.exit_code == 1
    ok, bad = _jsonl(r.stdout)
    assert "classes" in ok and bad["error"]["code"] == "INVALID_ARGUMENT"
    assert f"{files['bad']}: INVALID_ARGUMENT: image" in r.stderr and "could not be decoded" in r.stderr
    r = salfctl("intervene", files["img0"], "--roi", files["mask"], "--concept", "purple", "--beta", "1", "-u", gateway.url)
    assert r.exit_code == 1 and "unknown concept 'purple'" in r.stderr
    r = salfctl("explain", files["img0"], "--top-k", "99", "-u", gateway.url)
    assert r.exit_code == 1 and "top_k 99 is out of range" in r.stderr


# ------------------------------------------------------------------ no URL: in-process gateway

def test_without_url_runs_against_a_local_repository(exported_repo, files, tmp_path):
    r = salfctl("explain", files["img0"], "--roi", files["mask"], "-m", exported_repo, "--out", tmp_path, "--json")
    assert r.exit_code == 0, r.output
    (row,) = _jsonl(r.stdout)
    assert Path(row["figure"]).is_file()
    r = salfctl("info", "-m", tmp_path / "nothing-here")
    assert r.exit_code == 3 and "salf_model.json does not exist" in r.stderr


# ------------------------------------------------------------------ fail fast, auth, TLS, Triton down

def test_unreachable_gateway_fails_fast(files):
    start = time.monotonic()
    p = subprocess.run([*SALFCTL, "predict", str(files["img0"]), "-u", f"127.0.0.1:{free_port()}", "--timeout", "20"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 3
    assert "cannot reach the gateway at 127.0.0.1:" in p.stderr and "UNAVAILABLE" in p.stderr
    assert time.monotonic() - start < 15  # connection refused is reported at once, not after --timeout


def test_backend_not_ready_fails_fast(gateway_on_dead_triton, files):
    r = salfctl("predict", files["img0"], "-u", gateway_on_dead_triton.url)
    assert r.exit_code == 3 and "its triton backend" in r.stderr and "is not ready" in r.stderr


def test_token(token_gateway, files):
    r = salfctl("info", "-u", token_gateway.url)
    assert r.exit_code == 3 and "UNAUTHENTICATED" in r.stderr
    r = salfctl("predict", files["img0"], "-u", token_gateway.url, "--token", TOKEN, "--json")
    assert r.exit_code == 0, r.output


def test_tls(tls_gateway, files):
    url = f"localhost:{tls_gateway.server.port}"
    r = salfctl("predict", files["img0"], "-u", url, "--ca-cert", tls_gateway.cert, "--json")
    assert r.exit_code == 0, r.output
    assert len(_jsonl(r.stdout)[0]["classes"]) == 3


# ------------------------------------------------------------------ salfctl serve as a process

def test_salfctl_serve_process(exported_repo, files, tmp_path):
    serve = start_salfctl_serve(exported_repo, tmp_path / "serve.log")
    try:
        p = subprocess.run([*SALFCTL, "predict", str(files["img0"]), str(files["img1"]), "-u", serve.url, "--json"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert len(_jsonl(p.stdout)) == 2
        import urllib.request

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{serve.metrics_port}/metrics", timeout=5).read().decode()
        # salfctl predict sends its images on one Stream call (docs/DESIGN.md "Streaming"): one stream, two items
        assert 'salf_gateway_requests_total{code="OK",method="Stream.Predict"} 2.0' in metrics
        assert 'salf_gateway_requests_total{code="OK",method="Stream"} 1.0' in metrics
    finally:
        code = serve.stop(grace=10.0)
    assert code == 0, serve.log_path.read_text()
    assert "gateway stopped" in serve.log_path.read_text()


def test_salfctl_serve_rejects_a_missing_repository(tmp_path):
    p = subprocess.run([*SALFCTL, "serve", "--model-repository", str(tmp_path), "--port", "0", "--metrics-port", "-1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "salf_model.json does not exist" in p.stderr


def test_explain_region_command_with_points(gateway, files, client):
    r = salfctl("explain-region", files["img0"], files["img1"], "--point", "40,30", "--point", "100,70",
                "--radius", "6", "-u", gateway.url, "--json", "--top-k", "6")
    assert r.exit_code == 0, r.output
    rows = _jsonl(r.stdout)
    assert len(rows) == 2
    direct = client.explain_region(client.region(points=[(40, 30), (100, 70)], radius=6),
                                   image=files["img1"].read_bytes(), top_k=6)
    assert rows[1]["area"] == direct.region_area
    np.testing.assert_allclose([a["activation"] for a in rows[1]["concepts"]],
                               [a.activation for a in direct.concepts], rtol=1e-5)
    r = salfctl("explain-region", files["img0"], "--box", "1,2,3", "-u", gateway.url)
    assert r.exit_code == 2 and "--box must be x0,y0,x1,y1" in r.output


def test_explain_a_video_frame_by_frame_with_a_tracked_concept(embedded_gateway, tmp_path):
    """A 12-frame clip made here: one JSON record per explained frame with its grid maps, and an annotated
    video of the tracked concept with one frame per explained frame."""
    from fractions import Fraction

    import av

    from clients.video import write_video

    clip = tmp_path / "clip.mp4"
    write_video(clip, [np.asarray(Image.fromarray(sample_image(k)).resize((112, 84))) for k in range(12)],
                Fraction(12))
    out = tmp_path / "out"
    r = salfctl("explain", clip, "--every", "2", "--concept", "concept 1", "--out", out, "--json",
                "-u", embedded_gateway.url)
    assert r.exit_code == 0, r.output
    rows = _jsonl(r.stdout)
    assert [row["frame"] for row in rows] == [0, 2, 4, 6, 8, 10]
    assert rows[1]["time_s"] == pytest.approx(2 / 12, abs=1e-3)
    assert all(row["requested"][0]["name"] == "concept 1" and len(row["requested"][0]["grid_map"]) == 49
               for row in rows)
    annotated = out / "clip.concept_1.mp4"
    with av.open(str(annotated)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape[1] == 256
    again = salfctl("explain", clip, "--concept", "concept 1", "--out", out, "-u", embedded_gateway.url)
    assert again.exit_code == 2 and "already exist" in again.stderr
    r = salfctl("explain", clip, "--max-frames", "3", "-u", embedded_gateway.url, "--json")
    assert [row["frame"] for row in _jsonl(r.stdout)] == [0, 1, 2]
