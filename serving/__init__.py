"""SALF-CBM gRPC gateway (``salf.v1.Gateway``). Never imports torch.

Modules: ``backends`` (embedded onnxruntime / Triton), ``images`` (decoding, regions at the edge),
``cache`` (LRU + TTL of concept maps), ``service`` (the RPCs on plain values), ``convert`` (protobuf
<-> those values, the servicer), ``budget`` (a request's deadline and cancellation), ``errors`` (domain
errors) and ``status`` (their gRPC codes), ``boundary`` (admission, stream slots, the per-call error
boundary), ``handlers`` (the service's method table), ``auth`` (bearer-token interceptor), ``config``
(``ServeConfig``), ``versions`` (building and finding model versions), ``server`` (lifecycle: start,
TLS, health, reflection, version switching, graceful stop), ``drift`` (concept drift), ``metrics``
(Prometheus), ``cli`` (``salfctl serve``).
"""
