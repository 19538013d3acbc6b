"""The gateway end to end through the generated stubs, on both backends (embedded onnxruntime and a
real Triton): model info and rules, Predict and Explain against independent references (onnxruntime
run by the test, a numpy head from head.safetensors, torch's F.interpolate), health, reflection,
metrics and concurrency. Explain Anything and Intervene: test_gateway_regions.py; bad input:
test_gateway_bad_input.py; the references: tests/fixtures/gateway.py.
"""
from __future__ import annotations

import io
import time
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.gateway import IMAGE, PNG, TOL, encode, sample_image, upsample_torch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


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
