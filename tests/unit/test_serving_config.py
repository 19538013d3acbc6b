"""serving/config.py ServeConfig: its checks and the gRPC channel options it turns into."""
from pathlib import Path

import pytest

from serving.config import ServeConfig


@pytest.mark.parametrize("field, value, message", [
    ("max_in_flight", 0, "max_in_flight must be >= 1, got 0"),
    ("stream_idle_s", 0.0, "stream_idle_s must be > 0, got 0.0"),
    ("stream_window", 0, "stream_window must be >= 1, got 0"),
])
def test_out_of_range_options_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(model_repository=Path("repo"), **{field: value})


def test_grpc_options_in_bytes_and_milliseconds():
    c = ServeConfig(model_repository=Path("repo"), max_message_mb=2, max_streams_per_connection=7,
                    max_connection_idle_s=1.5, max_connection_age_s=60.0, max_connection_age_grace_s=0.25)
    assert dict(c.grpc_options()) == {
        "grpc.max_receive_message_length": 2 * 1024 * 1024, "grpc.max_send_message_length": 2 * 1024 * 1024,
        "grpc.so_reuseport": 0, "grpc.max_concurrent_streams": 7, "grpc.max_connection_idle_ms": 1500,
        "grpc.max_connection_age_ms": 60000, "grpc.max_connection_age_grace_ms": 250}
