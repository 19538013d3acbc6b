"""`salfctl serve`: the gRPC gateway (see clients/salfctl.py). Heavy imports happen inside the command."""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from clients.cli import EXIT_USAGE, Repo, Token, command, configure_logging, fail

log = logging.getLogger(__name__)


def serve(
    model_repository: Repo = Path("model_repository"),
    triton: Optional[str] = typer.Option(None, "--triton", help="Triton gRPC HOST:PORT; default: embedded onnxruntime."),
    host: str = typer.Option("0.0.0.0", "--host", help="Interface to bind."),
    port: int = typer.Option(50051, "--port", help="gRPC port (0 picks a free one; the log says which)."),
    metrics_port: int = typer.Option(9464, "--metrics-port", help="Prometheus /metrics port; -1 disables it."),
    token: Token = None,
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate chain: serve TLS."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert."),
    cache_size: int = typer.Option(1024, "--cache-size", help="Explanations kept for ExplainRegion/Intervene."),
    cache_ttl: float = typer.Option(900.0, "--cache-ttl", help="Seconds an explanation_id stays valid."),
    workers: int = typer.Option(8, "--workers", help="Concurrent requests."),
    device: str = typer.Option("cpu", "--device", help="Embedded backend: cpu or cuda (falls back to cpu)."),
    log_level: Optional[str] = typer.Option(None, "--log-level",
                                            help="DEBUG, INFO (default), WARNING or ERROR; overrides -v/-q."),
) -> None:
    """Serve the gateway: embedded onnxruntime by default, or Triton with --triton."""
    if log_level is not None:
        configure_logging(level=log_level)
    from .server import GatewayServer, ServeConfig

    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("TLS needs both --tls-cert and --tls-key")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise typer.BadParameter(f"{path} does not exist")
    config = ServeConfig(model_repository=model_repository, triton_url=triton, host=host, port=port,
                         metrics_port=None if metrics_port < 0 else metrics_port, token=token or None,
                         tls_cert=tls_cert, tls_key=tls_key, cache_size=cache_size, cache_ttl_s=cache_ttl,
                         max_workers=workers, device=device)
    try:
        server = GatewayServer(config).start()
    except (OSError, ValueError) as exc:  # RepositoryError is a ValueError; a taken port an OSError
        fail(f"cannot start the gateway: {exc}", EXIT_USAGE)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("pid %d; SIGTERM or Ctrl-C stops (2 s grace)", os.getpid())
    stop.wait()
    server.stop(grace=2.0)


def register(app: typer.Typer) -> None:
    """Add this part's commands to the top-level `salfctl` app."""
    command(app, "serve")(serve)
