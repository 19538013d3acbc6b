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
        self.cache_hits = Counter("salf_gateway_cache_hits", "concept-map cache hits", registry=r)
        self.cache_misses = Counter("salf_gateway_cache_misses", "concept-map cache misses", registry=r)
        self.model_info = Info("salf_gateway_model", "the served SALF-CBM model", registry=r)
        self._http = None

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method, code).observe(seconds)

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
