"""`salfctl serve`: the gRPC gateway (see clients/salfctl.py). Heavy imports happen inside the command."""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Optional

import typer

log = logging.getLogger(__name__)


def serve(
    model_repository: Path = typer.Option(Path("model_repository"), "--model-repository", "-m",
                                          help="Exported model repository (salf_model.json, head.safetensors, ONNX)."),
    triton: Optional[str] = typer.Option(None, "--triton", help="Triton gRPC HOST:PORT; default: embedded onnxruntime."),
    host: str = typer.Option("0.0.0.0", "--host", help="Interface to bind."),
    port: int = typer.Option(50051, "--port", help="gRPC port (0 picks a free one; the log says which)."),
    metrics_port: int = typer.Option(9464, "--metrics-port", help="Prometheus /metrics port; -1 disables it."),
    token: Optional[str] = typer.Option(None, "--token", envvar="SALF_TOKEN",
                                        help="Require 'authorization: Bearer TOKEN' on every RPC except health."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate chain: serve TLS."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert."),
    cache_size: int = typer.Option(1024, "--cache-size", help="Explanations kept for ExplainRegion/Intervene."),
    cache_ttl: float = typer.Option(900.0, "--cache-ttl", help="Seconds an explanation_id stays valid."),
    workers: int = typer.Option(8, "--workers", help="Concurrent requests."),
    device: str = typer.Option("cpu", "--device", help="Embedded backend: cpu or cuda (falls back to cpu)."),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Serve the gateway: embedded onnxruntime by default, or Triton with --triton."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from salf.contract.repository import RepositoryError
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
    except (RepositoryError, FileNotFoundError, OSError, ValueError) as exc:
        typer.echo(f"error: cannot start the gateway: {exc}", err=True)
        raise typer.Exit(2) from exc
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("pid %d; SIGTERM or Ctrl-C stops (2 s grace)", os.getpid())
    stop.wait()
    server.stop(grace=2.0)


def register(app: typer.Typer) -> None:
    """Add this part's commands to the top-level `salfctl` app."""
    app.command("serve")(serve)
