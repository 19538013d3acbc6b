"""The paper's ImageNet configuration end to end, with random weights: `salfctl train random` (ResNet-50
layer4, 224 px, 7x7 grid, M = 4741 concepts, 30 non-zero weights per class), `salfctl export` in both
flavours, the onnxruntime flavour's graph run with onnxruntime directly, the python flavour served by
the embedded gateway and through a real Triton.

At 20 classes instead of 1000 to keep `make test` short: the backbone and the 4741 concept maps, which
are the cost, are the paper's; `make bench-serving` runs all 1000 (tests/bench/overhead.py).

A third export has float16 concept maps (`--maps-dtype float16`): served through Triton, it must give
the float32 model's predictions and explanations within float16's rounding."""
from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from tests.fixtures.gateway import ROOT, SALFCTL, encode, sample_image, start_gateway

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
CLASSES = 20


def _salfctl(*args: str) -> str:
    proc = subprocess.run([*SALFCTL, *args], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def paper_size(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_size")
    out = _salfctl("train", "random", "--config", "imagenet-rn50", "--classes", str(CLASSES),
                   "--out", str(root / "bundle"))
    assert "resnet50 layer4 224 px, 4741 concepts, 20 classes, grid 7x7" in out, out
    _salfctl("export", str(root / "bundle"), "--out", str(root / "repo-python"), "--flavour", "python")
    _salfctl("export", str(root / "bundle"), "--out", str(root / "repo-onnxruntime"), "--flavour", "onnxruntime",
             "--no-parity")
    out = _salfctl("export", str(root / "bundle"), "--out", str(root / "repo-fp16"), "--flavour", "python",
                   "--maps-dtype", "float16")
    assert "random/salf_cbm/concept_maps" in out, out  # parity ran, with float16's bound
    return root


def _images(n: int = 2) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(sample_image(k, (300, 400))).resize((224, 224), Image.BILINEAR))
                     for k in range(n)])


def test_bundle_has_the_papers_shape(paper_size):
    from training.bundle import load_bundle

    model, meta = load_bundle(paper_size / "bundle")
    assert (len(meta.concepts), len(meta.classes), tuple(meta.grid), meta.backbone.arch) == (4741, CLASSES, (7, 7),
                                                                                             "resnet50")
    nonzero = (model.head.linear.weight != 0).sum(dim=1)
    assert nonzero.tolist() == [30] * CLASSES


def test_onnxruntime_flavour_config_and_graph(paper_size):
    import onnxruntime as ort
    import torch

    from training.bundle import load_bundle
    from training.model import normalize_uint8

    repo = paper_size / "repo-onnxruntime"
    config = (repo / "salf_cbm" / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in config
    dims = re.findall(r"dims: \[ ([\d, ]+) \]", config)
    assert dims[:4] == ["224, 224, 3", "4741, 7, 7", "4741", str(CLASSES)], dims  # then the warm-up input
    session = ort.InferenceSession(str(repo / "salf_cbm" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    images = _images()
    maps, scores, logits = session.run(["concept_maps", "concept_scores", "logits"], {"image": images})
    assert maps.shape == (2, 4741, 7, 7) and logits.shape == (2, CLASSES)
    model, meta = load_bundle(paper_size / "bundle")
    with torch.no_grad():
        x = normalize_uint8(torch.from_numpy(images), meta.backbone.mean, meta.backbone.std)
        t_maps, t_scores, t_logits = model(x)
    assert np.abs(logits - t_logits.numpy()).max() <= 1e-3 * max(1.0, float(np.abs(t_logits.numpy()).max()))
    assert np.abs(scores - t_scores.numpy()).max() <= 1e-3 * max(1.0, float(np.abs(t_scores.numpy()).max()))


def test_python_flavour_served_embedded_and_through_triton(paper_size):
    from clients.client import SalfClient
    from export.triton_server import TritonServer

    repo = paper_size / "repo-python"
    image = encode(sample_image(3, (300, 400)), "JPEG")
    triton = TritonServer(repo, log_path=paper_size / "tritonserver.log")
    triton.start()
    embedded = start_gateway(repo, metrics_port=None)
    via_triton = start_gateway(repo, triton_url=triton.grpc_url, metrics_port=None)
    try:
        answers = {}
        for name, gw in (("embedded", embedded), ("triton", via_triton)):
            with SalfClient.connect(gw.url, timeout=60) as c:
                assert (len(c.info.concepts), len(c.info.classes)) == (4741, CLASSES)
                assert c.info.backend == name
                p = c.predict(image, top_k=5)
                e = c.explain(image, top_k=5, heatmaps="float16")
                region = c.region(box=[100, 50, 300, 250])
                r = c.explain_region(region, explanation_id=e.explanation_id, top_k=5)
                i = c.intervene([c.edit(region, 2.0, e.concepts[0].name)], explanation_id=e.explanation_id)
                assert len(e.concepts) == 5 and len(e.concepts[0].grid_map) == 49
                assert e.concepts[0].heatmap.height == 300 and e.concepts[0].heatmap.width == 400
                answers[name] = (p, e, r, i)
        (pe, ee, re_, ie), (pt, et, rt, it) = answers["embedded"], answers["triton"]
        assert [c.name for c in pe.classes] == [c.name for c in pt.classes]
        assert [c.logit for c in pe.classes] == pytest.approx([c.logit for c in pt.classes], abs=1e-3)
        assert [c.name for c in ee.concepts] == [c.name for c in et.concepts]
        assert [a.name for a in re_.concepts] == [a.name for a in rt.concepts]
        assert list(ie.logits_after) == pytest.approx(list(it.logits_after), abs=1e-3)
        assert list(ie.logits_after) != pytest.approx(list(ie.logits_before), abs=1e-6)
    finally:
        via_triton.server.stop(grace=0.5)
        embedded.server.stop(grace=0.5)
        triton.stop()


def test_float16_maps_through_triton_match_float32(paper_size):
    """Predictions and contributions come from float32 inside the graph: equal. Maps travel as float16:
    region activations and the edited logits within float16's rounding of the float32 model's."""
    from clients.client import SalfClient
    from export.triton_server import TritonServer
    from salf.contract.repository import load_model_spec

    fp16, fp32 = paper_size / "repo-fp16", paper_size / "repo-python"
    assert load_model_spec(fp16).maps_dtype == "float16" and load_model_spec(fp32).maps_dtype == "float32"
    for name, kind in (("salf_cbm", "output"), ("salf_head", "input")):
        config = (fp16 / name / "config.pbtxt").read_text()
        assert re.search(kind + r' \{\s*name: "concept_maps"\s*data_type: TYPE_FP16', config), config
    image = encode(sample_image(5, (300, 400)), "JPEG")
    triton = TritonServer(fp16, log_path=paper_size / "tritonserver-fp16.log")
    triton.start()
    half = start_gateway(fp16, triton_url=triton.grpc_url, metrics_port=None)
    full = start_gateway(fp32, metrics_port=None)
    try:
        got = {}
        for name, gw in (("float16", half), ("float32", full)):
            with SalfClient.connect(gw.url, timeout=60) as c:
                assert c.info.maps_dtype == name
                e = c.explain(image, top_k=5)
                region = c.region(box=[100, 50, 300, 250])
                r = c.explain_region(region, explanation_id=e.explanation_id, top_k=20)
                i = c.intervene([c.edit(region, 2.0, e.concepts[0].name)], explanation_id=e.explanation_id)
                got[name] = (e, {a.name: a.activation for a in r.concepts}, i)
        (e16, r16, i16), (e32, r32, i32) = got["float16"], got["float32"]
        assert [(c.name, c.contribution) for c in e16.concepts] == \
            [(c.name, pytest.approx(c.contribution, rel=1e-5, abs=1e-6)) for c in e32.concepts]
        scale = max(abs(v) for v in r32.values())
        common = set(r16) & set(r32)
        assert len(common) >= 15  # the top 20 may trade places only among near-ties
        for k in common:  # activation = sum(w * map): float16's half-ulp of each map value, at most
            assert abs(r16[k] - r32[k]) <= 2 ** -11 * scale * 4, (k, r16[k], r32[k])
        deltas16 = np.asarray(i16.logit_deltas)
        deltas32 = np.asarray(i32.logit_deltas)
        assert np.abs(deltas16 - deltas32).max() <= 2 ** -8 * max(1e-3, np.abs(deltas32).max()), (deltas16, deltas32)
        assert i16.predicted_after.name == i32.predicted_after.name
    finally:
        full.server.stop(grace=0.5)
        half.server.stop(grace=0.5)
        triton.stop()
