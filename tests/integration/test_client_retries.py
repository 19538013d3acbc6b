"""The client's own retries (clients/client.py RETRY_SERVICE_CONFIG): a call answered UNAVAILABLE is sent
again, up to four attempts in all, on a real gateway whose Triton is down; other codes are not retried."""
import grpc
import pytest

from clients.client import SalfClient
from tests.cluster import metric_sum
from tests.fixtures.gateway import encode, sample_image

pytestmark = pytest.mark.integration


def test_unavailable_is_retried_three_times_and_invalid_argument_never(gateway_on_dead_triton):
    gw = gateway_on_dead_triton
    count = lambda code: metric_sum(gw.metrics_url, "salf_gateway_requests_total", method="Predict", code=code)
    c = SalfClient(gw.url, timeout=20)
    try:
        before = count("UNAVAILABLE")
        with pytest.raises(grpc.RpcError) as err:
            c.predict(encode(sample_image(3)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert count("UNAVAILABLE") - before == 4
        before = count("INVALID_ARGUMENT")
        with pytest.raises(grpc.RpcError) as err:
            c.predict(b"not an image")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert count("INVALID_ARGUMENT") - before == 1
    finally:
        c.close()
