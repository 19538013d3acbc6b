"""The ``salf.v1.Gateway`` service as gRPC handlers: each method of the generated descriptor, behind the
admission boundary.
"""
from __future__ import annotations

import grpc

from salf import load_api

from .boundary import Boundary
from .convert import GatewayServicer

SERVICE_NAME = "salf.v1.Gateway"

GATEWAY_METHODS = ("Predict", "Explain", "ExplainRegion", "Intervene", "GetModelInfo", "GetClassRules")


def gateway_handler(servicer: GatewayServicer, boundary: Boundary, stream_window: int = 8) -> grpc.GenericRpcHandler:
    """``salf.v1.Gateway`` with every method behind ``boundary``; types from the generated descriptor."""
    pb, _ = load_api()
    service = pb.DESCRIPTOR.services_by_name["Gateway"]
    handlers = {}
    for name in GATEWAY_METHODS:
        desc = service.methods_by_name[name]
        request_type = getattr(pb, desc.input_type.name)
        response_type = getattr(pb, desc.output_type.name)
        handlers[name] = boundary.handler(name, request_type, response_type, getattr(servicer, name))
    handlers["Stream"] = boundary.stream_handler(servicer, stream_window)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
