"""The project's shared, torch-free namespace.

- ``salf.contract``: the facts training, export, serving and the clients share (image decoding, the
  model-repository format, grid geometry, explanation math, file I/O). Hand-written, committed.
- ``salf.v1``: the gateway API, generated from ``proto/salf/v1/*.proto`` by ``make proto``
  (git-ignored).
"""


def load_api():
    """The generated gateway API modules ``(gateway_pb2, gateway_pb2_grpc)``, or an ImportError saying how to
    generate them (they are built, not committed)."""
    try:
        from salf.v1 import gateway_pb2, gateway_pb2_grpc
    except ImportError as exc:
        raise ImportError("the generated gRPC code is missing: run `make proto` (writes salf/v1/)") from exc
    return gateway_pb2, gateway_pb2_grpc
