"""`salfctl serve`: the gRPC gateway (see clients/salfctl.py). Heavy imports happen inside the command.

Every limit has a flag; docs/operations.md lists them with their defaults and what each failure returns.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from salf.cli import EXIT_USAGE, Repo, Token, command, configure_logging, fail

log = logging.getLogger(__name__)


def serve(
    model_repository: Repo = Path("model_repository"),
    triton: Optional[str] = typer.Option(None, "--triton", help="Triton gRPC HOST:PORT; default: embedded onnxruntime."),
    host: str = typer.Option("0.0.0.0", "--host", help="Interface of the gRPC port."),
    port: int = typer.Option(50051, "--port", help="gRPC port (0 picks a free one; the log says which)."),
    metrics_port: int = typer.Option(9464, "--metrics-port", help="Prometheus /metrics port; -1 disables it."),
    metrics_host: str = typer.Option("127.0.0.1", "--metrics-host",
                                     help="Interface of /metrics (no auth): loopback unless you open it, e.g. 0.0.0.0."),
    token: Token = None,
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate chain: serve TLS."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert."),
    cache_size: int = typer.Option(1024, "--cache-size", help="Explanations kept for ExplainRegion/Intervene."),
    cache_ttl: float = typer.Option(900.0, "--cache-ttl", help="Seconds an explanation_id stays valid."),
    cache: str = typer.Option("local", "--cache", help="Where explanations live: 'local' (this process) or "
                                                      "redis://HOST:PORT/DB, shared by every replica with the same "
                                                      "--id-key (the local cache stays the first level; a Redis "
                                                      "outage falls back to it)."),
    cache_mb: int = typer.Option(256, "--cache-mb", help="And at most this many MB of cached concept maps (an "
                                                         "explanation at the paper's size holds 930 KB)."),
    max_in_flight: int = typer.Option(64, "--max-in-flight",
                                      help="Requests worked on at once (and inference threads); beyond it "
                                           "RESOURCE_EXHAUSTED at once."),
    stream_idle: float = typer.Option(10.0, "--stream-idle", help="Seconds a call may wait for its request "
                                                                  "message before it is dropped."),
    stream_window: int = typer.Option(8, "--stream-window", help="Items of one Stream call worked on at once, "
                                                                 "unless its first message asks for another "
                                                                 "window (capped at --max-in-flight)."),
    max_streams: int = typer.Option(100, "--max-streams-per-connection", help="Concurrent calls per HTTP/2 connection."),
    max_connection_idle: float = typer.Option(300.0, "--max-connection-idle",
                                              help="Seconds a connection with no call stays open."),
    max_connection_age: float = typer.Option(1800.0, "--max-connection-age",
                                             help="Seconds before a connection is asked to reconnect (spreads "
                                                  "clients over gateways behind a load balancer)."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", help="Largest image or mask accepted, in pixels."),
    grace: float = typer.Option(25.0, "--grace", help="Seconds calls in flight get to finish on SIGTERM "
                                                      "(below Kubernetes' default 30 s termination grace)."),
    drift_window: int = typer.Option(256, "--drift-window", help="Requests in the concept-drift window "
                                                                  "(0 turns drift tracking off)."),
    drift_top: int = typer.Option(5, "--drift-top", help="Most drifting concepts exported to Prometheus."),
    drift_tracked: int = typer.Option(16, "--drift-tracked", help="Concepts (largest total |weight|) whose z-bin "
                                                                  "counts are exported: they add up across replicas "
                                                                  "(14 series each)."),
    device: str = typer.Option("cpu", "--device", help="Embedded backend: cpu or cuda (falls back to cpu)."),
    id_key: Optional[str] = typer.Option(None, "--id-key", envvar="SALF_ID_KEY", show_envvar=True,
                                         help="Secret key of content-addressed explanation ids (>= 16 characters): "
                                              "replicas sharing it give the same image the same id. Unset: a random "
                                              "key per process (one replica)."),
    replica_name: Optional[str] = typer.Option(None, "--replica-name", help="Sent as x-salf-replica metadata with "
                                                                            "every answer (default HOSTNAME:PORT)."),
    log_level: Optional[str] = typer.Option(None, "--log-level",
                                            help="DEBUG, INFO (default), WARNING or ERROR; overrides -v/-q."),
) -> None:
    """Serve the gateway: embedded onnxruntime by default, or Triton with --triton."""
    if log_level is not None:
        configure_logging(level=log_level)
    from .server import GatewayServer, ServeConfig
    from .service import Limits

    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("TLS needs both --tls-cert and --tls-key")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise typer.BadParameter(f"{path} does not exist")
    try:
        config = ServeConfig(model_repository=model_repository, triton_url=triton, host=host, port=port,
                             metrics_port=None if metrics_port < 0 else metrics_port, metrics_host=metrics_host,
                             token=token or None, tls_cert=tls_cert, tls_key=tls_key, cache_size=cache_size,
                             cache_ttl_s=cache_ttl, cache_mb=cache_mb, max_in_flight=max_in_flight, stream_idle_s=stream_idle,
                             stream_window=stream_window,
                             max_streams_per_connection=max_streams, max_connection_idle_s=max_connection_idle,
                             max_connection_age_s=max_connection_age, limits=Limits(max_pixels=max_pixels),
                             drift_window=drift_window, drift_top=drift_top, drift_tracked=drift_tracked, device=device, id_key=id_key, cache=cache,
                             replica_name=replica_name)
        server = GatewayServer(config).start()
    except (OSError, ValueError) as exc:  # RepositoryError is a ValueError; a taken port an OSError
        fail(f"cannot start the gateway: {exc}", EXIT_USAGE)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("pid %d; SIGTERM or Ctrl-C stops (health NOT_SERVING, %g s grace for calls in flight)", os.getpid(),
             grace)
    # Wake up regularly: the kernel may deliver the signal to one of gRPC's threads, and Python runs
    # its handler only when the main thread executes bytecode again (a bare wait() could sleep forever).
    while not stop.wait(0.5):
        pass
    log.info("stopping: refusing new calls, %g s for the ones in flight", grace)
    server.stop(grace=grace)


def register(app: typer.Typer) -> None:
    """Add this part's commands to the `salfctl` app."""
    command(app, "serve")(serve)
