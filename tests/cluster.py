"""Helpers of the cluster tests (tests/integration/test_cluster*.py): counters read from the real
Triton's and gateways' /metrics, and a bounded load of client threads through Envoy."""
from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


def samples(url: str):
    """Every sample at a /metrics URL (prometheus_client's parser: counters as <name>_total)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        yield from family.samples


def metric_sum(url: str, name: str, **labels) -> float:
    """The sum of the samples ``name`` (with these label values) at a /metrics URL."""
    return sum(s.value for s in samples(url) if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def triton_forwards(triton) -> int:
    """Images ``salf_cbm`` ran on Triton, every version: its statistics API (exact at once; the /metrics
    counters refresh every couple of seconds)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        stats = client.get_inference_statistics("salf_cbm", as_json=True)
    return sum(int(m.get("inference_count", 0)) for m in stats.get("model_stats", []))


def gateway_forwards(g) -> float:
    return metric_sum(g.metrics_url, "salf_gateway_backend_seconds_count", model="salf_cbm")


def summed(cluster, name: str, **labels) -> float:
    return sum(metric_sum(g.metrics_url, name, **labels) for g in cluster.replicas if g.alive)


@dataclass
class Load:
    """``clients`` threads, each calling ``work(k, n)`` (client k, its n-th call) until ``stop()`` or
    ``seconds``; every exception is kept in ``failures``."""
    clients: int
    work: object
    seconds: float = 30.0
    calls: int = 0
    failures: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.clients)]

    def _run(self, k: int) -> None:
        end, n = time.monotonic() + self.seconds, 0
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                self.work(k, n)
            except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                with self._lock:
                    self.failures.append(f"client {k} call {n}: {type(exc).__name__}: {exc}")
            with self._lock:
                self.calls += 1
            n += 1

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


# ------------------------------------------------------------------ Prometheus and the dashboard

def dashboard_queries(path) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the Grafana dashboard at ``path``."""
    import json

    doc = json.loads(path.read_text())
    assert doc["schemaVersion"] >= 36 and doc["templating"]["list"][0]["type"] == "datasource"
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p["targets"]]


def query(base: str, expr: str) -> list:
    """An instant PromQL query against the Prometheus at ``base``."""
    import json
    import urllib.parse

    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        doc = json.loads(resp.read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    """``predicate()``'s first truthy value within ``timeout_s``, else AssertionError naming ``what``."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(interval_s)
