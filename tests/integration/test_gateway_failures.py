"""The gateway when things go wrong or are locked down: Triton unreachable (UNAVAILABLE, never a
crash), deadlines passed to the backends, bearer-token auth and TLS with a self-signed certificate."""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from tests.fixtures.gateway import encode, sample_image, wait_for_health

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PNG = encode(sample_image(1))


def _stub(channel):
    from salf.v1 import gateway_pb2_grpc

    return gateway_pb2_grpc.GatewayStub(channel)


# ------------------------------------------------------------------ Triton down

def test_unreachable_triton_is_unavailable_and_the_gateway_survives(gateway_on_dead_triton, pb):
    with grpc.insecure_channel(gateway_on_dead_triton.url) as channel:
        stub = _stub(channel)
        region = pb.Region(box=pb.Box(x0=0, y0=0, x1=10, y1=10))
        calls = [(stub.Predict, pb.PredictRequest(image=PNG)),
                 (stub.Explain, pb.ExplainRequest(image=PNG)),
                 (stub.ExplainRegion, pb.ExplainRegionRequest(image=PNG, region=region)),
                 (stub.Intervene, pb.InterveneRequest(image=PNG, edits=[pb.ConceptEdit(concept_index=0, region=region,
                                                                                       beta=1.0)]))]
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as info:
                method(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Triton at 127.0.0.1:" in info.value.details() and "cannot serve salf_cbm" in info.value.details()
        # Metadata comes from the local repository: still served, with the backend reported not ready.
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert info.backend == "triton" and not info.backend_ready
        assert len(stub.GetClassRules(pb.GetClassRulesRequest(), timeout=10).rules) == 3


def test_health_is_live_but_not_ready_while_triton_is_down(gateway_on_dead_triton):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(gateway_on_dead_triton.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = lambda service: health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status("") == health_pb2.HealthCheckResponse.SERVING  # liveness: the process answers
        assert status("salf.v1.Gateway") == health_pb2.HealthCheckResponse.NOT_SERVING  # readiness


def test_readiness_follows_the_backend(exported_repo):
    """Readiness turns SERVING when the backend becomes ready and NOT_SERVING when it goes away."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.fixtures.gateway import start_gateway

    gw = start_gateway(exported_repo, metrics_port=None, readiness_interval_s=0.1)
    try:
        with grpc.insecure_channel(gw.url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = lambda: health.Check(health_pb2.HealthCheckRequest(service="salf.v1.Gateway"), timeout=5).status
            assert check() == health_pb2.HealthCheckResponse.SERVING
            gw.server.backend.close()  # the embedded sessions are gone: not ready any more
            deadline = time.monotonic() + 10
            while check() != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
                time.sleep(0.05)
            assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        gw.server.stop(grace=0.5)


# ------------------------------------------------------------------ deadlines

def test_triton_backend_gets_the_deadline(triton_server, exported_repo):
    from serving.backends import TritonBackend
    from serving.errors import DeadlineExceeded
    from salf.contract.repository import load_model_spec

    spec = load_model_spec(exported_repo)
    backend = TritonBackend(spec, triton_server.grpc_url)
    x = np.zeros((1, *spec.input_size, 3), np.uint8)
    try:
        assert backend.infer(x, timeout_s=10.0)[2].shape == (1, 3)
        # gRPC keeps deadlines in whole milliseconds (1 us becomes 1 ms), and one image of the test model
        # can come back from Triton within that: a batch of 16 cannot.
        batch = np.zeros((16, *spec.input_size, 3), np.uint8)
        with pytest.raises(DeadlineExceeded, match="before the request's deadline"):
            backend.infer(batch, timeout_s=1e-6)
    finally:
        backend.close()


def test_embedded_backend_cancels_a_run_past_its_deadline(exported_repo):
    from serving.backends import EmbeddedBackend
    from serving.errors import DeadlineExceeded
    from salf.contract.repository import load_model_spec

    spec = load_model_spec(exported_repo)
    backend = EmbeddedBackend(spec)
    big = np.random.default_rng(0).integers(0, 256, (256, *spec.input_size, 3), dtype=np.uint8)
    with pytest.raises(DeadlineExceeded):
        backend.infer(big, timeout_s=1e-4)
    with pytest.raises(DeadlineExceeded, match="deadline passed before"):
        backend.infer(big[:1], timeout_s=0.0)
    assert backend.infer(big[:2], timeout_s=30.0)[0].shape[0] == 2


def test_client_deadline_is_deadline_exceeded(embedded_gateway, pb):
    with grpc.insecure_channel(embedded_gateway.url) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _stub(channel).Explain(pb.ExplainRequest(image=PNG), timeout=1e-6)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


# ------------------------------------------------------------------ auth

def test_bearer_token_auth(token_gateway, pb):
    with grpc.insecure_channel(token_gateway.url) as channel:
        stub = _stub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret-token"),)):
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(pb.PredictRequest(image=PNG), timeout=10, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in info.value.details()
        ok = stub.Predict(pb.PredictRequest(image=PNG), timeout=10,
                          metadata=(("authorization", "Bearer s3cret-token"),))
        assert len(ok.classes) == 3
    wait_for_health(token_gateway.url, 5.0)  # health stays open for probes


# ------------------------------------------------------------------ TLS

def test_tls(tls_gateway, pb):
    creds = grpc.ssl_channel_credentials(root_certificates=tls_gateway.cert.read_bytes())
    with grpc.secure_channel(f"localhost:{tls_gateway.server.port}", creds) as channel:
        assert len(_stub(channel).Predict(pb.PredictRequest(image=PNG), timeout=10).classes) == 3
    # A plaintext client cannot talk to the TLS port.
    with grpc.insecure_channel(tls_gateway.url) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=3)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------ oversized responses

def test_oversized_explanation_is_refused_with_the_reason(exported_repo, pb):
    from tests.fixtures.gateway import start_gateway

    gw = start_gateway(exported_repo, max_message_mb=1, metrics_port=None)
    big = encode(sample_image(2, size=(700, 700)))
    try:
        with grpc.insecure_channel(gw.url) as channel:
            stub = _stub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Explain(pb.ExplainRequest(image=big, top_k=6, heatmaps=pb.HEATMAP_FORMAT_FLOAT16), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "above the gateway's 1 MiB message limit" in info.value.details()
            # PNG heatmaps of the same image fit.
            ok = stub.Explain(pb.ExplainRequest(image=big, top_k=1), timeout=30)
            assert ok.concepts[0].heatmap.height == 700
    finally:
        gw.server.stop(grace=0.5)


# ------------------------------------------------------------------ cache bound and TTL through the gateway

def test_explanation_ids_are_evicted_and_expire(exported_repo, pb):
    import time

    from tests.fixtures.gateway import start_gateway

    gw = start_gateway(exported_repo, cache_size=1, cache_ttl_s=1.0, metrics_port=None)
    region = pb.Region(box=pb.Box(x0=0, y0=0, x1=10, y1=10))
    try:
        with grpc.insecure_channel(gw.url) as channel:
            stub = _stub(channel)
            from tests.fixtures.gateway import encode, sample_image

            explain = lambda png: stub.Explain(pb.ExplainRequest(image=png, heatmaps=pb.HEATMAP_FORMAT_NONE), timeout=10)
            by_id = lambda eid: stub.ExplainRegion(pb.ExplainRegionRequest(explanation_id=eid, region=region), timeout=10)
            # two images: ids are content-addressed, the same image twice is one entry
            first, second = explain(PNG).explanation_id, explain(encode(sample_image(5))).explanation_id
            assert by_id(second).explanation_id == second
            with pytest.raises(grpc.RpcError) as info:
                by_id(first)  # evicted: the cache holds one entry
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            time.sleep(1.2)
            with pytest.raises(grpc.RpcError) as info:
                by_id(second)  # expired
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        gw.server.stop(grace=0.5)


def test_each_backend_call_gets_what_is_left_of_the_deadline(exported_repo):
    """Intervene on a resent image runs salf_cbm then salf_head: the head must get the time left
    after the first call, not the request's whole budget again (it used to get the same value)."""
    from serving.backends import EmbeddedBackend
    from serving.cache import TTLCache
    from serving.images import encode_png
    from salf.contract.repository import load_model_spec
    from serving.service import Edit, Gateway, Region

    class SlowBackend(EmbeddedBackend):
        def __init__(self, spec):
            super().__init__(spec)
            self.timeouts = []

        def _run(self, model, feeds, outputs, timeout_s):
            self.timeouts.append((model, timeout_s))
            time.sleep(0.3)
            return super()._run(model, feeds, outputs, timeout_s)

    spec = load_model_spec(exported_repo)
    backend = SlowBackend(spec)
    gateway = Gateway(spec, backend, TTLCache(4, 60.0))
    edit = Edit(region=Region(box=(0, 0, 20, 20)), beta=1.0, index=0)
    gateway.intervene([edit], image=encode_png(sample_image(2)), timeout_s=5.0)
    (first, t_cbm), (second, t_head) = backend.timeouts
    assert (first, second) == ("salf_cbm", "salf_head")
    assert t_cbm <= 5.0 and t_head <= t_cbm - 0.3
    backend.close()


def test_a_taken_port_is_a_clear_error_and_releases_everything(exported_repo):
    """Before: a taken gRPC port raised grpcio's bare RuntimeError (a traceback from `salfctl serve`,
    which only catches OSError), and a taken metrics port left the gRPC server running."""
    import socket

    from serving.server import GatewayServer, ServeConfig

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot bind the gateway to 127.0.0.1:{port}"):
            GatewayServer(ServeConfig(model_repository=exported_repo, host="127.0.0.1", port=port,
                                      metrics_port=None)).start()
        server = GatewayServer(ServeConfig(model_repository=exported_repo, host="127.0.0.1", port=0,
                                           metrics_port=port))
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            server.start()
    assert server.backend._sessions == {}  # the backend was closed
    with socket.socket() as again:  # and the gRPC port is free: the half-started server was stopped
        again.bind(("127.0.0.1", server.port))


def test_token_without_tls_on_a_public_interface_is_warned_about(exported_repo, caplog):
    from serving.server import GatewayServer, ServeConfig

    config = ServeConfig(model_repository=exported_repo, host="0.0.0.0", port=0, metrics_port=None, token="t")
    with caplog.at_level("WARNING", logger="serving.server"):
        server = GatewayServer(config).start()
        server.stop(grace=0.1)
    assert any("cleartext" in r.getMessage() for r in caplog.records)
