"""Predict without concept maps (issue 23, item 4): on both backends Predict asks ``salf_cbm`` for scores
and logits only, answers what Explain's forward answers (parity), receives a fraction of the bytes and
caches nothing; the explorer's gallery scores a folder with it."""
from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tests.cluster import metric_sum
from tests.fixtures.gateway import encode, sample_image

pytestmark = pytest.mark.integration


def _received(gw) -> float:
    """salf_gateway_backend_received_bytes for salf_cbm on this gateway."""
    return metric_sum(gw.metrics_url, "salf_gateway_backend_received_bytes_total", model="salf_cbm")


def test_predict_matches_explain_with_a_fraction_of_the_bytes_and_no_cache_entry(gateway):
    from clients.client import SalfClient

    png = encode(sample_image(31))
    cache = gateway.server.gateway.cache
    with SalfClient.connect(gateway.url) as c:
        m, classes = len(c.info.concepts), len(c.info.classes)
        before, entries = _received(gateway), len(cache)
        p = c.predict(png, top_k=classes, concept_scores=True)
        predict_bytes = _received(gateway) - before
        assert len(cache) == entries, "Predict must not fill the explanation cache"
        assert len(p.concept_scores) == m
        bare = c.predict(png, top_k=classes)
        assert len(bare.concept_scores) == 0 and bare.ByteSize() < p.ByteSize()

        before = _received(gateway)
        e = c.explain(png, top_k=1, heatmaps="none", concepts=list(c.info.concepts))
        explain_bytes = _received(gateway) - before
    assert len(cache) == entries + 1
    # The same forward pass: classes, probabilities and every concept's c* agree.
    assert [x.name for x in p.classes][:len(e.predictions)] == [x.name for x in e.predictions]
    np.testing.assert_allclose([x.probability for x in p.classes][:len(e.predictions)],
                               [x.probability for x in e.predictions], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p.concept_scores, [x.score for x in e.requested], rtol=1e-6, atol=1e-6)
    # Scores and logits float32, nothing else (Triton adds its message framing: a few hundred bytes).
    payload = (m + classes) * 4
    grid = gateway.server.gateway.spec.grid
    maps = m * grid[0] * grid[1] * np.dtype(gateway.server.gateway.spec.maps_dtype).itemsize
    assert payload <= predict_bytes <= payload + 1024, (predict_bytes, payload)
    assert explain_bytes >= payload + maps, (explain_bytes, payload + maps)


def test_triton_answers_only_the_requested_outputs(triton_server, exported_repo):
    """The python-backend model sends the outputs a request names (all when it names none) and refuses
    unknown ones with its own error."""
    from salf.contract.repository import load_model_spec

    spec = load_model_spec(exported_repo)
    h, w = spec.input_size
    images = np.random.default_rng(0).integers(0, 255, (2, h, w, 3), dtype=np.uint8)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    inp = grpcclient.InferInput("image", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)

    def infer(*names):
        return client.infer("salf_cbm", [inp], outputs=[grpcclient.InferRequestedOutput(n) for n in names] or None)

    full, scores_only = infer(), infer("concept_scores", "logits")
    assert [o.name for o in full.get_response().outputs] == ["concept_maps", "concept_scores", "logits"]
    assert [o.name for o in scores_only.get_response().outputs] == ["concept_scores", "logits"]
    np.testing.assert_array_equal(scores_only.as_numpy("logits"), full.as_numpy("logits"))
    np.testing.assert_array_equal(scores_only.as_numpy("concept_scores"), full.as_numpy("concept_scores"))
    assert scores_only.get_response().ByteSize() < full.get_response().ByteSize() - full.as_numpy("concept_maps").nbytes
    with pytest.raises(Exception, match="concept_maps_v2|unknown output"):
        infer("concept_maps_v2")
    client.close()


def test_gallery_scores_the_folder_with_predict_and_caches_nothing(exported_repo, tmp_path):
    from PIL import Image

    from clients.client import SalfClient
    from clients.ui.session import Explorer
    from tests.fixtures.gateway import start_gateway

    gw = start_gateway(exported_repo)
    for k in range(5):
        Image.fromarray(sample_image(40 + k)).save(tmp_path / f"{k}.png")
    try:
        with SalfClient.connect(gw.url) as c:
            explorer = Explorer(c, tmp_path)
            concept = c.info.concepts[0]
            g = explorer.gallery(concept, k=5)
            assert g["scored"] == 5
            assert len(gw.server.gateway.cache) == 0
            # the gallery's order is c* of the concept as Predict reports it
            expect = sorted(range(5), key=lambda i: -c.predict((tmp_path / f"{i}.png").read_bytes(),
                                                               concept_scores=True).concept_scores[0])
            assert [int(x["name"].split(".")[0]) for x in g["images"]] == expect
    finally:
        gw.server.stop(grace=0.5)
