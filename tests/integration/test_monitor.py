"""`salfctl monitor` against a real gateway on a real Triton under 32 concurrent clients."""
from __future__ import annotations

import json
import threading

import grpc
import pytest
from typer.testing import CliRunner

from tests.fixtures.gateway import encode, free_port, sample_image, start_gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_monitor_shows_triton_batching_under_concurrent_clients(exported_repo, triton_server):
    from clients.salfctl import app
    from salf.v1 import gateway_pb2 as pb, gateway_pb2_grpc

    gw = start_gateway(exported_repo, triton_url=triton_server.grpc_url, max_in_flight=64)
    image = encode(sample_image(12))
    stop = threading.Event()

    def client():
        with grpc.insecure_channel(gw.url) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            while not stop.is_set():
                stub.Predict(pb.PredictRequest(image=image), timeout=30)

    threads = [threading.Thread(target=client) for _ in range(32)]
    try:
        for t in threads:
            t.start()
        r = CliRunner().invoke(app, ["monitor", "--gateway", gw.metrics_url, "--triton", triton_server.metrics_url,
                                     "--once", "--json", "--interval", "3"])
        table = CliRunner().invoke(app, ["monitor", "--gateway", gw.metrics_url, "--triton",
                                         triton_server.metrics_url, "--once", "--interval", "1"])
    finally:
        stop.set()
        for t in threads:
            t.join()
        gw.server.stop(grace=1.0)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    cbm = doc["triton"]["models"]["salf_cbm"]
    assert cbm["avg_batch_size"] > 1.0, cbm  # the dynamic batcher merged the gateway's concurrent requests
    assert doc["gateway"]["rpcs"]["Predict"]["requests_per_s"] > 1 and doc["gateway"]["errors"] == {}
    assert table.exit_code == 0 and "avg batch" in table.stdout and "Predict" in table.stdout
    print(f"monitor: Predict {doc['gateway']['rpcs']['Predict']['requests_per_s']:.1f}/s, Triton salf_cbm average "
          f"batch {cbm['avg_batch_size']:.2f}, queue {cbm['queue_ms']:.2f} ms, compute {cbm['compute_ms']:.2f} ms")


def test_monitor_says_which_endpoint_is_down(embedded_gateway):
    from clients.salfctl import app

    dead = f"http://127.0.0.1:{free_port()}/metrics"
    r = CliRunner().invoke(app, ["monitor", "--gateway", embedded_gateway.metrics_url, "--triton", dead, "--once",
                                 "--json", "--interval", "0.2"])
    assert r.exit_code == 3
    doc = json.loads(r.stdout)
    assert doc["gateway"]["up"] and doc["triton"]["up"] is False and "Connection refused" in doc["triton"]["error"]
