"""Domain errors of the gateway. The server's interceptor maps each to one gRPC status code
(serving/server.py, ``STATUS_OF``); nothing else in serving/ knows about status codes.
"""


class GatewayError(Exception):
    """Base class of the errors the gateway reports to clients with their message."""


class InvalidArgument(GatewayError, ValueError):
    """The request is malformed: undecodable image, wrong mask size, unknown concept, ..."""


class NotFound(GatewayError, LookupError):
    """An explanation_id is unknown or expired and no image was resent."""


class BackendUnavailable(GatewayError):
    """The inference backend (Triton) cannot be reached or has no ready model."""


class DeadlineExceeded(GatewayError):
    """The client's deadline passed before the backend answered."""
