"""A new model version exported while the gateway serves under load, on both backends: no request
fails, every response names the version that answered, and the gateway moves to the new version
without a restart (Triton loads it by polling its repository; the gateway polls the same folder)."""
from __future__ import annotations

import shutil
import threading
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from tests.fixtures.bundles import make_random_bundle
from tests.fixtures.gateway import encode, sample_image, start_gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _direct_logits(repo, version: int, image: np.ndarray) -> np.ndarray:
    from PIL import Image

    x = np.asarray(Image.fromarray(image).resize((64, 64), Image.BILINEAR))[None]
    sess = ort.InferenceSession(str(repo / f"salf_cbm/{version}/model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"image": x})[0][0]


@pytest.mark.parametrize("backend", ["embedded", "triton"])
def test_new_version_while_serving(exported_repo, tmp_path, backend):
    from export.repository import export_repository
    from export.triton_server import TritonServer

    from salf.contract.repository import model_versions
    from salf.v1 import gateway_pb2 as pb, gateway_pb2_grpc

    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)
    triton = TritonServer(repo, log_path=tmp_path / "triton.log", poll_secs=1).start() if backend == "triton" else None
    gw = start_gateway(repo, triton_url=triton.grpc_url if triton else None, poll_interval_s=0.5, metrics_port=None)
    array = sample_image(9)
    image = encode(array)
    stop, seen, failures, lock = threading.Event(), [], [], threading.Lock()

    def client():
        with grpc.insecure_channel(gw.url) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            while not stop.is_set():
                try:
                    r = stub.Predict(pb.PredictRequest(image=image, top_k=3), timeout=30)
                    with lock:
                        seen.append((r.model_version, [c.logit for c in sorted(r.classes, key=lambda c: c.index)]))
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(f"{exc.code().name}: {exc.details()}")

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        bundle = make_random_bundle(tmp_path / "bundle-v2", seed=11)
        report = export_repository(bundle, repo, flavour="python", parity=False)
        assert report.version == 2 and model_versions(repo) == [1, 2]
        end = time.monotonic() + 60
        while gw.server.version != 2 or not seen or seen[-1][0] != 2:
            assert time.monotonic() < end, f"still on version {gw.server.version} 60 s after the export"
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        gw.server.stop(grace=1.0)
        if triton is not None:
            triton.stop()
    assert failures == [], failures[:5]
    versions = [v for v, _ in seen]
    assert versions[0] == 1 and versions[-1] == 2 and sorted(set(versions)) == [1, 2]
    # after the switch only calls already in flight (at most one per client) finish on version 1
    assert versions[versions.index(2):].count(1) <= len(threads)
    for version in (1, 2):  # each version's answers are that version's model
        logits = next(l for v, l in seen if v == version)
        np.testing.assert_allclose(logits, _direct_logits(repo, version, array), rtol=1e-4, atol=1e-4)
    print(f"{backend}: {len(seen)} calls, {versions.count(1)} by v1 then {versions.count(2)} by v2, none failed")
