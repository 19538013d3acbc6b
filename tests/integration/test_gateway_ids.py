"""Explanation ids across replicas (issue 23, item 1): two gateways sharing --id-key give the same image
the same id; a follow-up that lands on the other replica and is resent with the image recreates that id;
an Explain of an image a replica already holds runs no forward pass."""
from __future__ import annotations

import urllib.request

import grpc
import pytest

from tests.fixtures.gateway import encode, sample_image, start_gateway

pytestmark = pytest.mark.integration

KEY = "test-deployment-key-0123456789"


def _forwards(gw) -> float:
    text = urllib.request.urlopen(gw.metrics_url, timeout=5).read().decode()
    line = [l for l in text.splitlines() if l.startswith("salf_gateway_backend_seconds_count") and 'model="salf_cbm"' in l]
    return float(line[0].split()[-1]) if line else 0.0


@pytest.fixture(scope="module")
def pair(exported_repo):
    gws = [start_gateway(exported_repo, id_key=KEY) for _ in range(2)]
    yield gws
    for gw in gws:
        gw.server.stop(grace=1.0)


def _stub(gw, pb):
    from salf.v1 import gateway_pb2_grpc

    return gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(gw.url))


def test_two_replicas_one_id_and_a_resend_recreates_it(pair, pb, exported_repo):
    a, b = (_stub(gw, pb) for gw in pair)
    png = encode(sample_image(7))
    ida = a.Explain(pb.ExplainRequest(image=png, heatmaps=pb.HEATMAP_FORMAT_NONE), timeout=30).explanation_id
    idb = b.Explain(pb.ExplainRequest(image=png, heatmaps=pb.HEATMAP_FORMAT_NONE), timeout=30).explanation_id
    assert ida == idb
    # a replica with another key (or none) gives another id
    other = start_gateway(exported_repo)
    try:
        idc = _stub(other, pb).Explain(pb.ExplainRequest(image=png, heatmaps=pb.HEATMAP_FORMAT_NONE),
                                       timeout=30).explanation_id
    finally:
        other.server.stop(grace=1.0)
    assert idc != ida
    # a follow-up on the replica that does not hold the explanation
    region = pb.Region(box=pb.Box(x0=0, y0=0, x1=20, y1=20))
    png2 = encode(sample_image(8))
    first = a.Explain(pb.ExplainRequest(image=png2, heatmaps=pb.HEATMAP_FORMAT_NONE), timeout=30).explanation_id
    with pytest.raises(grpc.RpcError) as err:  # b never saw image 8: without a shared store, NOT_FOUND
        b.ExplainRegion(pb.ExplainRegionRequest(explanation_id=first, region=region), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    resent = b.ExplainRegion(pb.ExplainRegionRequest(explanation_id=first, image=png2, region=region), timeout=30)
    assert resent.explanation_id == first


def test_explaining_a_held_image_runs_no_forward(pair, pb):
    a = _stub(pair[0], pb)
    png = encode(sample_image(11))
    start = _forwards(pair[0])
    first = a.Explain(pb.ExplainRequest(image=png, heatmaps=pb.HEATMAP_FORMAT_NONE), timeout=30)
    before = _forwards(pair[0])
    assert before == start + 1  # the first Explain ran the model once
    again = a.Explain(pb.ExplainRequest(image=png, heatmaps=pb.HEATMAP_FORMAT_NONE), timeout=30)
    region = a.ExplainRegion(pb.ExplainRegionRequest(explanation_id="", image=png,
                                                     region=pb.Region(box=pb.Box(x0=0, y0=0, x1=9, y1=9))), timeout=30)
    assert again.explanation_id == first.explanation_id == region.explanation_id
    assert _forwards(pair[0]) == before
    assert [c.contribution for c in again.concepts] == [c.contribution for c in first.concepts]
