"""Domain errors of the gateway. The server's error boundary maps each to one gRPC status code
(serving/status.py, ``STATUS_OF``); nothing else in serving/ knows about status codes.
"""

# Input quoted back in an error message is cut to this many characters: a 1 MB concept name must not
# turn into a 1 MB status trailer (past 16 KB the client would see RESOURCE_EXHAUSTED instead).
ECHO_CHARS = 64


def echo(value) -> str:
    """``repr`` of client input for an error message, cut to :data:`ECHO_CHARS` characters."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


class GatewayError(Exception):
    """Base class of the errors the gateway reports to clients with their message."""


class InvalidArgument(GatewayError, ValueError):
    """The request is malformed: undecodable image, wrong mask size, unknown concept, ..."""


class NotFound(GatewayError, LookupError):
    """An explanation_id is unknown or expired and no image was resent."""


class BackendUnavailable(GatewayError):
    """The inference backend (Triton) cannot be reached or has no ready model."""


class DeadlineExceeded(GatewayError):
    """The client's deadline passed before the work was done."""


class Cancelled(GatewayError):
    """The client cancelled the call (or the server is shutting down past its grace)."""


class ResourceExhausted(GatewayError):
    """The gateway is at its in-flight limit: retry later or elsewhere."""
