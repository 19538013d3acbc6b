"""Three gateways sharing Redis (`--cache redis://`, serving/store.py) behind Envoy, scraped by a real
Prometheus (deploy/cluster.py, `make cluster --redis`), on one real Triton (issue 23):

- the same image explained on two gateways gets one id, and a follow-up on the other gateway is a store hit
  (no forward pass);
- Prometheus over the three replicas: the summed request counter equals what the clients sent, every
  dashboard query (docs/grafana-dashboard.json) returns data, and the deployment's drift computed in PromQL
  from the replicas' bin counts (deploy/prometheus/rules.yml) equals salf.contract.drift's;
- Redis stopped under load: no failed call, the degradation metric rises, service goes on from the local
  caches, and the store is used again once it is back."""
from __future__ import annotations

import re
import time

import numpy as np
import pytest
import yaml

from clients.client import SalfClient
from deploy.cluster import RULES, Cluster
from tests.cluster import Load, dashboard_queries, metric_sum, query, samples, summed, triton_forwards, wait_for
from tests.fixtures.gateway import ROOT, encode, sample_image

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
RATE_INTERVAL = "30s"  # what Grafana substitutes for $__rate_interval at a 1 s scrape interval, roughly


@pytest.fixture(scope="module")
def cluster(exported_repo, triton_server, tmp_path_factory):
    c = Cluster(exported_repo, tmp_path_factory.mktemp("cluster-store"), gateways=3, redis=True, prometheus=True,
                triton=triton_server, gateway_args=("--drift-window", "32", "--drift-tracked", "4")).start()
    yield c
    c.stop()


def test_one_image_one_id_on_two_gateways_and_the_other_one_reads_the_store(cluster):
    a, b = cluster.replicas[:2]
    image = encode(sample_image(301))
    with SalfClient.connect(a.url) as ca, SalfClient.connect(b.url) as cb:
        e = ca.explain(image, top_k=2, heatmaps="none")
        forwards, store_hits = triton_forwards(cluster.triton), metric_sum(b.metrics_url, "salf_gateway_store_hits_total")
        r = cb.explain_region(cb.region(box=(0, 0, 40, 40)), explanation_id=e.explanation_id)
        assert r.explanation_id == e.explanation_id
        again = cb.explain(image, top_k=2, heatmaps="none")  # now in b's local cache too
        assert again.explanation_id == e.explanation_id
        assert cb.last_replica == b.name and ca.last_replica == a.name
    assert triton_forwards(cluster.triton) == forwards, "the follow-up on the other gateway ran a forward pass"
    assert metric_sum(b.metrics_url, "salf_gateway_store_hits_total") == store_hits + 1


def _traffic(cluster, counts: dict):
    """The dashboard's traffic through Envoy: concurrent Predicts (Triton batches; noisy images drift),
    Explain + ExplainRegion by id (cache hits), undecodable images (errors by code); ``counts`` tallies
    the Predicts sent."""
    import grpc

    rng = np.random.default_rng(0)
    good = [encode(sample_image(k)) for k in range(4)]
    noisy = [encode(np.clip(sample_image(k) + rng.normal(0, 60, (84, 112, 3)), 0, 255).astype(np.uint8))
             for k in range(4)]
    clients = [SalfClient.connect(cluster.url, timeout=20) for _ in range(12)]
    region = clients[0].region(box=(0, 0, 40, 40))

    def work(k: int, n: int) -> None:
        c = clients[k]
        if k == 0 and n % 5 == 0:
            counts["predict"] += 1
            try:
                c.predict(b"not an image")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        elif k in (1, 2):
            e = c.explain(good[n % 4], heatmaps="none")
            c.explain_region(region, explanation_id=e.explanation_id)
        else:
            counts["predict"] += 1
            c.predict((noisy if n % 3 == 0 else good)[n % 4])

    return clients, Load(12, work, seconds=60)


def test_prometheus_sums_the_replicas_and_every_dashboard_query_returns_data(cluster):
    base = f"http://127.0.0.1:{cluster.prometheus_port}"
    wait_for(lambda: len([r for r in query(base, 'up{job="salf-gateway"}') if r["value"][1] == "1"]) == 3, 30,
             "Prometheus scraping the three gateways")
    before = wait_for(lambda: query(base, 'sum(salf_gateway_requests_total{method="Predict"})') or [
        {"value": [0, "0"]}], 10, "a first scrape")
    start = float(before[0]["value"][1])
    counts = {"predict": 0}
    clients, load = _traffic(cluster, counts)
    try:
        load.start()
        time.sleep(8)
        empty = []
        for title, expr in dashboard_queries(DASHBOARD):
            if not query(base, expr.replace("$__rate_interval", RATE_INTERVAL)):
                empty.append(f"{title}: {expr}")
        batch = query(base, next(e for t, e in dashboard_queries(DASHBOARD) if t == "Triton average executed batch "
                                 "size").replace("$__rate_interval", RATE_INTERVAL))
    finally:
        load.stop()
        for c in clients:
            c.close()
    assert load.failures == [], load.failures[:5]
    assert empty == [], empty
    assert next(float(r["value"][1]) for r in batch if r["metric"].get("model") == "salf_cbm") > 1.0

    # Every gateway series carries its replica; the sum over them is what the clients sent.
    series = query(base, 'salf_gateway_requests_total{job="salf-gateway"}')
    assert len({s["metric"]["instance"] for s in series}) == 3
    expected = start + counts["predict"]
    got = wait_for(lambda: (lambda v: v if v == expected else None)(
        float(query(base, 'sum(salf_gateway_requests_total{method="Predict"})')[0]["value"][1])), 15,
        f"Prometheus's sum over the replicas to reach the clients' {expected:g} Predicts")
    assert got == expected == summed(cluster, "salf_gateway_requests_total", method="Predict")

    # The deployment's drift: the recording rules' PromQL (on the raw counters, not a 1 h increase) against
    # salf.contract.drift on the replicas' own summed counters.
    from salf.contract import drift

    rules = {r["record"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    live = re.sub(r"increase\((\w+)\[1h\]\)", r"\1", rules["salf:drift_live_share:1h"])
    train = rules["salf:drift_train_share"]
    psi_expr = (rules["salf:concept_drift_psi:1h"].replace("salf:drift_live_share:1h", f"({live})")
                .replace("salf:drift_train_share", f"({train})"))
    counts_by = {}
    for g in cluster.replicas:
        for s in samples(g.metrics_url):
            if s.name in ("salf_gateway_drift_bin_requests_total", "salf_gateway_drift_train_share"):
                key = (s.name, s.labels["concept"], int(s.labels["bin"]))
                counts_by[key] = counts_by.get(key, 0.0) + s.value if s.name.endswith("_total") else s.value
    concepts = sorted({c for (_, c, _) in counts_by})
    assert len(concepts) == 4
    c = np.array([[counts_by.get(("salf_gateway_drift_bin_requests_total", k, b), 0.0) for b in range(drift.BINS)]
                  for k in concepts])
    t = np.array([[counts_by[("salf_gateway_drift_train_share", k, b)] for b in range(drift.BINS)] for k in concepts])
    expect = dict(zip(concepts, drift.psi_from_counts(t, c)))
    assert c.sum() > 0

    def promql_psi():
        got = {r["metric"]["concept"]: float(r["value"][1]) for r in query(base, psi_expr)}
        return got if got.keys() == expect.keys() and all(
            abs(got[k] - expect[k]) <= 1e-6 * max(1.0, abs(expect[k])) for k in got) else None

    wait_for(promql_psi, 15, f"PromQL drift to equal salf.contract.drift's {expect}")
    assert query(base, "salf:concept_drift_psi:1h"), "the recording rule produced no series"


def test_redis_stopped_under_load_fails_no_call_and_the_gateways_go_on_locally(cluster):
    clients = [SalfClient.connect(cluster.url, timeout=20) for _ in range(8)]
    region = clients[0].region(box=(5, 5, 45, 45))
    errors_before = summed(cluster, "salf_gateway_store_errors_total")

    def work(k: int, n: int) -> None:
        c = clients[k]
        e = c.explain(encode(sample_image(1000 + 8 * n + k)), top_k=1, heatmaps="none")  # a new image each time
        c.explain_region(region, explanation_id=e.explanation_id)

    load = Load(8, work, seconds=30).start()
    try:
        time.sleep(2.0)
        calls_before = load.calls
        cluster.stop_redis()
        time.sleep(4.0)
        calls_during = load.calls - calls_before
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert calls_during > 8, "service did not go on while Redis was down"
    assert summed(cluster, "salf_gateway_store_errors_total") > errors_before
    assert any(metric_sum(g.metrics_url, "salf_gateway_store_up") == 0 for g in cluster.replicas)
    assert all("explanation store" in g.log_path.read_text() and "unavailable" in g.log_path.read_text()
               for g in cluster.replicas if metric_sum(g.metrics_url, "salf_gateway_store_up") == 0)

    cluster.start_redis()  # same port: the gateways use it again within their retry interval (1 s)
    time.sleep(1.2)
    for g in cluster.replicas:
        with SalfClient.connect(g.url) as c:
            c.explain(encode(sample_image(500 + cluster.replicas.index(g))), top_k=1, heatmaps="none")
    assert all(metric_sum(g.metrics_url, "salf_gateway_store_up") == 1 for g in cluster.replicas)
    assert all("is back" in g.log_path.read_text() for g in cluster.replicas
               if "unavailable" in g.log_path.read_text())
