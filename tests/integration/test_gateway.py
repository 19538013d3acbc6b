"""The gateway end to end through the generated stubs, on both backends (embedded onnxruntime and a
real Triton): every RPC, faithfulness of Explain Anything and Intervene against independent
references (onnxruntime run by the test, a numpy head from head.safetensors, torch's F.interpolate),
every bad input, health, reflection and metrics.
"""
from __future__ import annotations

import io
import time
import json
import urllib.request

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.fixtures.gateway import encode, sample_image

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def pb():
    from salf.v1 import gateway_pb2

    return gateway_pb2


@pytest.fixture(scope="module")
def head(exported_repo):
    from safetensors.numpy import load_file

    t = load_file(str(exported_repo / "head.safetensors"))
    meta = json.loads((exported_repo / "salf_model.json").read_text())
    return {"W": t["head.weight"].astype(np.float64), "b": t["head.bias"].astype(np.float64),
            "mean": t["concept_mean"].astype(np.float64), "std": t["concept_std"].astype(np.float64), "meta": meta}


def numpy_head(maps: np.ndarray, head) -> tuple[np.ndarray, np.ndarray]:
    """Independent head: pool (avg or softmax), standardise, linear. maps [M, Gh, Gw] -> scores [M], logits [L]."""
    flat = maps.reshape(maps.shape[0], -1).astype(np.float64)
    if head["meta"]["pooling"] == "avg":
        pooled = flat.mean(axis=1)
    else:
        e = np.exp(flat - flat.max(axis=1, keepdims=True))
        pooled = (flat * e / e.sum(axis=1, keepdims=True)).sum(axis=1)
    scores = (pooled - head["mean"]) / head["std"]
    return scores, head["W"] @ scores + head["b"]


@pytest.fixture(scope="module")
def reference(exported_repo):
    """The test's own forward pass: PIL bilinear resize + onnxruntime on salf_cbm/1/model.onnx."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(exported_repo / "salf_cbm/1/model.onnx"), providers=["CPUExecutionProvider"])
    h, w = json.loads((exported_repo / "salf_model.json").read_text())["input_size"]

    def run(image: np.ndarray):
        x = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))[None]
        maps, scores, logits = sess.run(None, {"image": x})
        return maps[0], scores[0], logits[0]

    return run


def upsample_torch(maps: np.ndarray, size) -> np.ndarray:
    return F.interpolate(torch.from_numpy(maps.astype(np.float64))[None], size=size, mode="bilinear",
                         align_corners=False)[0].numpy()


IMAGE = sample_image(0)
PNG = encode(IMAGE)


# ------------------------------------------------------------------ model info, rules

def test_model_info(stub, pb, gateway, head):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    meta = head["meta"]
    assert list(info.concepts) == meta["concepts"] and list(info.classes) == meta["classes"]
    assert [info.grid_height, info.grid_width] == meta["grid"]
    assert [info.input_height, info.input_width] == meta["input_size"]
    assert info.backend == gateway.backend and info.backend_ready
    assert info.pooling == meta["pooling"] and info.bundle_sha256 == meta["bundle"]["weights_sha256"]


def test_class_rules_are_the_non_zero_weights_sorted(stub, pb, head):
    rules = stub.GetClassRules(pb.GetClassRulesRequest(), timeout=10).rules
    assert len(rules) == head["W"].shape[0]
    for rule in rules:
        row = head["W"][rule.class_index]
        nz = np.flatnonzero(row)
        assert sorted(t.concept_index for t in rule.terms) == sorted(nz.tolist())
        mags = [abs(t.weight) for t in rule.terms]
        assert mags == sorted(mags, reverse=True)
        for t in rule.terms:
            assert t.weight == pytest.approx(row[t.concept_index], rel=1e-6)
            assert t.concept_name == head["meta"]["concepts"][t.concept_index]
        assert rule.bias == pytest.approx(head["b"][rule.class_index], rel=1e-6)
    one = stub.GetClassRules(pb.GetClassRulesRequest(class_name="class_2"), timeout=10).rules
    assert [r.class_name for r in one] == ["class_2"]


# ------------------------------------------------------------------ Predict, Explain

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_predict_matches_independent_forward_pass(stub, pb, reference, fmt):
    data = encode(IMAGE, fmt)
    _, _, logits = reference(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    r = stub.Predict(pb.PredictRequest(image=data, top_k=3), timeout=10)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert [c.index for c in r.classes] == list(np.argsort(-probs)[:3])
    np.testing.assert_allclose([c.probability for c in r.classes], np.sort(probs)[::-1][:3], **TOL)
    np.testing.assert_allclose([c.logit for c in r.classes], logits[[c.index for c in r.classes]], **TOL)
    assert (r.image_height, r.image_width) == IMAGE.shape[:2]


def test_explain_contributions_and_heatmaps(stub, pb, reference, head):
    maps, scores, logits = reference(IMAGE)
    r = stub.Explain(pb.ExplainRequest(image=PNG, top_k=6, heatmaps=pb.HEATMAP_FORMAT_BOTH), timeout=10)
    target = int(np.argmax(logits))
    assert r.target.index == target and r.explanation_id
    s = head["W"][target] * scores
    nz = np.flatnonzero(head["W"][target])
    assert [c.index for c in r.concepts] == sorted(nz.tolist(), key=lambda m: -abs(s[m]))
    up = upsample_torch(maps, IMAGE.shape[:2])
    for c in r.concepts:
        assert c.contribution == pytest.approx(s[c.index], rel=1e-4, abs=1e-5)
        assert c.score == pytest.approx(scores[c.index], rel=1e-4, abs=1e-5)
        hm = c.heatmap
        assert (hm.height, hm.width) == IMAGE.shape[:2]
        values = np.frombuffer(hm.float16, dtype="<f2").reshape(hm.height, hm.width).astype(np.float64)
        np.testing.assert_allclose(values, up[c.index], rtol=2e-3, atol=2e-3 * np.abs(up[c.index]).max())
        png = np.asarray(Image.open(io.BytesIO(hm.png)))
        assert png.shape == IMAGE.shape[:2] and png.dtype == np.uint8
        assert png.min() == 0 and png.max() == 255
        assert hm.min == pytest.approx(up[c.index].min(), abs=1e-4) and hm.max == pytest.approx(up[c.index].max(), abs=1e-4)


def test_explain_a_requested_class(stub, pb, reference, head):
    _, scores, logits = reference(IMAGE)
    other = int(np.argsort(logits)[0])  # the least likely class: certainly not the predicted one
    for req in (pb.ExplainRequest(image=PNG, class_index=other), pb.ExplainRequest(image=PNG, class_name=f"class_{other}")):
        r = stub.Explain(req, timeout=10)
        assert r.target.index == other
        for c in r.concepts:
            assert c.weight == pytest.approx(head["W"][other, c.index], rel=1e-6)
            assert not c.heatmap.float16 and c.heatmap.png  # default format: PNG only


# ------------------------------------------------------------------ Explain Anything

def _mask():
    mask = np.zeros(IMAGE.shape[:2], dtype=bool)
    mask[10:50, 20:90] = True
    mask[60:70, 5:15] = True
    return mask


def _naive_activations(maps, mask):
    return (upsample_torch(maps, mask.shape) * mask[None]).sum(axis=(1, 2))


def test_explain_region_equals_naive_upsample_multiply_sum(stub, pb, reference):
    maps, _, _ = reference(IMAGE)
    mask = _mask()
    naive = _naive_activations(maps, mask)
    explained = stub.Explain(pb.ExplainRequest(image=PNG, heatmaps=pb.HEATMAP_FORMAT_NONE), timeout=10)
    region = pb.Region(mask_png=encode((mask * 255).astype(np.uint8)))
    by_id = stub.ExplainRegion(pb.ExplainRegionRequest(explanation_id=explained.explanation_id, region=region,
                                                       top_k=6), timeout=10)
    by_image = stub.ExplainRegion(pb.ExplainRegionRequest(image=PNG, region=region, top_k=6), timeout=10)
    assert by_id.explanation_id == explained.explanation_id and by_image.explanation_id != explained.explanation_id
    for r in (by_id, by_image):
        assert r.region_area == mask.sum()
        assert [a.index for a in r.concepts] == list(np.argsort(-naive, kind="stable"))
        np.testing.assert_allclose([a.activation for a in r.concepts], naive[[a.index for a in r.concepts]],
                                   rtol=1e-4, atol=1e-4 * np.abs(naive).max())
        np.testing.assert_allclose([a.mean_activation for a in r.concepts],
                                   naive[[a.index for a in r.concepts]] / mask.sum(), rtol=1e-4, atol=1e-6)


def test_explain_region_box_and_points(stub, pb, reference):
    maps, _, _ = reference(IMAGE)
    box = pb.Region(box=pb.Box(x0=20, y0=10, x1=90, y1=50))
    box_mask = np.zeros(IMAGE.shape[:2], bool)
    box_mask[10:50, 20:90] = True
    r = stub.ExplainRegion(pb.ExplainRegionRequest(image=PNG, region=box, top_k=3), timeout=10)
    naive = _naive_activations(maps, box_mask)
    assert r.region_area == box_mask.sum()
    np.testing.assert_allclose([a.activation for a in r.concepts], np.sort(naive)[::-1][:3], rtol=1e-4, atol=1e-3)
    yy, xx = np.mgrid[:IMAGE.shape[0], :IMAGE.shape[1]] + 0.5
    pts_mask = ((yy - 30) ** 2 + (xx - 40) ** 2 <= 6 ** 2) | ((yy - 70) ** 2 + (xx - 100) ** 2 <= 6 ** 2)
    pts = pb.Region(points=pb.Points(points=[pb.Point(x=40, y=30), pb.Point(x=100, y=70)], radius=6))
    r = stub.ExplainRegion(pb.ExplainRegionRequest(image=PNG, region=pts, top_k=6), timeout=10)
    assert r.region_area == pts_mask.sum()
    naive = _naive_activations(maps, pts_mask)
    np.testing.assert_allclose([a.activation for a in r.concepts], naive[[a.index for a in r.concepts]],
                               rtol=1e-4, atol=1e-4 * np.abs(naive).max())


# ------------------------------------------------------------------ Intervene

def _block_coverage(mask, grid):
    """Independent I_grid for an image whose size the grid divides: the mean of each pixel block."""
    gh, gw = grid
    h, w = mask.shape
    return mask.reshape(gh, h // gh, gw, w // gw).mean(axis=(1, 3))


def test_intervene_is_faithful_to_the_head(stub, pb, reference, head):
    maps, _, _ = reference(IMAGE)
    grid = tuple(head["meta"]["grid"])
    mask = _mask()
    explained = stub.Explain(pb.ExplainRequest(image=PNG, heatmaps=pb.HEATMAP_FORMAT_NONE), timeout=10)
    region = pb.Region(mask_png=encode((mask * 255).astype(np.uint8)))
    box = pb.Region(box=pb.Box(x0=0, y0=0, x1=56, y1=84))
    box_mask = np.zeros(mask.shape, bool)
    box_mask[:84, :56] = True
    edits = [pb.ConceptEdit(concept_name="concept 1", region=region, beta=2.5),
             pb.ConceptEdit(concept_index=3, region=box, beta=-1.25)]
    r = stub.Intervene(pb.InterveneRequest(explanation_id=explained.explanation_id, edits=edits, top_k=6), timeout=10)
    edited = maps.astype(np.float64).copy()
    edited[1] += 2.5 * _block_coverage(mask, grid)
    edited[3] += -1.25 * _block_coverage(box_mask, grid)
    _, expected_after = numpy_head(edited, head)
    _, expected_before = numpy_head(maps, head)
    np.testing.assert_allclose(r.logits_after, expected_after, **TOL)
    np.testing.assert_allclose(r.logits_before, expected_before, **TOL)
    np.testing.assert_allclose(r.logit_deltas, np.asarray(r.logits_after) - np.asarray(r.logits_before), atol=1e-6)
    assert r.predicted_after.index == int(np.argmax(expected_after))
    assert r.predicted_before.index == int(np.argmax(expected_before))
    # New top concepts in the union of the regions: Explain Anything on the edited maps.
    naive = _naive_activations(edited, mask | box_mask)
    np.testing.assert_allclose([a.activation for a in r.region_concepts], naive[[a.index for a in r.region_concepts]],
                               rtol=1e-4, atol=1e-4 * np.abs(naive).max())
    assert [a.index for a in r.region_concepts] == list(np.argsort(-naive, kind="stable"))


def test_positive_beta_raises_the_class_logit_by_the_predicted_amount(stub, pb, head):
    if head["meta"]["pooling"] != "avg":
        pytest.fail("the exported test model must use average pooling for this closed form")
    l, m = np.unravel_index(np.argmax(head["W"]), head["W"].shape)  # largest positive weight
    assert head["W"][l, m] > 0
    mask = _mask()
    beta = 3.0
    r = stub.Intervene(pb.InterveneRequest(image=PNG, top_k=2, edits=[
        pb.ConceptEdit(concept_index=int(m), region=pb.Region(mask_png=encode((mask * 255).astype(np.uint8))),
                       beta=beta)]), timeout=10)
    i_grid = _block_coverage(mask, tuple(head["meta"]["grid"]))
    predicted = head["W"][:, m] * beta * i_grid.mean() / head["std"][m]
    assert r.logit_deltas[l] > 0
    np.testing.assert_allclose(r.logit_deltas, predicted, rtol=1e-4, atol=1e-5)
    assert len(r.before) == 2 and len(r.after) == 2


# ------------------------------------------------------------------ bad inputs

def _bad_cases(pb):
    mask_png = encode(np.full((84, 112), 255, np.uint8))
    good = pb.Region(mask_png=mask_png)
    wrong_size = pb.Region(mask_png=encode(np.full((64, 64), 255, np.uint8)))
    empty_mask = pb.Region(mask_png=encode(np.zeros((84, 112), np.uint8)))
    outside_box = pb.Region(box=pb.Box(x0=200, y0=200, x1=300, y1=300))
    edit = lambda **kw: pb.ConceptEdit(**{"concept_index": 0, "region": good, "beta": 1.0, **kw})
    return {
        "undecodable image": ("Predict", pb.PredictRequest(image=b"\x89PNG garbage"), "could not be decoded as JPEG, PNG or WebP"),
        "empty image": ("Explain", pb.ExplainRequest(image=b""), "image is empty"),
        "top_k too large": ("Predict", pb.PredictRequest(image=PNG, top_k=4), "top_k 4 is out of range"),
        "top_k negative": ("Explain", pb.ExplainRequest(image=PNG, top_k=-1), "top_k -1 is out of range"),
        "unknown class": ("Explain", pb.ExplainRequest(image=PNG, class_name="zebra"), "unknown class 'zebra'"),
        "class index": ("Explain", pb.ExplainRequest(image=PNG, class_index=3), "class index 3 is out of range 0..2"),
        "wrong mask size": ("ExplainRegion", pb.ExplainRegionRequest(image=PNG, region=wrong_size),
                            "mask is 64x64 (width x height) but the image is 112x84"),
        "empty mask": ("ExplainRegion", pb.ExplainRegionRequest(image=PNG, region=empty_mask), "region is empty"),
        "empty box": ("ExplainRegion", pb.ExplainRegionRequest(image=PNG, region=outside_box), "region is empty"),
        "no region": ("ExplainRegion", pb.ExplainRegionRequest(image=PNG), "region is missing"),
        "undecodable mask": ("ExplainRegion", pb.ExplainRegionRequest(image=PNG, region=pb.Region(mask_png=b"x")),
                             "mask (1 bytes) could not be decoded"),
        "unknown concept": ("Intervene", pb.InterveneRequest(image=PNG, edits=[pb.ConceptEdit(
            concept_name="purple", region=good, beta=1.0)]), "unknown concept 'purple'"),
        "concept index": ("Intervene", pb.InterveneRequest(image=PNG, edits=[edit(concept_index=6)]),
                          "concept index 6 is out of range 0..5"),
        "nan beta": ("Intervene", pb.InterveneRequest(image=PNG, edits=[edit(beta=float("nan"))]),
                     "edit 0: beta must be a finite number, got nan"),
        "inf beta": ("Intervene", pb.InterveneRequest(image=PNG, edits=[edit(), edit(beta=float("-inf"))]),
                     "edit 1: beta must be a finite number, got -inf"),
        "overflowing beta": ("Intervene", pb.InterveneRequest(image=PNG, edits=[edit(beta=3e38)]),
                             "beta too large"),
        "no edits": ("Intervene", pb.InterveneRequest(image=PNG), "at least one edit"),
        "edit without concept": ("Intervene", pb.InterveneRequest(image=PNG, edits=[pb.ConceptEdit(region=good, beta=1)]),
                                 "edit 0: edit has no concept"),
        "edit with empty region": ("Intervene", pb.InterveneRequest(image=PNG, edits=[edit(region=empty_mask)]),
                                   "edit 0: region is empty"),
        "no image": ("Intervene", pb.InterveneRequest(edits=[edit()]), "send an image or an explanation_id"),
    }


def _bad_names():
    from salf.v1 import gateway_pb2

    return sorted(_bad_cases(gateway_pb2))


BAD = _bad_names()


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_invalid_argument_with_a_precise_message(stub, pb, case):
    method, request, message = _bad_cases(pb)[case]
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert message in info.value.details()


def test_unknown_explanation_id_is_not_found_and_resending_the_image_works(stub, pb):
    region = pb.Region(box=pb.Box(x0=0, y0=0, x1=10, y1=10))
    with pytest.raises(grpc.RpcError) as info:
        stub.ExplainRegion(pb.ExplainRegionRequest(explanation_id="expired", region=region), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "resend the image" in info.value.details()
    r = stub.ExplainRegion(pb.ExplainRegionRequest(explanation_id="expired", image=PNG, region=region), timeout=10)
    assert r.explanation_id and r.explanation_id != "expired"


# ------------------------------------------------------------------ health, reflection, metrics

def test_health_and_reflection(gateway):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(gateway.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "salf.v1.Gateway"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        assert "salf.v1.Gateway" in db.get_services()
        service = db.FindFileContainingSymbol("salf.v1.Gateway").service[0]
        assert {m.name for m in service.method} == {"Predict", "Explain", "ExplainRegion", "Intervene",
                                                     "GetModelInfo", "GetClassRules", "Stream"}


def test_metrics_endpoint(stub, pb, gateway):
    stub.Predict(pb.PredictRequest(image=PNG), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Predict(pb.PredictRequest(image=b"nope"), timeout=10)
    explained = stub.Explain(pb.ExplainRequest(image=PNG, heatmaps=pb.HEATMAP_FORMAT_NONE), timeout=10)
    stub.ExplainRegion(pb.ExplainRegionRequest(explanation_id=explained.explanation_id,
                                               region=pb.Region(box=pb.Box(x0=0, y0=0, x1=5, y1=5))), timeout=10)
    text = urllib.request.urlopen(gateway.metrics_url, timeout=5).read().decode()
    for needle in ('salf_gateway_requests_total{code="OK",method="Predict"}',
                   'salf_gateway_requests_total{code="INVALID_ARGUMENT",method="Predict"}',
                   'salf_gateway_request_seconds_bucket{code="OK",le="0.5",method="Explain"}',
                   f'salf_gateway_backend_seconds_count{{backend="{gateway.backend}",model="salf_cbm"}}',
                   'salf_gateway_in_flight_requests{method="Predict"} 0.0',
                   "salf_gateway_cache_hits_total", "salf_gateway_cache_misses_total",
                   f'salf_gateway_model_info{{backend="{gateway.backend}"'):
        assert needle in text, needle
    hits = [l for l in text.splitlines() if l.startswith("salf_gateway_cache_hits_total")]
    assert float(hits[0].split()[-1]) >= 1


# ------------------------------------------------------------------ concurrency

def test_concurrent_requests_agree_with_serial_ones(stub, pb):
    """Many clients at once (thread pool of the gateway, shared cache, shared backend client)."""
    from concurrent.futures import ThreadPoolExecutor

    images = [encode(sample_image(seed)) for seed in range(6)]
    region = pb.Region(box=pb.Box(x0=0, y0=0, x1=40, y1=40))

    def work(data):
        e = stub.Explain(pb.ExplainRequest(image=data, heatmaps=pb.HEATMAP_FORMAT_NONE), timeout=30)
        i = stub.Intervene(pb.InterveneRequest(explanation_id=e.explanation_id, edits=[
            pb.ConceptEdit(concept_index=2, region=region, beta=1.5)]), timeout=30)
        return e.target.index, list(i.logit_deltas)

    serial = [work(d) for d in images]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(work, images * 3))
    for n, (target, deltas) in enumerate(concurrent):
        assert target == serial[n % 6][0]
        np.testing.assert_allclose(deltas, serial[n % 6][1], rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
def test_calls_without_a_client_deadline_work(stub, pb, monkeypatch):
    """No client deadline means none: before, gRPC's 'infinite' remaining time (~9e18 s) reached the
    backends, killing the embedded cancel timer (OverflowError in a thread) and failing every Triton
    call at once with DEADLINE_EXCEEDED."""
    import threading

    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args.exc_value))
    region = pb.Region(box=pb.Box(x0=0, y0=0, x1=56, y1=42))
    assert len(stub.Predict(pb.PredictRequest(image=PNG)).classes) == 3  # no timeout= on purpose
    explained = stub.Explain(pb.ExplainRequest(image=PNG, heatmaps=pb.HEATMAP_FORMAT_NONE))
    r = stub.Intervene(pb.InterveneRequest(image=PNG, edits=[pb.ConceptEdit(concept_index=1, region=region, beta=1.0)]))
    assert explained.explanation_id and len(r.logits_after) == 3
    time.sleep(0.2)  # a timer thread that overflowed would have reported by now
    assert crashed == []


@pytest.mark.timeout(300)
def test_intervene_and_contributions_on_a_softmax_pooled_model(tmp_path_factory, pb):
    """The gateway never pools itself: with softmax pooling the head graph pools the edited maps, so
    Intervene equals an independent softmax-pooled head and Explain's scores are the model's c*."""
    from safetensors.numpy import load_file

    from export.repository import export_repository
    from tests.fixtures.bundles import make_random_bundle
    from tests.fixtures.gateway import start_gateway

    root = tmp_path_factory.mktemp("softmax")
    repo = root / "model_repository"
    export_repository(make_random_bundle(root / "bundle", pooling="softmax", seed=5), repo, flavour="python",
                      parity=True)
    t = load_file(str(repo / "head.safetensors"))
    meta = json.loads((repo / "salf_model.json").read_text())
    assert meta["pooling"] == "softmax"
    hd = {"W": t["head.weight"].astype(np.float64), "b": t["head.bias"].astype(np.float64),
          "mean": t["concept_mean"].astype(np.float64), "std": t["concept_std"].astype(np.float64), "meta": meta}
    import onnxruntime as ort

    sess = ort.InferenceSession(str(repo / "salf_cbm/1/model.onnx"), providers=["CPUExecutionProvider"])
    h, w = meta["input_size"]
    maps, scores, _ = (a[0] for a in sess.run(None, {"image": np.asarray(
        Image.fromarray(IMAGE).resize((w, h), Image.BILINEAR))[None]}))
    gw = start_gateway(repo, metrics_port=None)
    try:
        with grpc.insecure_channel(gw.url) as channel:
            from salf.v1 import gateway_pb2_grpc

            stub = gateway_pb2_grpc.GatewayStub(channel)
            explained = stub.Explain(pb.ExplainRequest(image=PNG, top_k=6, heatmaps=pb.HEATMAP_FORMAT_NONE), timeout=10)
            for c in explained.concepts:
                assert c.score == pytest.approx(scores[c.index], abs=1e-4)
                assert c.contribution == pytest.approx(hd["W"][explained.target.index, c.index] * scores[c.index], abs=1e-4)
            mask = _mask()
            r = stub.Intervene(pb.InterveneRequest(explanation_id=explained.explanation_id, edits=[
                pb.ConceptEdit(concept_index=2, beta=4.0, region=pb.Region(mask_png=encode((mask * 255).astype(np.uint8))))]),
                timeout=10)
    finally:
        gw.server.stop(grace=0.5)
    edited = maps.astype(np.float64).copy()
    edited[2] += 4.0 * _block_coverage(mask, tuple(meta["grid"]))
    np.testing.assert_allclose(r.logits_after, numpy_head(edited, hd)[1], **TOL)
    np.testing.assert_allclose(r.logits_before, numpy_head(maps, hd)[1], **TOL)
    # Softmax pooling is not linear: the closed form of average pooling must not hold here.
    avg = hd["W"][:, 2] * 4.0 * _block_coverage(mask, tuple(meta["grid"])).mean() / hd["std"][2]
    assert not np.allclose(r.logit_deltas, avg, rtol=1e-3, atol=1e-4)
