"""SALF-CBM gRPC gateway (``salf.v1.Gateway``). Never imports torch.

Modules: ``repository`` (what the gateway reads from an exported model repository), ``backends``
(embedded onnxruntime / Triton), ``explain`` (numpy explanation math), ``images`` (decoding, regions),
``cache`` (LRU + TTL of concept maps), ``service`` (the RPCs on plain values), ``server`` (servicer,
error-boundary interceptor, auth, TLS, health, reflection), ``metrics`` (Prometheus), ``cli``
(``salfctl serve``).
"""
