"""A real Prometheus scraping a real gateway on a real Triton while traffic runs; every PromQL query of
the Grafana dashboard (docs/grafana-dashboard.json, read here) must return data. The traffic fills every
panel: concurrent Predicts (Triton batches), Explain + ExplainRegion by id (cache hits), undecodable
images (errors by code) and noisy images (concept drift)."""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import grpc
import numpy as np
import pytest

from tests.fixtures.gateway import ROOT, encode, free_port, sample_image, start_gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
RATE_INTERVAL = "30s"  # what Grafana substitutes for $__rate_interval at a 1 s scrape interval, roughly


def dashboard_queries() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["schemaVersion"] >= 36 and doc["templating"]["list"][0]["type"] == "datasource"
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p["targets"]]


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        doc = json.loads(resp.read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def test_every_dashboard_query_returns_data(exported_repo, triton_server, tmp_path):
    from salf.v1 import gateway_pb2 as pb, gateway_pb2_grpc

    binary = shutil.which("prometheus")
    assert binary, "the prometheus binary is missing: `make test` installs Debian's prometheus package"
    gw = start_gateway(exported_repo, triton_url=triton_server.grpc_url, drift_window=32, drift_interval_s=0.2)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
        f"  - job_name: salf-gateway\n    static_configs:\n      - targets: ['127.0.0.1:{gw.server.metrics_port}']\n"
        f"  - job_name: triton\n    static_configs:\n      - targets: ['127.0.0.1:{triton_server.metrics_port}']\n")
    prom = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    base = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(0)
    good = [encode(sample_image(k)) for k in range(4)]
    noisy = [encode(np.clip(sample_image(k) + rng.normal(0, 60, (84, 112, 3)), 0, 255).astype(np.uint8))
             for k in range(4)]
    stop = threading.Event()

    def client(k: int):
        with grpc.insecure_channel(gw.url) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    if k == 0 and n % 5 == 0:
                        stub.Predict(pb.PredictRequest(image=b"not an image"), timeout=10)
                    elif k == 1:
                        e = stub.Explain(pb.ExplainRequest(image=good[n % 4], heatmaps=pb.HEATMAP_FORMAT_NONE), timeout=10)
                        stub.ExplainRegion(pb.ExplainRegionRequest(explanation_id=e.explanation_id, region=pb.Region(
                            box=pb.Box(x0=0, y0=0, x1=40, y1=40))), timeout=10)
                    else:
                        stub.Predict(pb.PredictRequest(image=(noisy if n % 3 == 0 else good)[n % 4]), timeout=10)
                except grpc.RpcError:
                    pass

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    try:
        for t in threads:
            t.start()
        end = time.monotonic() + 60
        while True:  # both targets scraped, a few times
            try:
                up = _query(base, "up")
                if len(up) == 2 and all(r["value"][1] == "1" for r in up):
                    break
            except OSError:
                pass
            assert time.monotonic() < end, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        time.sleep(6)
        empty = []
        for title, expr in dashboard_queries():
            result = _query(base, expr.replace("$__rate_interval", RATE_INTERVAL))
            if not result:
                empty.append(f"{title}: {expr}")
        batch_expr = next(e for t, e in dashboard_queries() if t == "Triton average executed batch size")
        batch = _query(base, batch_expr.replace("$__rate_interval", RATE_INTERVAL))
    finally:
        stop.set()
        for t in threads:
            t.join()
        prom.terminate()
        prom.wait(timeout=30)
        gw.server.stop(grace=1.0)
    assert empty == [], empty
    cbm = next(float(r["value"][1]) for r in batch if r["metric"].get("model") == "salf_cbm")
    assert cbm > 1.0  # 15 concurrent clients: Triton merged their requests
    print(f"{len(dashboard_queries())} dashboard queries answered; Triton salf_cbm average batch {cbm:.2f}")
