"""The Stream RPC (docs/DESIGN.md "Streaming"): many Predict/Explain items on one call, answers as they
complete, a bad item failing alone, and the stream's own failures (silence, garbage, a vanished client)
leaving the gateway up. Real gateways on free ports, the embedded backend and a real Triton."""
from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest

from tests.fixtures.gateway import encode, sample_image, start_gateway

pytestmark = pytest.mark.integration


def _pb():
    from salf.v1 import gateway_pb2, gateway_pb2_grpc

    return gateway_pb2, gateway_pb2_grpc


def _metric(url: str, line_prefix: str) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix)]
    return sum(values)


def test_items_answer_like_their_unary_calls_and_fail_alone(gateway):
    from clients.client import SalfClient

    pb, _ = _pb()
    images = [encode(sample_image(k)) for k in range(6)]
    with SalfClient.connect(gateway.url, timeout=60) as c:
        items = [(f"p{k}", pb.PredictRequest(image=img, top_k=3)) for k, img in enumerate(images)]
        items += [(f"e{k}", c.explain_request(img, top_k=2, heatmaps="none")) for k, img in enumerate(images[:3])]
        items.insert(4, ("garbage", pb.PredictRequest(image=b"not an image")))
        items.insert(7, ("unknown-class", c.explain_request(images[0], class_name="no such class")))
        answers = {r.id: r for r in c.stream(items, window=3)}
        assert set(answers) == {key for key, _ in items}
        assert answers["garbage"].error.code == "INVALID_ARGUMENT" and "image" in answers["garbage"].error.message
        assert answers["unknown-class"].error.code == "INVALID_ARGUMENT"
        assert "no such class" in answers["unknown-class"].error.message
        for k, img in enumerate(images):
            got, want = answers[f"p{k}"].predict, c.predict(img, top_k=3)
            assert [(x.name, x.logit) for x in got.classes] == [(x.name, pytest.approx(x.logit, abs=1e-5))
                                                                for x in want.classes]
        for k, img in enumerate(images[:3]):
            got, want = answers[f"e{k}"].explain, c.explain(img, top_k=2, heatmaps="none")
            assert got.explanation_id and got.explanation_id == want.explanation_id  # content-addressed ids
            assert [x.name for x in got.concepts] == [x.name for x in want.concepts]
            # the id is a real cached explanation: Explain Anything on it without resending the image
            region = c.region(box=[0, 0, 40, 40])
            assert c.explain_region(region, explanation_id=got.explanation_id).explanation_id == got.explanation_id


def test_answers_come_before_the_caller_finishes_sending(embedded_gateway):
    """A stream, not a batch: the first answers arrive while the caller still holds the stream open."""
    from clients.client import SalfClient

    pb, _ = _pb()
    release = threading.Event()

    def items():
        for k in range(2):
            yield f"{k}", pb.PredictRequest(image=encode(sample_image(k)))
        assert release.wait(30)
        yield "last", pb.PredictRequest(image=encode(sample_image(9)))

    with SalfClient.connect(embedded_gateway.url, timeout=60) as c:
        responses = c.stream(items(), window=4, timeout=60)
        first = [next(responses).id, next(responses).id]
        assert sorted(first) == ["0", "1"]
        release.set()
        assert [r.id for r in responses] == ["last"]


def test_a_full_gateway_makes_items_wait_not_fail(exported_repo):
    """max_in_flight 1 and a window of 4: every item still gets its answer (stream items wait for a slot);
    a unary call meanwhile may be refused, but the stream is not."""
    from clients.client import SalfClient

    pb, _ = _pb()
    gw = start_gateway(exported_repo, max_in_flight=1, metrics_port=None)
    try:
        with SalfClient.connect(gw.url, timeout=60) as c:
            items = [(str(k), pb.PredictRequest(image=encode(sample_image(k)))) for k in range(12)]
            answers = list(c.stream(items, window=4))
            assert sorted(int(r.id) for r in answers) == list(range(12))
            assert all(r.WhichOneof("result") == "predict" for r in answers)
    finally:
        gw.server.stop(grace=0.5)


def test_silence_garbage_and_a_vanished_client_fail_the_stream_not_the_gateway(exported_repo):
    pb, pb_grpc = _pb()
    gw = start_gateway(exported_repo, stream_idle_s=0.5)
    try:
        with grpc.insecure_channel(gw.url) as channel:
            stub = pb_grpc.GatewayStub(channel)
            # opens the stream and sends nothing: dropped after stream_idle_s
            never = threading.Event()

            def silent():
                never.wait(10)
                return
                yield  # noqa: unreachable - makes this a generator that sends nothing

            t = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Stream(silent(), timeout=10))
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
            assert "no message arrived on the stream" in info.value.details()
            assert time.monotonic() - t < 5
            never.set()
            # not a StreamRequest at all
            raw = channel.stream_stream("/salf.v1.Gateway/Stream", request_serializer=lambda b: b,
                                        response_deserializer=pb.StreamResponse.FromString)
            with pytest.raises(grpc.RpcError) as info:
                list(raw(iter([b"\xff\xff\xff garbage"]), timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid salf.v1.StreamRequest" in info.value.details()
            # an item with neither request fails alone
            answers = list(stub.Stream(iter([pb.StreamRequest(id="empty"),
                                             pb.StreamRequest(id="ok", predict=pb.PredictRequest(
                                                 image=encode(sample_image(1))))]), timeout=30))
            assert {r.id: r.WhichOneof("result") for r in answers} == {"empty": "error", "ok": "predict"}
            # the client goes away mid-stream
            call = stub.Stream(iter([pb.StreamRequest(id=str(k), predict=pb.PredictRequest(
                image=encode(sample_image(k)))) for k in range(50)]), timeout=30)
            next(call)
            call.cancel()
        deadline = time.monotonic() + 10
        while _metric(gw.metrics_url, "salf_gateway_in_flight_requests{") > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _metric(gw.metrics_url, "salf_gateway_in_flight_requests{") == 0
        assert _metric(gw.metrics_url, 'salf_gateway_requests_total{code="DEADLINE_EXCEEDED",method="Stream"}') == 1
        from clients.client import SalfClient

        with SalfClient.connect(gw.url, timeout=30) as c:  # still serving
            assert c.predict(encode(sample_image(2))).classes
    finally:
        gw.server.stop(grace=0.5)
