"""Explain Anything (ExplainRegion: mask, box, points) and Intervene end to end on both backends, each
against an independent reference: the naive upsample-multiply-sum, and a numpy head on edited maps
(average pooling, and softmax pooling on a model of its own).
"""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.gateway import IMAGE, PNG, TOL, encode, numpy_head, upsample_torch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


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
    # ids are content-addressed (serving/ids.py): the resent image is the same explanation
    assert by_id.explanation_id == explained.explanation_id == by_image.explanation_id
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
