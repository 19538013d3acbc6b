"""A gateway in this process, for `salfctl` without ``--url``, the explorer and scripts: the one place
the client side starts a server (the client library itself, ``clients/client.py``, never imports the
gateway). Needs the serving extra (``pip install '.[serve]'``)."""
from __future__ import annotations

from pathlib import Path

from .client import GatewayUnavailable, SalfClient


def local_client(model_repository: str | Path, timeout: float = 30.0, triton_url: str | None = None) -> SalfClient:
    """Start a gateway in this process on a free loopback port (no metrics) and connect to it; closing the
    client stops the gateway."""
    try:
        from serving.server import GatewayServer, ServeConfig
    except ImportError as exc:
        raise GatewayUnavailable(f"running without --url needs the serving extra (pip install '.[serve]'): {exc}") from exc
    server = GatewayServer(ServeConfig(model_repository=Path(model_repository), triton_url=triton_url,
                                       host="127.0.0.1", port=0, metrics_port=None, max_in_flight=8)).start()
    return SalfClient(f"127.0.0.1:{server.port}", timeout, _server=server).checked()
