"""Bearer-token auth as a ``grpc.aio`` interceptor: it refuses at call start, before any body is read,
and leaves ``grpc.health.v1`` open for load balancers.
"""
from __future__ import annotations

import hmac

import grpc

from .metrics import GatewayMetrics


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
