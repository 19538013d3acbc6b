"""Prometheus metrics of the gateway, on their own registry and HTTP port.

One registry per gateway instance, so several gateways (tests) can live in one process.
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

log = logging.getLogger(__name__)

# Seconds; gateway requests range from sub-millisecond (rules) to seconds (large Triton batches).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    """Request count/latency per RPC and status code, in-flight requests, backend latency,
    concept-map cache hits/misses and the served model's identity."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("salf_gateway_requests", "gRPC requests by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("salf_gateway_request_seconds", "gRPC request latency by method and status code",
                                 ["method", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("salf_gateway_in_flight_requests", "gRPC requests being served", ["method"], registry=r)
        self.backend_latency = Histogram("salf_gateway_backend_seconds", "inference backend latency by model",
                                         ["backend", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.backend_bytes = Counter("salf_gateway_backend_received_bytes", "bytes received from the inference "
                                     "backend by model (Triton: response messages; embedded: output tensors)",
                                     ["backend", "model"], registry=r)
        self.cache_hits = Counter("salf_gateway_cache_hits", "concept-map cache hits", registry=r)
        self.cache_misses = Counter("salf_gateway_cache_misses", "concept-map cache misses", registry=r)
        # The shared explanation store (serving/store.py, --cache redis://): second-level hits and misses, errors
        # by operation (get/put: outage, decode: a foreign entry) and whether it is in use now.
        self.store_hits = Counter("salf_gateway_store_hits", "explanation store hits (local cache missed)", registry=r)
        self.store_misses = Counter("salf_gateway_store_misses", "explanation store misses", registry=r)
        self.store_errors = Counter("salf_gateway_store_errors", "explanation store failures by operation; each "
                                    "request still served from the local cache", ["op"], registry=r)
        self.store_up = Gauge("salf_gateway_store_up", "1 while the explanation store is in use, 0 while it is "
                              "skipped after a failure (no store configured: absent)", registry=r)
        self.model_info = Info("salf_gateway_model", "the served SALF-CBM model", registry=r)
        # Concept drift (serving/drift.py): bounded label sets, never one series per concept or class.
        self.concept_abs_z = Histogram("salf_gateway_concept_abs_z", "per request: mean |z| of its standardised "
                                       "concept scores", buckets=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0),
                                       registry=r)
        self.concept_shifted = Counter("salf_gateway_concept_shifted_requests", "requests whose mean |z| is above "
                                       "the drift threshold", registry=r)
        self.drift_window = Gauge("salf_gateway_drift_window_requests", "requests in the drift window", registry=r)
        self.drift_psi = Gauge("salf_gateway_drift_psi", "PSI of the top drifting concepts (window vs training)",
                               ["rank", "concept"], registry=r)
        self.drift_mean_z = Gauge("salf_gateway_drift_mean_z", "window mean z of the top drifting concepts",
                                  ["rank", "concept"], registry=r)
        # Across replicas (serving/drift.py): bin counts of a fixed set of concepts add up over instances.
        self.drift_bins = Counter("salf_gateway_drift_bin_requests", "requests per z bin of the tracked concepts "
                                  "(bins of salf/contract/drift.py EDGES, 0 = below -3)", ["concept", "bin"], registry=r)
        self.drift_train_share = Gauge("salf_gateway_drift_train_share", "training images' share per z bin of the "
                                       "tracked concepts", ["concept", "bin"], registry=r)
        self._http = None

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method, code).observe(seconds)

    def observe_backend(self, backend: str, model: str, seconds: float, received: int) -> None:
        self.backend_latency.labels(backend, model).observe(seconds)
        self.backend_bytes.labels(backend, model).inc(received)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the ``/metrics`` HTTP endpoint; returns the bound port (``port=0`` picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        bound = int(server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
