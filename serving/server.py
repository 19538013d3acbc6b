"""The gRPC gateway: a thin servicer over :class:`serving.service.Gateway`, one interceptor that is
the error boundary (exceptions -> status codes, in :data:`STATUS_OF` only), metrics and optional
bearer-token auth; plus grpc.health.v1, server reflection and optional TLS.
"""
from __future__ import annotations

import hmac
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import errors
from .backends import Backend, EmbeddedBackend, TritonBackend
from .cache import TTLCache
from .images import encode_png
from .metrics import GatewayMetrics
from salf import load_api as _pb
from salf.contract.repository import load_model_spec
from .service import ClassScore, Contribution, Activation, Edit, Gateway, Region

log = logging.getLogger(__name__)


SERVICE_NAME = "salf.v1.Gateway"

# The one place where exceptions become status codes. Anything else is INTERNAL (and logged).
STATUS_OF: dict[type[Exception], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    for kind, code in STATUS_OF.items():
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the gateway's log"


# A call without a client deadline reports ~9.2e18 s remaining (gRPC's infinite deadline). Passed on,
# that overflows: the embedded backend's cancel timer dies with OverflowError and a Triton call with
# client_timeout=9e18 fails at once with DEADLINE_EXCEEDED. Anything longer than this means "none".
NO_DEADLINE_ABOVE_S = 365 * 24 * 3600.0


def request_timeout(context) -> float | None:
    """Seconds left of the call's deadline, or None when the client set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_ABOVE_S:
        return None
    return float(remaining)


# ------------------------------------------------------------------ interceptor

def _deny_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that aborts with ``code``."""
    def abort(_request, context):
        context.abort(code, message)

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    return grpc.stream_stream_rpc_method_handler(abort, **kw)


class BoundaryInterceptor(grpc.ServerInterceptor):
    """Error boundary, metrics and auth for every unary RPC.

    Auth: with a ``token``, every method except ``grpc.health.v1`` (load balancers probe it without
    credentials) needs the metadata ``authorization: Bearer <token>``.
    """

    def __init__(self, metrics: GatewayMetrics, token: str | None = None) -> None:
        self.metrics = metrics
        self.token = token

    def _authorized(self, metadata) -> bool:
        expected = f"Bearer {self.token}".encode()
        for key, value in metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(got, expected)
        return False

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        short = method.rsplit("/", 1)[-1]
        if self.token and not method.startswith("/grpc.health.v1.") and not self._authorized(
                handler_call_details.invocation_metadata):
            self.metrics.observe_request(short, grpc.StatusCode.UNAUTHENTICATED.name, 0.0)
            return _deny_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                 "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")
        if handler.unary_unary is None:
            return handler  # streams (reflection, health Watch) pass through untouched
        return handler._replace(unary_unary=self._wrap(short, handler.unary_unary))

    def _wrap(self, method: str, behavior):
        metrics = self.metrics

        def boundary(request, context):
            metrics.in_flight.labels(method).inc()
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return behavior(request, context)
            except Exception as exc:
                code, message = status_for(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", method)
                else:
                    log.info("%s -> %s: %s", method, code.name, message)
                context.abort(code, message)
            finally:
                metrics.in_flight.labels(method).dec()
                metrics.observe_request(method, code.name, time.perf_counter() - start)

        return boundary


# ------------------------------------------------------------------ protobuf <-> domain

def region_from_pb(region) -> Region:
    kind = region.WhichOneof("kind") if region is not None else None
    if kind == "mask_png":
        return Region(mask_png=bytes(region.mask_png))
    if kind == "box":
        b = region.box
        return Region(box=(b.x0, b.y0, b.x1, b.y1))
    if kind == "points":
        return Region(points=tuple((p.x, p.y) for p in region.points.points), radius=region.points.radius)
    raise errors.InvalidArgument("region is missing: set region.mask_png, region.box or region.points")


def edit_from_pb(edit) -> Edit:
    which = edit.WhichOneof("concept")
    if which is None:
        raise errors.InvalidArgument("edit has no concept: set concept_name or concept_index")
    return Edit(region=region_from_pb(edit.region if edit.HasField("region") else None), beta=float(edit.beta),
                name=edit.concept_name if which == "concept_name" else None,
                index=edit.concept_index if which == "concept_index" else None)


def class_score_pb(pb, c: ClassScore):
    return pb.ClassScore(index=c.index, name=c.name, probability=c.probability, logit=c.logit)


def activation_pb(pb, a: Activation):
    return pb.ConceptActivation(index=a.index, name=a.name, activation=a.activation, mean_activation=a.mean_activation)


def heatmap_pb(pb, heat: np.ndarray, fmt: int):
    """Heatmap ``[h, w]`` float32 -> ``Heatmap`` with a min-max normalised 8-bit PNG and/or float16."""
    lo, hi = float(heat.min()), float(heat.max())
    out = pb.Heatmap(height=heat.shape[0], width=heat.shape[1], min=lo, max=hi)
    if fmt in (pb.HEATMAP_FORMAT_UNSPECIFIED, pb.HEATMAP_FORMAT_PNG, pb.HEATMAP_FORMAT_BOTH):
        scaled = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        out.png = encode_png(np.round(scaled * 255.0).astype(np.uint8))
    if fmt in (pb.HEATMAP_FORMAT_FLOAT16, pb.HEATMAP_FORMAT_BOTH):
        out.float16 = heat.astype("<f2").tobytes()
    return out


def contribution_pb(pb, c: Contribution, fmt: int):
    msg = pb.ConceptContribution(index=c.index, name=c.name, contribution=c.contribution, weight=c.weight,
                                 score=c.score)
    if c.heatmap is not None:
        msg.heatmap.CopyFrom(heatmap_pb(pb, c.heatmap, fmt))
    return msg


class GatewayServicer:
    """``salf.v1.Gateway``: protobuf in, :class:`Gateway` call, protobuf out. No error handling here:
    exceptions go to :class:`BoundaryInterceptor`."""

    def __init__(self, gateway: Gateway, max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self.gateway = gateway
        self.max_message_bytes = int(max_message_bytes)
        self.pb, _ = _pb()

    def Predict(self, request, context):
        classes, size = self.gateway.predict(request.image, request.top_k, request_timeout(context))
        return self.pb.PredictResponse(classes=[class_score_pb(self.pb, c) for c in classes],
                                       image_height=size[0], image_width=size[1])

    def Explain(self, request, context):
        pb = self.pb
        which = request.WhichOneof("target")
        fmt = request.heatmaps
        if fmt not in pb.HeatmapFormat.values():
            raise errors.InvalidArgument(f"heatmaps format {fmt} is not one of {list(pb.HeatmapFormat.keys())}")
        r = self.gateway.explain(request.image,
                                 class_name=request.class_name if which == "class_name" else None,
                                 class_index=request.class_index if which == "class_index" else None,
                                 top_k=request.top_k, heatmaps=fmt != pb.HEATMAP_FORMAT_NONE,
                                 timeout_s=request_timeout(context))
        response = pb.ExplainResponse(explanation_id=r.explanation_id, target=class_score_pb(pb, r.target),
                                      predictions=[class_score_pb(pb, c) for c in r.predictions],
                                      concepts=[contribution_pb(pb, c, fmt) for c in r.concepts],
                                      image_height=r.size[0], image_width=r.size[1])
        # Heatmaps grow with the image; say why instead of failing in the transport (RESOURCE_EXHAUSTED).
        size = response.ByteSize()
        if size > self.max_message_bytes:
            raise errors.InvalidArgument(
                f"the explanation would be {size / 2**20:.0f} MiB, above the gateway's {self.max_message_bytes / 2**20:.0f} MiB "
                f"message limit: ask for fewer concepts (top_k), PNG instead of float16 heatmaps, or a smaller image")
        return response

    def ExplainRegion(self, request, context):
        pb = self.pb
        region = region_from_pb(request.region if request.HasField("region") else None)
        r = self.gateway.explain_region(region, request.explanation_id, request.image, request.top_k,
                                        request_timeout(context))
        return pb.ExplainRegionResponse(explanation_id=r.explanation_id,
                                        concepts=[activation_pb(pb, a) for a in r.concepts],
                                        region_area=r.area, image_height=r.size[0], image_width=r.size[1])

    def Intervene(self, request, context):
        pb = self.pb
        edits = []
        for n, e in enumerate(request.edits):
            try:
                edits.append(edit_from_pb(e))
            except errors.InvalidArgument as exc:
                raise errors.InvalidArgument(f"edit {n}: {exc}") from None
        r = self.gateway.intervene(edits, request.explanation_id, request.image, request.top_k,
                                   request_timeout(context))
        return pb.InterveneResponse(
            explanation_id=r.explanation_id,
            before=[class_score_pb(pb, c) for c in r.before], after=[class_score_pb(pb, c) for c in r.after],
            predicted_before=class_score_pb(pb, r.predicted_before),
            predicted_after=class_score_pb(pb, r.predicted_after),
            logits_before=r.logits_before.tolist(), logits_after=r.logits_after.tolist(),
            logit_deltas=(r.logits_after - r.logits_before).tolist(),
            region_concepts=[activation_pb(pb, a) for a in r.region_concepts])

    def GetModelInfo(self, request, context):
        spec, backend = self.gateway.spec, self.gateway.backend
        return self.pb.ModelInfo(
            concepts=list(spec.concepts), classes=list(spec.classes), grid_height=spec.grid[0],
            grid_width=spec.grid[1], input_height=spec.input_size[0], input_width=spec.input_size[1],
            backend=backend.name, backend_target=backend.target, backend_ready=backend.ready(timeout_s=1.0),
            pooling=spec.pooling, radius=spec.radius, flavour=spec.flavour, bundle_sha256=spec.bundle_sha256,
            format_version=spec.format_version)

    def GetClassRules(self, request, context):
        pb, spec = self.pb, self.gateway.spec
        rules = [pb.ClassRule(class_index=l, class_name=spec.classes[l], bias=bias,
                              terms=[pb.RuleTerm(concept_index=m, concept_name=spec.concepts[m], weight=w)
                                     for m, w in terms])
                 for l, bias, terms in self.gateway.class_rules(request.class_name)]
        return pb.GetClassRulesResponse(rules=rules)


# ------------------------------------------------------------------ server

@dataclass
class ServeConfig:
    """``salfctl serve`` options. ``port=0``/``metrics_port=0`` pick free ports; ``metrics_port=None``
    disables metrics. ``tls_cert``/``tls_key`` (PEM) enable TLS; ``token`` enables bearer auth."""
    model_repository: Path
    triton_url: str | None = None
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int | None = 9464
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cache_size: int = 1024
    cache_ttl_s: float = 900.0
    max_workers: int = 8
    device: str = "cpu"
    max_message_mb: int = 64
    readiness_interval_s: float = 5.0


class GatewayServer:
    """A running gateway. ``start()`` binds and returns self; ``port``/``metrics_port`` are the
    bound ports; ``stop(grace)`` drains in-flight requests for ``grace`` seconds."""

    def __init__(self, config: ServeConfig) -> None:
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        self.config = config
        self.metrics = GatewayMetrics()
        spec = load_model_spec(config.model_repository)
        self.backend = self._make_backend(spec)
        cache = TTLCache(config.cache_size, config.cache_ttl_s, on_hit=self.metrics.cache_hits.inc,
                         on_miss=self.metrics.cache_misses.inc)
        self.gateway = Gateway(spec, self.backend, cache)
        self.metrics.model_info.info({
            "backend": self.backend.name, "backend_target": self.backend.target, "flavour": spec.flavour,
            "concepts": str(spec.num_concepts), "classes": str(spec.num_classes),
            "grid": f"{spec.grid[0]}x{spec.grid[1]}", "input_size": f"{spec.input_size[0]}x{spec.input_size[1]}",
            "pooling": spec.pooling, "bundle_sha256": spec.bundle_sha256})
        self.health = health.HealthServicer()
        self._ready: bool | None = None
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.Server | None = None

    def _make_backend(self, spec) -> Backend:
        observe = lambda backend, model, seconds: self.metrics.backend_latency.labels(backend, model).observe(seconds)
        if self.config.triton_url:
            return TritonBackend(spec, self.config.triton_url, observe=observe)
        return EmbeddedBackend(spec, device=self.config.device, observe=observe)

    def start(self) -> "GatewayServer":
        c = self.config
        _, pb_grpc = _pb()
        size = c.max_message_mb * 1024 * 1024
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=c.max_workers, thread_name_prefix="salf-gw"),
                             interceptors=[BoundaryInterceptor(self.metrics, c.token)],
                             options=[("grpc.max_receive_message_length", size),
                                      ("grpc.max_send_message_length", size)])
        pb_grpc.add_GatewayServicer_to_server(GatewayServicer(self.gateway, size), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{c.host}:{c.port}"
        try:
            try:
                if c.tls_cert is not None:
                    creds = grpc.ssl_server_credentials([(Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes())])
                    port = server.add_secure_port(address, creds)
                else:
                    port = server.add_insecure_port(address)
            except RuntimeError as exc:  # grpcio raises RuntimeError("Failed to bind ...") on a taken port
                raise OSError(f"cannot bind the gateway to {address}: {exc}") from exc
            if port == 0:
                raise OSError(f"cannot bind the gateway to {address}")
            server.start()
            self._server, self.port = server, port
            if c.metrics_port is not None:
                try:
                    self.metrics_port = self.metrics.serve(c.metrics_port, c.host)
                except OSError as exc:
                    raise OSError(f"cannot serve metrics on {c.host}:{c.metrics_port}: {exc}") from exc
        except BaseException:
            # A half-started gateway must not keep its gRPC port, Triton channel or sessions.
            server.stop(None)
            self._server = None
            self.backend.close()
            self.metrics.close()
            raise
        # "" is liveness (the process answers); the service name is readiness (its backend can infer),
        # so a load balancer or a Kubernetes gRPC probe routes away while Triton is down.
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._update_readiness()
        self._stop_watch.clear()
        self._watcher = threading.Thread(target=self._watch_readiness, name="salf-gw-readiness", daemon=True)
        self._watcher.start()
        log.info("gateway listening on %s:%d (%s backend %s, tls %s, auth %s)", c.host, port, self.backend.name,
                 self.backend.target, "on" if c.tls_cert else "off", "on" if c.token else "off")
        if c.token and c.tls_cert is None and c.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("bearer-token auth without TLS on %s: tokens travel in cleartext; "
                        "add --tls-cert/--tls-key or terminate TLS in front of the gateway", c.host)
        return self

    def _update_readiness(self) -> None:
        ready = self.backend.ready(timeout_s=1.0)
        if ready != self._ready:
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            self.health.set(SERVICE_NAME, status)
            (log.info if ready else log.warning)("%s backend %s is %s", self.backend.name, self.backend.target,
                                                 "ready" if ready else "NOT ready: health reports NOT_SERVING")
            self._ready = ready

    def _watch_readiness(self) -> None:
        while not self._stop_watch.wait(self.config.readiness_interval_s):
            try:
                self._update_readiness()
            except Exception:  # a probe must never kill the watcher; the next tick retries
                log.exception("backend readiness check failed")

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()

    def stop(self, grace: float = 2.0) -> None:
        """Report NOT_SERVING, drain for ``grace`` seconds, close the backend and metrics endpoint."""
        if self._server is None:
            return
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5.0)
            self._watcher = None
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self._server = None
        self.backend.close()
        self.metrics.close()
        log.info("gateway stopped")

    def __enter__(self) -> "GatewayServer":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
