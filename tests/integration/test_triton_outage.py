"""Triton killed under load and restarted on the same ports, after a short and a long outage: calls fail
fast with UNAVAILABLE, readiness goes NOT_SERVING, and the gateway serves again within 5 s of Triton's
return whatever the outage length (the channel's reconnect backoff is capped at 1 s)."""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest

from tests.fixtures.gateway import encode, sample_image, start_gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def _readiness(url: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(url) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="salf.v1.Gateway"), timeout=2)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def _kill(server) -> None:
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()
    server.process = None


@pytest.mark.parametrize("outage_s", [1.0, 20.0], ids=["short", "long"])
def test_triton_killed_mid_load_and_back(exported_repo, tmp_path, outage_s):
    from export.triton_server import TritonServer

    from salf.v1 import gateway_pb2 as pb, gateway_pb2_grpc

    first = TritonServer(exported_repo, log_path=tmp_path / "triton.log").start()
    ports = dict(http_port=first.http_port, grpc_port=first.grpc_port, metrics_port=first.metrics_port)
    gw = start_gateway(exported_repo, triton_url=first.grpc_url, readiness_interval_s=0.5, metrics_port=None)
    image = encode(sample_image(8))
    stop, failures, lock = threading.Event(), [], threading.Lock()
    second = None

    def client():
        with grpc.insecure_channel(gw.url) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    stub.Predict(pb.PredictRequest(image=image), timeout=30)
                except grpc.RpcError as exc:
                    with lock:
                        failures.append((exc.code().name, time.perf_counter() - t))
                    time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert failures == []
        _kill(first)
        killed = time.monotonic()
        while _readiness(gw.url) != "NOT_SERVING":
            assert time.monotonic() - killed < 5, "readiness still SERVING 5 s after Triton died"
            time.sleep(0.1)
        time.sleep(outage_s)
        with lock:
            codes = {code for code, _ in failures}
            slowest = max(seconds for _, seconds in failures)
        assert codes == {"UNAVAILABLE"}, codes
        assert slowest < 3.0, f"a call took {slowest:.1f} s to fail while Triton was down"
        second = TritonServer(exported_repo, log_path=tmp_path / "triton2.log", **ports).start()
        back = time.monotonic()
        with grpc.insecure_channel(gw.url) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            while True:
                try:
                    stub.Predict(pb.PredictRequest(image=image), timeout=5)
                    break
                except grpc.RpcError:
                    assert time.monotonic() - back < 5.0, "the gateway did not serve within 5 s of Triton's return"
                    time.sleep(0.05)
        recovered = time.monotonic() - back
        while _readiness(gw.url) != "SERVING":
            assert time.monotonic() - back < 5.0, "readiness not SERVING within 5 s of Triton's return"
            time.sleep(0.1)
        print(f"outage {outage_s:g} s: {len(failures)} calls failed fast (slowest {slowest:.2f} s); "
              f"serving again {recovered:.2f} s after Triton was ready")
    finally:
        stop.set()
        for t in threads:
            t.join()
        gw.server.stop(grace=1.0)
        for server in (first, second):
            if server is not None and server.process is not None:
                server.stop()
