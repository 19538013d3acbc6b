"""serving/auth.py AuthInterceptor: the bearer token, health left open, refusals counted."""
import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc

from serving.auth import AuthInterceptor
from serving.metrics import GatewayMetrics

HANDLER = grpc.unary_unary_rpc_method_handler(lambda request, context: None)


def _intercept(interceptor, method, metadata):
    async def continuation(_details):
        return HANDLER

    details = SimpleNamespace(method=method, invocation_metadata=metadata)
    # a thread of its own: another test of the session (Playwright's sync API) may leave a loop running here
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, interceptor.intercept_service(continuation, details)).result(30)


def test_only_the_right_bearer_token_is_authorized():
    auth = AuthInterceptor("s3cret", GatewayMetrics())
    assert auth._authorized([("authorization", "Bearer s3cret")])
    assert auth._authorized([("x-other", "1"), ("authorization", b"Bearer s3cret")])
    assert not auth._authorized([("authorization", "Bearer wrong")])
    assert not auth._authorized([("authorization", "s3cret")])
    assert not auth._authorized(None) and not auth._authorized([])


def test_health_passes_without_a_token_and_other_methods_are_refused_and_counted():
    metrics = GatewayMetrics()
    auth = AuthInterceptor("s3cret", metrics)
    assert _intercept(auth, "/grpc.health.v1.Health/Check", None) is HANDLER
    assert _intercept(auth, "/salf.v1.Gateway/Predict", [("authorization", "Bearer s3cret")]) is HANDLER
    denied = _intercept(auth, "/salf.v1.Gateway/Predict", [("authorization", "Bearer nope")])
    assert denied is not HANDLER and denied.stream_unary is not None and denied.unary_unary is None
    assert metrics.requests.labels("Predict", "UNAUTHENTICATED")._value.get() == 1
