"""Every bad input to the gateway is INVALID_ARGUMENT with a precise message, on both backends; an
unknown explanation_id is NOT_FOUND and resending the image works.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from tests.fixtures.gateway import PNG, encode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


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
