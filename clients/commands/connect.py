"""The checked client every command starts from: a remote gateway (``-u/--url``) or one started in this
process on a local ``--model-repository``, checked before anything is sent (health, metadata, backend
readiness; STYLE 9)."""
from __future__ import annotations

from salf.cli import EXIT_UNREACHABLE, CliError


def connect(url, model_repository, timeout, token, ca_cert):
    """A checked client (fail fast), or :class:`CliError` with exit code 3 and the reason."""
    import grpc

    from ..client import GatewayUnavailable, SalfClient
    from ..local import local_client

    try:
        if url:
            return SalfClient.connect(url, timeout=timeout, token=token, ca_cert=ca_cert)
        return local_client(model_repository, timeout=timeout)
    except GatewayUnavailable as exc:
        raise CliError(str(exc), EXIT_UNREACHABLE) from exc
    except grpc.RpcError as exc:
        raise CliError(f"the gateway at {url} refused the model-info request: {exc.code().name}: {exc.details()}",
                       EXIT_UNREACHABLE) from exc
    except (OSError, ValueError) as exc:  # a missing or broken local model repository
        raise CliError(f"cannot start a local gateway on {model_repository}: {exc}", EXIT_UNREACHABLE) from exc
