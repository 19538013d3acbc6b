"""The gRPC gateway on ``grpc.aio``: an event loop holds every connection and stream, inference runs in
a bounded thread pool, and one error boundary turns exceptions into status codes.

Why asyncio (docs/operations.md): with a thread per call, eight clients that open a stream and send
nothing held every worker, and health checks hung behind them. Here a call costs a thread only while
its request is being *worked on*:

- Gateway RPCs are registered as stream-unary handlers over raw bytes, so the boundary runs as soon
  as the call's headers arrive. It waits at most ``stream_idle_s`` for the request message (a client
  that sends nothing is dropped with DEADLINE_EXCEEDED), parses it (malformed protobuf is
  INVALID_ARGUMENT, not INTERNAL), admits it (``max_in_flight``: beyond it RESOURCE_EXHAUSTED at once,
  nothing queues without bound) and runs the servicer method in the inference pool, whose size is the
  in-flight limit, so as many requests reach the backend at once as are admitted (Triton's dynamic
  batcher needs that concurrency).
- The request's :class:`~serving.budget.Budget` carries its deadline and is cancelled when the client
  cancels or the call is cancelled: the gateway's own loops stop at their next check.
- Health and reflection never enter the pool: they answer while inference is saturated.
- Bearer-token auth is an interceptor that refuses at call start (before any body is read).
- Shutdown (``stop(grace)``): health reports NOT_SERVING, new calls are refused, calls in flight get
  ``grace`` seconds, then the pool drains and only then the backend closes.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from salf import load_api
from salf.contract.repository import latest_version, load_model_spec

from . import errors
from .backends import Backend, EmbeddedBackend, TritonBackend
from .budget import Budget
from .cache import TTLCache
from .convert import GatewayServicer
from .metrics import GatewayMetrics
from .service import CachedMaps, Gateway, Limits

log = logging.getLogger(__name__)

SERVICE_NAME = "salf.v1.Gateway"

# The one place where exceptions become status codes. Anything else is INTERNAL (and logged).
STATUS_OF: dict[type[Exception], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
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


# ------------------------------------------------------------------ auth

def _deny_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that aborts with ``code`` as soon as the call starts (a unary method becomes a
    stream-unary one, so an unauthenticated client that sends no body is refused at once too)."""
    async def abort(_request, context):
        await context.abort(code, message)

    kw = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.unary_unary or handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    return grpc.stream_stream_rpc_method_handler(abort, **kw)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """With a ``token``, every method except ``grpc.health.v1`` (load balancers probe it without
    credentials) needs the metadata ``authorization: Bearer <token>``."""

    def __init__(self, token: str, metrics: GatewayMetrics) -> None:
        self.expected = f"Bearer {token}".encode()
        self.metrics = metrics

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(got, self.expected)
        return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc.health.v1.") or self._authorized(
                handler_call_details.invocation_metadata):
            return handler
        self.metrics.observe_request(method.rsplit("/", 1)[-1], grpc.StatusCode.UNAUTHENTICATED.name, 0.0)
        return _deny_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                             "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")


# ------------------------------------------------------------------ the error boundary

class Boundary:
    """Admission, idle-stream timeout, parsing, the inference pool, metrics and status codes for every
    Gateway RPC (module docstring)."""

    def __init__(self, metrics: GatewayMetrics, executor: futures.ThreadPoolExecutor, max_in_flight: int,
                 stream_idle_s: float) -> None:
        self.metrics = metrics
        self.executor = executor
        self.max_in_flight = int(max_in_flight)
        self.stream_idle_s = float(stream_idle_s)
        self.in_flight = 0  # touched only on the event loop
        self.draining = False  # set on shutdown: new calls are refused with UNAVAILABLE
        self._waiters: collections.deque[asyncio.Future] = collections.deque()  # stream items waiting for a slot

    def handler(self, method: str, request_type, response_type, behavior) -> grpc.RpcMethodHandler:
        async def call(request_iterator, context):
            return await self._call(method, request_type, behavior, request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(call, request_deserializer=None,
                                                    response_serializer=response_type.SerializeToString)

    async def _read(self, method: str, request_type, request_iterator):
        """The call's one request message, parsed; :class:`errors.DeadlineExceeded` when none arrives
        within ``stream_idle_s``."""
        try:
            raw = await asyncio.wait_for(request_iterator.__anext__(), self.stream_idle_s)
        except asyncio.TimeoutError:
            raise errors.DeadlineExceeded(f"no request message arrived within {self.stream_idle_s:g} s of the "
                                          f"call's start; the stream was dropped") from None
        except StopAsyncIteration:
            raise errors.InvalidArgument(f"{method} received no request message") from None
        try:
            return request_type.FromString(raw)
        except Exception as exc:  # protobuf's DecodeError, or a message it cannot parse at all
            raise errors.InvalidArgument(f"the request is not a valid {request_type.DESCRIPTOR.full_name} "
                                         f"({len(raw)} bytes): {exc}") from None

    async def _call(self, method, request_type, behavior, request_iterator, context):
        start = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        budget = Budget(request_timeout(context))
        admitted = False
        try:
            # The message first: a call that is still waiting for its body is no work yet and does not
            # count against the in-flight limit (it costs the event loop a few hundred bytes).
            request = await self._read(method, request_type, request_iterator)
            if self.draining:
                raise errors.BackendUnavailable("the gateway is shutting down; retry on another instance")
            if self.in_flight >= self.max_in_flight:
                raise errors.ResourceExhausted(f"the gateway is at its limit of {self.max_in_flight} requests in "
                                               f"flight; retry with backoff")
            admitted = True
            self.in_flight += 1
            self.metrics.in_flight.labels(method).inc()
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, behavior, request, budget)
        except asyncio.CancelledError:
            budget.cancel()  # the worker thread stops at its next check
            code = grpc.StatusCode.CANCELLED
            log.info("%s -> CANCELLED (the client went away, or the shutdown grace ended)", method)
            raise
        except Exception as exc:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error("%s failed", method, exc_info=exc)
            else:
                log.info("%s -> %s: %s", method, code.name, message)
        finally:
            if admitted:
                self._release(method)
            self.metrics.observe_request(method, code.name, time.perf_counter() - start)
        await context.abort(code, message)

    def _release(self, method: str) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.labels(method).dec()
        self._wake_next()

    def _wake_next(self) -> None:
        while self._waiters:  # the next waiting stream item, if any, takes the free slot
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def _acquire(self, method: str) -> None:
        """A slot for one stream item, waiting for one if the gateway is at its limit (a stream is
        cooperative: its window already bounds it; a unary call is refused at the limit instead)."""
        while self.in_flight >= self.max_in_flight:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_next()  # woken, then cancelled before taking the slot: pass the wake-up on
                raise
        self.in_flight += 1
        self.metrics.in_flight.labels(method).inc()

    # ---------------------------------------------------------- the Stream RPC

    def stream_handler(self, servicer: GatewayServicer, default_window: int) -> grpc.RpcMethodHandler:
        pb, _ = load_api()

        async def call(request_iterator, context):
            async for response in self._stream(pb, servicer, default_window, request_iterator, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(call, request_deserializer=None,
                                                     response_serializer=pb.StreamResponse.SerializeToString)

    async def _stream(self, pb, servicer, default_window: int, request_iterator, context):
        """Read items while fewer than the stream's window are being worked on, run each like its unary
        RPC (same servicer method, admission and status codes, but as a ``StreamError`` in its answer),
        yield answers as they complete. The stream fails as a whole only for what has no item to blame:
        a malformed message, ``stream_idle_s`` without a message while nothing is in flight, shutdown."""
        start = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        budget = Budget(request_timeout(context))  # the whole stream's deadline, shared by its items
        messages = request_iterator.__aiter__()
        window: int | None = None
        items: set[asyncio.Task] = set()
        reading: asyncio.Future | None = None
        ended = False
        try:
            while True:
                if reading is None and not ended and (window is None or len(items) < window):
                    reading = asyncio.ensure_future(messages.__anext__())
                pending = items | ({reading} if reading is not None else set())
                if not pending:
                    break
                done, _ = await asyncio.wait(pending, timeout=None if items else self.stream_idle_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise errors.DeadlineExceeded(f"no message arrived on the stream within {self.stream_idle_s:g} s "
                                                  f"while none of its items was in flight; the stream was dropped")
                for task in done:
                    if task is not reading:
                        items.discard(task)
                        yield task.result()
                        continue
                    reading = None
                    try:
                        raw = task.result()
                    except StopAsyncIteration:
                        ended = True
                        continue
                    try:
                        item = pb.StreamRequest.FromString(raw)
                    except Exception as exc:  # protobuf's DecodeError: no id to answer, the stream fails
                        raise errors.InvalidArgument(f"stream message {len(raw)} bytes is not a valid "
                                                     f"salf.v1.StreamRequest: {exc}") from None
                    if window is None:
                        window = min(int(item.window) or default_window, self.max_in_flight)
                    items.add(asyncio.ensure_future(self._stream_item(pb, servicer, item, budget)))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            log.info("Stream -> CANCELLED (the client went away, or the shutdown grace ended)")
            raise
        except Exception as exc:
            code, message = status_for(exc)
            log.info("Stream -> %s: %s", code.name, message)
        finally:
            if code is not grpc.StatusCode.OK or items:
                budget.cancel()  # items still running stop at their next check
            for task in (*items, *([reading] if reading is not None else [])):
                task.cancel()
            self.metrics.observe_request("Stream", code.name, time.perf_counter() - start)
        if code is not grpc.StatusCode.OK:
            await context.abort(code, message)

    async def _stream_item(self, pb, servicer, item, budget: Budget):
        kind = item.WhichOneof("request")
        method = f"Stream.{(kind or 'empty').capitalize()}"
        start = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        admitted = False
        try:
            if kind is None:
                raise errors.InvalidArgument("stream item has neither a predict nor an explain request")
            if self.draining:
                raise errors.BackendUnavailable("the gateway is shutting down; retry on another instance")
            await self._acquire(method)
            admitted = True
            behavior = servicer.Predict if kind == "predict" else servicer.Explain
            loop = asyncio.get_running_loop()
            response = await loop.run_in_executor(self.executor, behavior, getattr(item, kind), budget)
            return pb.StreamResponse(id=item.id, **{kind: response})
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error("%s item %r failed", method, item.id, exc_info=exc)
            return pb.StreamResponse(id=item.id, error=pb.StreamError(code=code.name, message=message))
        finally:
            if admitted:
                self._release(method)
            self.metrics.observe_request(method, code.name, time.perf_counter() - start)


GATEWAY_METHODS = ("Predict", "Explain", "ExplainRegion", "Intervene", "GetModelInfo", "GetClassRules")


def gateway_handler(servicer: GatewayServicer, boundary: Boundary, stream_window: int = 8) -> grpc.GenericRpcHandler:
    """``salf.v1.Gateway`` with every method behind ``boundary``; types from the generated descriptor."""
    pb, _ = load_api()
    service = pb.DESCRIPTOR.services_by_name["Gateway"]
    handlers = {}
    for name in GATEWAY_METHODS:
        desc = service.methods_by_name[name]
        request_type = getattr(pb, desc.input_type.name)
        response_type = getattr(pb, desc.output_type.name)
        handlers[name] = boundary.handler(name, request_type, response_type, getattr(servicer, name))
    handlers["Stream"] = boundary.stream_handler(servicer, stream_window)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


# ------------------------------------------------------------------ server

@dataclass
class ServeConfig:
    """``salfctl serve`` options (docs/operations.md lists each with its flag). ``port=0`` and
    ``metrics_port=0`` pick free ports; ``metrics_port=None`` disables metrics. ``tls_cert``/``tls_key``
    (PEM) enable TLS; ``token`` enables bearer auth."""
    model_repository: Path
    triton_url: str | None = None
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int | None = 9464
    metrics_host: str = "127.0.0.1"
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cache_size: int = 1024
    cache_ttl_s: float = 900.0
    cache_mb: int = 256  # and at most this many MB of maps (paper size: ~280 explanations of 930 KB)
    max_in_flight: int = 64
    stream_idle_s: float = 10.0
    stream_window: int = 8  # items of one Stream call worked on at once, unless its first message asks (<= max_in_flight)
    max_streams_per_connection: int = 100
    max_connection_idle_s: float = 300.0
    max_connection_age_s: float = 1800.0
    max_connection_age_grace_s: float = 30.0
    limits: Limits = Limits()
    device: str = "cpu"
    max_message_mb: int = 64
    readiness_interval_s: float = 5.0
    poll_interval_s: float = 5.0
    drift_window: int = 256  # requests in the concept-drift window (0: no drift tracking)
    drift_top: int = 5  # drifting concepts exported
    drift_interval_s: float = 2.0  # how often the repository is checked for a new model version (0: never)
    # NumPy's BLAS threads for the explanation math (None: leave the process's setting). One: OpenBLAS's
    # pool spins after each product, and on two cores that halved the next forward's speed (paper size,
    # Predict right after an Explain: 92 ms with the default pool, 61 ms with one thread, measured).
    blas_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.stream_idle_s <= 0:
            raise ValueError(f"stream_idle_s must be > 0, got {self.stream_idle_s}")
        if self.stream_window < 1:
            raise ValueError(f"stream_window must be >= 1, got {self.stream_window}")

    def grpc_options(self) -> list[tuple[str, int]]:
        size = self.max_message_mb * 1024 * 1024
        ms = lambda seconds: int(seconds * 1000)
        return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                # a second gateway on the same port must fail, not share it silently
                ("grpc.so_reuseport", 0),
                ("grpc.max_concurrent_streams", int(self.max_streams_per_connection)),
                ("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s)),
                ("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
                ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s))]


def _limit_blas(threads: int) -> None:
    """Process-wide (NumPy's BLAS has one pool per process): the gateway's own math is small products, and
    the inference threads of onnxruntime or Triton need the cores."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


class GatewayServer:
    """A running gateway. ``start()`` binds and returns self (the event loop runs in a thread of its
    own, so callers stay synchronous); ``port``/``metrics_port`` are the bound ports; ``stop(grace)``
    drains in-flight requests for ``grace`` seconds."""

    def __init__(self, config: ServeConfig) -> None:
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        self.config = config
        if config.blas_threads is not None:
            _limit_blas(config.blas_threads)
        self.metrics = GatewayMetrics()
        spec = load_model_spec(config.model_repository)
        self.backend = self._make_backend(spec)
        self.gateway = self._make_gateway(spec, self.backend)
        self._servicer: GatewayServicer | None = None
        self._refused_versions: set[int] = set()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._ready: bool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._health = None
        self._watchers: list[asyncio.Task] = []
        self._boundary: Boundary | None = None
        self._stopped = threading.Event()
        self._executor = futures.ThreadPoolExecutor(max_workers=config.max_in_flight, thread_name_prefix="salf-gw")
        # Readiness probes get a thread of their own: a saturated inference pool must not delay them.
        self._probe = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="salf-gw-probe")

    def _make_gateway(self, spec, backend: Backend) -> Gateway:
        """A :class:`Gateway` for one model version, with a cache of its own (an explanation_id belongs to
        the version that made it)."""
        c = self.config
        cache = TTLCache(c.cache_size, c.cache_ttl_s, on_hit=self.metrics.cache_hits.inc,
                         on_miss=self.metrics.cache_misses.inc, max_bytes=c.cache_mb * 1024 * 1024,
                         size_of=CachedMaps.nbytes)
        self.metrics.model_info.info({
            "backend": backend.name, "backend_target": backend.target, "flavour": spec.flavour,
            "version": str(spec.version), "concepts": str(spec.num_concepts), "classes": str(spec.num_classes),
            "grid": f"{spec.grid[0]}x{spec.grid[1]}", "input_size": f"{spec.input_size[0]}x{spec.input_size[1]}",
            "pooling": spec.pooling, "bundle_sha256": spec.bundle_sha256, "maps_dtype": spec.maps_dtype})
        from .drift import DriftTracker

        tracker = DriftTracker(spec.concepts, spec.concept_hist, c.drift_window, c.drift_top) if c.drift_window else None
        return Gateway(spec, backend, cache, c.limits, tracker, self.metrics)

    def _make_backend(self, spec) -> Backend:
        observe = lambda backend, model, seconds: self.metrics.backend_latency.labels(backend, model).observe(seconds)
        if self.config.triton_url:
            return TritonBackend(spec, self.config.triton_url, observe=observe)
        return EmbeddedBackend(spec, device=self.config.device, observe=observe)

    # ---------------------------------------------------------- start

    def start(self) -> "GatewayServer":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="salf-gw-loop", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
            if self.config.metrics_port is not None:
                c = self.config
                try:
                    self.metrics_port = self.metrics.serve(c.metrics_port, c.metrics_host)
                except OSError as exc:
                    raise OSError(f"cannot serve metrics on {c.metrics_host}:{c.metrics_port}: {exc}") from exc
        except BaseException:
            # A half-started gateway must not keep its gRPC port, Triton channel, sessions or threads.
            self._shutdown(grace=None)
            raise
        c = self.config
        log.info("gateway listening on %s:%d (%s backend %s, tls %s, auth %s, max in flight %d)", c.host, self.port,
                 self.backend.name, self.backend.target, "on" if c.tls_cert else "off", "on" if c.token else "off",
                 c.max_in_flight)
        if c.token and c.tls_cert is None and c.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("bearer-token auth without TLS on %s: tokens travel in cleartext; "
                        "add --tls-cert/--tls-key or terminate TLS in front of the gateway", c.host)
        return self

    async def _start(self) -> None:
        c = self.config
        interceptors = [AuthInterceptor(c.token, self.metrics)] if c.token else []
        server = grpc.aio.server(interceptors=interceptors, options=c.grpc_options())
        self._boundary = boundary = Boundary(self.metrics, self._executor, c.max_in_flight, c.stream_idle_s)
        self._servicer = GatewayServicer(self.gateway, c.max_message_mb * 2**20)
        server.add_generic_rpc_handlers((gateway_handler(self._servicer, boundary, c.stream_window),))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{c.host}:{c.port}"
        try:
            if c.tls_cert is not None:
                creds = grpc.ssl_server_credentials([(Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes())])
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio raises RuntimeError("Failed to bind ...") on a taken port
            raise OSError(f"cannot bind the gateway to {address}: {exc}") from exc
        if port == 0:
            raise OSError(f"cannot bind the gateway to {address} (is another gateway listening there?)")
        await server.start()
        self._server, self.port = server, port
        # "" is liveness (the process answers); the service name is readiness (its backend can infer),
        # so a load balancer or a Kubernetes gRPC probe routes away while Triton is down.
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._update_readiness()
        loop = asyncio.get_running_loop()
        self._watchers = [loop.create_task(self._every(c.readiness_interval_s, self._update_readiness))]
        if c.drift_window:
            self._watchers.append(loop.create_task(self._every(c.drift_interval_s, lambda: loop.run_in_executor(
                self._probe, lambda: self.gateway.drift.publish(self.metrics)))))
        if c.poll_interval_s > 0:  # the repository's latest version (a new export is served without a restart)
            self._watchers.append(loop.create_task(self._every(
                c.poll_interval_s, lambda: loop.run_in_executor(self._probe, self.switch_version))))

    # ---------------------------------------------------------- readiness

    async def _update_readiness(self) -> None:
        loop = asyncio.get_running_loop()
        ready = await loop.run_in_executor(self._probe, functools.partial(self.backend.ready, timeout_s=1.0))
        if ready != self._ready:
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            await self._health.set(SERVICE_NAME, status)
            (log.info if ready else log.warning)("%s backend %s is %s", self.backend.name, self.backend.target,
                                                 "ready" if ready else "NOT ready: health reports NOT_SERVING")
            self._ready = ready

    async def _every(self, seconds: float, work) -> None:
        """``await work()`` every ``seconds`` until cancelled; a failure is logged and retried next tick."""
        while True:
            await asyncio.sleep(seconds)
            await self._guarded(work())

    @staticmethod
    async def _guarded(work) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:  # a probe must never kill the watcher; the next tick retries
            log.exception("backend readiness or repository check failed")

    # ---------------------------------------------------------- model versions

    @property
    def version(self) -> int:
        return self.gateway.spec.version

    def switch_version(self) -> bool:
        """Serve the repository's latest model version if it is not the one served (a new export, or a
        rollback that removed the newest). The new version's backend must be ready first (Triton loads it
        on its own); calls in flight finish on the version they started on. Returns whether it switched."""
        latest = latest_version(self.config.model_repository)
        if latest is None or latest == self.version or latest in self._refused_versions:
            return False
        try:
            spec = load_model_spec(self.config.model_repository, latest)
            backend = self._make_backend(spec)
        except Exception as exc:
            self._refused_versions.add(latest)
            log.error("model version %d in %s cannot be served (staying on %d): %s", latest,
                      self.config.model_repository, self.version, exc)
            return False
        if not backend.ready(timeout_s=2.0):
            log.info("model version %d is not ready on the %s backend yet; serving %d meanwhile", latest,
                     backend.name, self.version)
            backend.close()
            return False
        old = self.version
        self.gateway = gateway = self._make_gateway(spec, backend)
        self.backend = backend
        if self._servicer is not None:
            self._servicer.gateway = gateway  # new calls get it; the old gateway lives on in calls in flight
        log.info("now serving model version %d (was %d)", latest, old)
        # The previous backend is not closed here: calls in flight may still use it; it is released when
        # the last of them drops its reference.
        return True

    # ---------------------------------------------------------- stop

    def wait(self) -> None:
        """Block until :meth:`stop` has finished."""
        self._stopped.wait()

    def stop(self, grace: float = 2.0) -> None:
        """Report NOT_SERVING, refuse new calls, let calls in flight finish for ``grace`` seconds (then
        cancel them), drain the inference pool, and only then close the backend and metrics endpoint."""
        if self._loop is None:
            return
        self._shutdown(grace)
        log.info("gateway stopped")

    def _shutdown(self, grace: float | None) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._stop(grace), loop).result()
            finally:
                loop.call_soon_threadsafe(loop.stop)
                self._thread.join(timeout=30.0)
        if loop is not None and not loop.is_running():
            loop.close()
        self._loop = self._thread = self._server = None
        self._executor.shutdown(wait=True)  # work already running finishes (or stops at its budget check)
        self._probe.shutdown(wait=True)
        self.backend.close()
        self.metrics.close()
        self._stopped.set()

    async def _stop(self, grace: float | None) -> None:
        for task in self._watchers:
            task.cancel()
        self._watchers = []
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        end = time.monotonic() + (grace or 0.0)
        if self._boundary is not None:
            # Refuse new work with a status a client retries elsewhere, and let the admitted work finish.
            self._boundary.draining = True
            while self._boundary.in_flight and time.monotonic() < end:
                await asyncio.sleep(0.02)
        if self._server is not None:
            await self._server.stop(None if grace is None else max(0.0, end - time.monotonic()))

    def __enter__(self) -> "GatewayServer":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
