"""Where the gateway's domain errors (serving/errors.py) become gRPC status codes, and a call's deadline
becomes the seconds a request may take: the two things every RPC path (unary and Stream) shares.
"""
from __future__ import annotations

import grpc

from . import errors

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
