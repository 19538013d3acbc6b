"""A real Triton (2.51, python-backend flavour) serving the exported repository: numbers, batching,
metrics, errors and shutdown. The server is the session's ``triton_server`` fixture."""
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from export.parity import find_images, load_images
from export.triton_server import TritonError, TritonServer, free_ports
from training.bundle import load_bundle
from training.model import normalize_uint8

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CBM_OUT = ("concept_maps", "concept_scores", "logits")
HEAD_OUT = ("concept_scores", "logits")
# Triton runs the same model.onnx with onnxruntime, possibly merged with other requests: tight bound.
ORT_TOL = dict(rtol=1e-5, atol=1e-6)
TORCH_TOL = dict(rtol=1e-4, atol=1e-4)  # the export's parity tolerance (fp32)


@pytest.fixture(scope="module")
def sessions(exported_repo):
    def make(name):
        return ort.InferenceSession(str(exported_repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    return {"salf_cbm": make("salf_cbm"), "salf_head": make("salf_head")}


@pytest.fixture(scope="module")
def real_images(synth_data):
    return load_images(find_images(synth_data / "test", limit=5), (64, 64))


def _grpc_infer(client, model, name, array, outputs):
    dtype = "UINT8" if array.dtype == np.uint8 else "FP32"
    inp = grpcclient.InferInput(name, list(array.shape), dtype)
    inp.set_data_from_numpy(array)
    result = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
    return [result.as_numpy(o) for o in outputs]


def _http_infer(client, model, name, array, outputs):
    dtype = "UINT8" if array.dtype == np.uint8 else "FP32"
    inp = httpclient.InferInput(name, list(array.shape), dtype)
    inp.set_data_from_numpy(array, binary_data=True)
    result = client.infer(model, [inp], outputs=[httpclient.InferRequestedOutput(o, binary_data=True) for o in outputs])
    return [result.as_numpy(o) for o in outputs]


def _stats(client, model):
    doc = client.get_inference_statistics(model_name=model, as_json=True)["model_stats"][0]
    batches = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in doc.get("batch_stats", [])}
    return int(doc.get("inference_count", 0)), int(doc.get("execution_count", 0)), batches


def test_server_reports_both_models_ready_with_the_exported_contract(triton_server):
    client = httpclient.InferenceServerClient(triton_server.http_url)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_model_metadata("salf_cbm")
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 64, 64, 3]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("concept_maps", "FP32", [-1, 6, 7, 7]), ("concept_scores", "FP32", [-1, 6]), ("logits", "FP32", [-1, 3])]
    head = client.get_model_metadata("salf_head")
    assert head["inputs"][0]["name"] == "concept_maps" and head["inputs"][0]["shape"] == [-1, 6, 7, 7]
    index = {m["name"]: m["state"] for m in client.get_model_repository_index()}
    assert index == {"salf_cbm": "READY", "salf_head": "READY"}  # top-level files are not models
    log_text = triton_server.log_path.read_text()
    for name in ("salf_cbm", "salf_head"):  # model.py built its onnxruntime session once, in initialize
        assert log_text.count(f"{name}: loaded ") == 1 and "CPUExecutionProvider" in log_text


def test_grpc_batch_of_real_images_matches_onnxruntime_and_torch(triton_server, sessions, real_images, random_bundle):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    got = _grpc_infer(client, "salf_cbm", "image", real_images, CBM_OUT)
    want = sessions["salf_cbm"].run(list(CBM_OUT), {"image": real_images})
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.shape == w.shape
        np.testing.assert_allclose(g, w, **ORT_TOL)
    model, meta = load_bundle(random_bundle)
    with torch.no_grad():
        ref = model(normalize_uint8(torch.from_numpy(real_images), meta.backbone.mean, meta.backbone.std))
    for g, r in zip(got, ref):
        # bound relative to each output's scale (export.parity): the random model's maps are ~1e-4,
        # so an absolute 1e-4 would accept maps that are off by their own size
        r = r.numpy()
        np.testing.assert_allclose(g, r, rtol=TORCH_TOL["rtol"], atol=TORCH_TOL["atol"] * max(np.abs(r).max(), 1e-3))


def test_http_batches_through_both_models_match_onnxruntime(triton_server, sessions):
    client = httpclient.InferenceServerClient(triton_server.http_url)
    images = np.random.default_rng(1).integers(0, 256, size=(7, 64, 64, 3), dtype=np.uint8)
    maps, scores, logits = _http_infer(client, "salf_cbm", "image", images, CBM_OUT)
    want = sessions["salf_cbm"].run(list(CBM_OUT), {"image": images})
    for g, w in zip((maps, scores, logits), want):
        np.testing.assert_allclose(g, w, **ORT_TOL)
    edited = maps.copy()
    edited[:, 2] += 0.5  # an intervention: only the head re-runs
    head_scores, head_logits = _http_infer(client, "salf_head", "concept_maps", edited, HEAD_OUT)
    want_scores, want_logits = sessions["salf_head"].run(list(HEAD_OUT), {"concept_maps": edited})
    np.testing.assert_allclose(head_scores, want_scores, **ORT_TOL)
    np.testing.assert_allclose(head_logits, want_logits, **ORT_TOL)
    assert not np.allclose(head_scores[:, 2], scores[:, 2])  # the edit reached the head


@pytest.fixture(scope="module")
def delayed_triton(exported_repo, tmp_path_factory):
    """A Triton whose batcher holds requests 50 ms. The measured default is no delay (docs/batching.md):
    at the paper's size requests queue behind the running batch and merge anyway, but this model's
    forward takes about a millisecond, so 32 requests in flight would rarely find each other queued."""
    import shutil

    from export.repository import write_flavour
    from export.triton_config import TritonOptions

    repo = tmp_path_factory.mktemp("delayed") / "model_repository"
    shutil.copytree(exported_repo, repo)
    write_flavour(repo, "python", TritonOptions(max_queue_delay_us=50_000))
    server = TritonServer(repo, log_path=repo.parent / "tritonserver.log").start()
    yield server
    server.stop()


def test_concurrent_requests_are_merged_by_the_dynamic_batcher(delayed_triton, sessions):
    client = grpcclient.InferenceServerClient(delayed_triton.grpc_url)
    n = 32
    images = np.random.default_rng(2).integers(0, 256, size=(n, 1, 64, 64, 3), dtype=np.uint8)
    infer0, exec0, batches0 = _stats(client, "salf_cbm")
    results, errors, done = [None] * n, [], threading.Semaphore(0)

    def callback(i, result, error):
        if error is not None:
            errors.append(error)
        else:
            results[i] = result.as_numpy("logits")
        done.release()

    for i in range(n):  # all in flight at once: the batcher sees a queue
        inp = grpcclient.InferInput("image", [1, 64, 64, 3], "UINT8")
        inp.set_data_from_numpy(images[i])
        client.async_infer("salf_cbm", [inp], callback=lambda result, error, i=i: callback(i, result, error),
                           outputs=[grpcclient.InferRequestedOutput("logits")])
    for _ in range(n):
        assert done.acquire(timeout=60), "a request never completed"
    assert errors == []
    want = sessions["salf_cbm"].run(["logits"], {"image": images[:, 0]})[0]
    np.testing.assert_allclose(np.concatenate(results), want, **ORT_TOL)  # each response went to its request
    infer1, exec1, batches1 = _stats(client, "salf_cbm")
    inferences, executions = infer1 - infer0, exec1 - exec0
    merged = {b: c - batches0.get(b, 0) for b, c in batches1.items() if c - batches0.get(b, 0)}
    print(f"dynamic batching: {n} concurrent batch-1 requests -> inference_count +{inferences}, "
          f"execution_count +{executions}, executed batch sizes {merged}")
    assert inferences == n
    assert executions < inferences, f"no request was merged: {merged}"
    assert max(merged) > 1


def test_prometheus_metrics_count_successes_and_failures(triton_server, sessions):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    images = np.zeros((2, 64, 64, 3), np.uint8)
    _grpc_infer(client, "salf_cbm", "image", images, CBM_OUT)
    expected = _stats(client, "salf_cbm")
    deadline = time.monotonic() + 15
    while True:  # counters are exported as requests complete; allow one metrics refresh
        text = urllib.request.urlopen(triton_server.metrics_url, timeout=5).read().decode()
        # keyed by family name: the parser renames counter samples to <name>_total
        samples = {(fam.name, s.labels.get("model")): s.value for fam in text_string_to_metric_families(text)
                   for s in fam.samples if s.labels.get("version") == "1" and s.labels.get("reason") in (None, "BACKEND")}
        done = (samples.get(("nv_inference_count", "salf_cbm")), samples.get(("nv_inference_exec_count", "salf_cbm")))
        if done == tuple(expected[:2]) or time.monotonic() > deadline:  # both counters refresh, not always together
            break
        time.sleep(0.5)
    assert samples[("nv_inference_count", "salf_cbm")] == expected[0]
    assert samples[("nv_inference_exec_count", "salf_cbm")] == expected[1]
    assert samples[("nv_inference_request_success", "salf_cbm")] >= 1
    assert ("nv_inference_request_failure", "salf_head") in samples


def test_bad_requests_get_their_own_errors_and_good_ones_still_succeed(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    with pytest.raises(InferenceServerException, match=r"(?i)shape|dims"):
        _grpc_infer(client, "salf_cbm", "image", np.zeros((1, 32, 32, 3), np.uint8), CBM_OUT)
    with pytest.raises(InferenceServerException, match=r"(?i)data.?type|FP32|UINT8"):
        _grpc_infer(client, "salf_cbm", "image", np.zeros((1, 64, 64, 3), np.float32), CBM_OUT)
    with pytest.raises(InferenceServerException, match=r"(?i)batch"):
        _grpc_infer(client, "salf_cbm", "image", np.zeros((33, 64, 64, 3), np.uint8), CBM_OUT)
    maps, _, logits = _grpc_infer(client, "salf_cbm", "image", np.zeros((1, 64, 64, 3), np.uint8), CBM_OUT)
    assert maps.shape == (1, 6, 7, 7) and np.isfinite(logits).all()


def test_launcher_serves_and_shuts_down_cleanly_on_sigterm(exported_repo, tmp_path):
    """`python -m export.triton_server` (what `make triton` runs): ready line, inference, SIGTERM -> exit 0."""
    http, grpc_port, metrics = free_ports(3)
    log_file = tmp_path / "triton.log"
    proc = subprocess.Popen([sys.executable, "-m", "export.triton_server", "--model-repository", str(exported_repo),
                             "--http-port", str(http), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics),
                             "--log-file", str(log_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        line = proc.stdout.readline()
        while line and "Triton ready" not in line:
            line = proc.stdout.readline()
        assert f"grpc 127.0.0.1:{grpc_port}" in line, log_file.read_text()[-3000:]
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        _, _, logits = _grpc_infer(client, "salf_cbm", "image", np.zeros((1, 64, 64, 3), np.uint8), CBM_OUT)
        assert logits.shape == (1, 3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log_text = log_file.read_text()
    assert "successfully unloaded 'salf_cbm' version 1" in log_text
    assert "successfully unloaded 'salf_head' version 1" in log_text
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/live", timeout=2)


def test_a_broken_repository_fails_fast_with_the_server_log(exported_repo, tmp_path):
    import shutil

    repo = tmp_path / "broken"
    shutil.copytree(exported_repo, repo)
    (repo / "salf_head" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    server = TritonServer(repo, log_path=tmp_path / "broken.log", ready_timeout_s=60)
    started = time.monotonic()
    with pytest.raises(TritonError, match=r"(?s)exited with code \d+ before becoming ready.*salf_head"):
        server.start()
    assert time.monotonic() - started < 55
    assert not server.alive
