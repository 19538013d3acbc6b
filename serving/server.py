"""The gRPC gateway on ``grpc.aio``: an event loop holds every connection and stream, inference runs in
a bounded thread pool, and one error boundary turns exceptions into status codes. This module is the
server's lifecycle: start (bind, TLS, health, reflection, watchers), readiness flips, the repository
poll that switches model versions, and graceful stop.

Why asyncio (docs/operations.md): with a thread per call, eight clients that open a stream and send
nothing held every worker, and health checks hung behind them. Here a call costs a thread only while
its request is being *worked on*:

- Every Gateway RPC passes the admission and error boundary (serving/boundary.py) as soon as its headers
  arrive; the inference pool's size is the in-flight limit.
- Health and reflection never enter the pool: they answer while inference is saturated.
- Bearer-token auth is an interceptor that refuses at call start (serving/auth.py).
- Shutdown (``stop(grace)``): health reports NOT_SERVING, new calls are refused, calls in flight get
  ``grace`` seconds, then the pool drains and only then the backend closes.

``ServeConfig`` lives in serving/config.py and is imported here on purpose, so that
``from serving.server import GatewayServer, ServeConfig`` (the one import a caller needs) keeps working.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from salf.contract.repository import load_model_spec

from .auth import AuthInterceptor
from .boundary import Boundary
from .config import ServeConfig
from .convert import GatewayServicer
from .handlers import SERVICE_NAME, gateway_handler
from .metrics import GatewayMetrics
from .versions import ModelVersions

__all__ = ["GatewayServer", "ServeConfig"]

log = logging.getLogger(__name__)


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
        self._versions = ModelVersions(config, self.metrics)
        self.backend = self._versions.make_backend(spec)
        self.gateway = self._versions.make_gateway(spec, self.backend)
        self._servicer: GatewayServicer | None = None
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
        import socket

        boundary.replica = c.replica_name or f"{socket.gethostname()}:{port}"
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
        found = self._versions.next_ready(self.version)
        if found is None:
            return False
        spec, backend = found
        old = self.version
        self.gateway = gateway = self._versions.make_gateway(spec, backend)
        self.backend = backend
        if self._servicer is not None:
            self._servicer.gateway = gateway  # new calls get it; the old gateway lives on in calls in flight
        log.info("now serving model version %d (was %d)", spec.version, old)
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
