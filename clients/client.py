"""A small Python client of the SALF-CBM gateway (``salf.v1.Gateway``).

```python
from clients.client import SalfClient
with SalfClient.connect("localhost:50051", timeout=10) as c:     # checks health and the model first
    r = c.explain(open("cat.jpg", "rb").read(), top_k=3)
    c.explain_region(mask_png=open("roi.png", "rb").read(), explanation_id=r.explanation_id)
from clients.local import local_client
with local_client("model_repository") as c:                       # gateway in this process
    print(c.info.classes)
```
This module imports only grpc and ``salf`` (the generated API): a production caller needs neither the
gateway nor torch. The in-process gateway lives in ``clients/local.py``, which needs the serving extra.
Responses are the generated protobuf messages (``salf/v1/gateway.proto`` documents every field).
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import grpc

from salf import load_api as _pb

log = logging.getLogger(__name__)


class GatewayUnavailable(RuntimeError):
    """The gateway (or its inference backend) cannot be reached or is not ready."""


# Request metadata a balancer hashes on (deploy/envoy.yaml: ring_hash on this header): an Explain and every
# follow-up of its explanation carry the same key, so they reach the gateway that holds the maps.
AFFINITY_HEADER = "x-salf-affinity"

# gRPC retries (the channel's service config): UNAVAILABLE (a gateway restarting or draining, a balancer
# with no healthy upstream for a moment) is retried up to 3 more times with backoff, within the call's
# deadline. Every salf.v1 RPC only reads (the explanation cache is a cache), so a retry is always safe.
RETRY_SERVICE_CONFIG = {
    "methodConfig": [{
        "name": [{"service": "salf.v1.Gateway"}],
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
}


REPLICA_HEADER = "x-salf-replica"  # the gateway names itself in every answer's trailing metadata


def _replica_of(call) -> str:
    try:
        return dict(call.trailing_metadata() or ()).get(REPLICA_HEADER, "")
    except Exception:  # noqa: BLE001 - an error raised before any metadata arrived
        return ""


def affinity_key(image: bytes) -> str:
    """The affinity key of an image: a digest of its encoded bytes (what the client has before the gateway
    answers; the explanation id itself is a keyed hash of the decoded pixels that only the gateway can make)."""
    return hashlib.sha256(image).hexdigest()[:32]


class SalfClient:
    """Stubs for every RPC with a per-call deadline (``timeout`` seconds) and optional bearer token/TLS."""

    def __init__(self, url: str, timeout: float = 30.0, token: str | None = None,
                 ca_cert: str | Path | None = None, tls: bool = False, _server=None) -> None:
        self.pb, pb_grpc = _pb()
        self.url = url
        self.timeout = float(timeout)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        size = 64 * 1024 * 1024
        # Reconnect within 2 s of a restarted gateway (gRPC's default backoff grows to 120 s): a long-lived
        # client such as `salfctl ui` would otherwise answer UNAVAILABLE for minutes after it is back.
        options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                   ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000),
                   ("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG))]
        if ca_cert is not None or tls:
            roots = Path(ca_cert).read_bytes() if ca_cert is not None else None
            self.channel = grpc.secure_channel(url, grpc.ssl_channel_credentials(root_certificates=roots), options)
        else:
            self.channel = grpc.insecure_channel(url, options)
        self.stub = pb_grpc.GatewayStub(self.channel)
        self._server = _server
        self.info = None
        # explanation id -> the affinity key its Explain was sent with (bounded; a follow-up of an id that is
        # not here is keyed by the id itself)
        self._affinity: OrderedDict[str, str] = OrderedDict()
        self._affinity_lock = threading.Lock()
        self._last = threading.local()

    # ---------------------------------------------------------- construction

    @classmethod
    def connect(cls, url: str, timeout: float = 30.0, token: str | None = None,
                ca_cert: str | Path | None = None, tls: bool = False) -> "SalfClient":
        """A client whose gateway answered health and GetModelInfo (with a ready backend)."""
        return cls(url, timeout, token, ca_cert, tls).checked()

    def checked(self) -> "SalfClient":
        """``self`` after :meth:`check`; closed (and its in-process gateway stopped) if the check fails."""
        try:
            self.check()
        except BaseException:
            self.close()
            raise
        return self

    def check(self) -> None:
        """Fail fast (STYLE 9): the gateway is live, its model metadata readable, its backend ready.

        Liveness is the server-wide health (service ""); readiness is read from GetModelInfo rather than
        the service's health status so that the error can name the backend that is down."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(self.channel)
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise GatewayUnavailable(f"cannot reach the gateway at {self.url}: {exc.code().name}: {exc.details()}") from exc
        if status.status != health_pb2.HealthCheckResponse.SERVING:
            raise GatewayUnavailable(f"the gateway at {self.url} is not serving (health: "
                                     f"{health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)})")
        self.info = self.model_info()
        if not self.info.backend_ready:
            raise GatewayUnavailable(f"the gateway at {self.url} is up but its {self.info.backend} backend "
                                     f"({self.info.backend_target}) is not ready")

    @property
    def in_process(self) -> bool:
        """True when this client owns an in-process gateway (``clients.local.local_client``)."""
        return self._server is not None

    def close(self) -> None:
        self.channel.close()
        if self._server is not None:
            self._server.stop(grace=0.5)
            self._server = None

    def __enter__(self) -> "SalfClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------- RPCs

    # Seconds a call that found the gateway unreachable waits for it once more (0: fail at once). A
    # long-lived client (`salfctl ui`) sets it so that the first request after a gateway restart waits
    # for the channel's reconnection (at most 2 s away) instead of failing; every RPC is idempotent.
    reconnect_wait: float = 0.0

    AFFINITY_MEMORY = 4096  # explanation ids whose affinity key is remembered

    def affinity_for(self, explanation_id: str = "", image: bytes = b"") -> str:
        """The affinity key of a call about ``explanation_id`` and/or ``image``: the key its Explain was sent
        with when this client made it, else the image's digest, else the id."""
        if explanation_id:
            with self._affinity_lock:
                known = self._affinity.get(explanation_id)
            if known is not None:
                return known
        return affinity_key(image) if image else explanation_id

    def _remember(self, explanation_id: str, key: str) -> None:
        with self._affinity_lock:
            self._affinity[explanation_id] = key
            self._affinity.move_to_end(explanation_id)
            while len(self._affinity) > self.AFFINITY_MEMORY:
                self._affinity.popitem(last=False)

    @property
    def last_replica(self) -> str:
        """The replica (x-salf-replica) that answered this thread's last call, or failed it; "" if unknown."""
        return getattr(self._last, "replica", "")

    def _invoke(self, method, request, **kw):
        self._last.replica = ""
        try:
            response, call = method.with_call(request, **kw)
        except grpc.RpcError as exc:
            self._last.replica = _replica_of(exc)
            raise
        self._last.replica = _replica_of(call)
        return response

    def _call(self, method, request, timeout: float | None, affinity: str = ""):
        timeout = self.timeout if timeout is None else timeout
        metadata = self._metadata + (((AFFINITY_HEADER, affinity),) if affinity else ())
        try:
            return self._invoke(method, request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            if self.reconnect_wait <= 0 or exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            unavailable = exc
        try:
            return self._invoke(method, request, timeout=min(timeout, self.reconnect_wait), metadata=metadata,
                                wait_for_ready=True)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise unavailable from None  # still down: the first error says why
            raise

    def model_info(self, timeout: float | None = None):
        return self._call(self.stub.GetModelInfo, self.pb.GetModelInfoRequest(), timeout)

    def class_rules(self, class_name: str = "", timeout: float | None = None):
        return self._call(self.stub.GetClassRules, self.pb.GetClassRulesRequest(class_name=class_name), timeout)

    def predict(self, image: bytes, top_k: int = 0, timeout: float | None = None, concept_scores: bool = False):
        """``concept_scores``: also every concept's c* (``response.concept_scores``), without an explanation."""
        return self._call(self.stub.Predict, self.pb.PredictRequest(image=image, top_k=top_k,
                                                                    concept_scores=concept_scores), timeout)

    def explain(self, image: bytes, class_name: str | None = None, class_index: int | None = None, top_k: int = 0,
                heatmaps: str = "png", timeout: float | None = None, concepts: Sequence[str] = ()):
        """``heatmaps``: "png", "float16", "both" or "none". ``concepts``: also return these concepts' maps
        (``response.requested``). Sent with the image's affinity key, which the explanation's follow-ups reuse."""
        key = affinity_key(image)
        response = self._call(self.stub.Explain, self.explain_request(image, class_name, class_index, top_k, heatmaps,
                                                                      concepts), timeout, affinity=key)
        self._remember(response.explanation_id, key)
        return response

    def explain_request(self, image: bytes, class_name: str | None = None, class_index: int | None = None,
                        top_k: int = 0, heatmaps: str = "png", concepts: Sequence[str] = ()):
        """The ``ExplainRequest`` :meth:`explain` sends (for :meth:`stream`)."""
        req = self.pb.ExplainRequest(image=image, top_k=top_k, concepts=list(concepts),
                                     heatmaps=self.pb.HeatmapFormat.Value(f"HEATMAP_FORMAT_{heatmaps.upper()}"))
        if class_name:
            req.class_name = class_name
        elif class_index is not None:
            req.class_index = class_index
        return req

    def stream(self, items: Iterable[tuple[str, object]], window: int = 8, timeout: float | None = None):
        """Many Predict/Explain requests on one ``Stream`` call: ``items`` yields ``(id, PredictRequest |
        ExplainRequest)`` and is read as the gateway takes them (it may read files lazily); yields one
        ``StreamResponse`` per item in completion order, ``response.id`` naming it, a failed item as
        ``response.error`` (code name, message). ``window``: items the gateway works on at once.
        ``timeout``: for the whole stream (None: no deadline; a stream of a large folder takes long).
        A failure of the stream itself raises ``grpc.RpcError`` from the iteration."""
        def messages():
            for n, (key, request) in enumerate(items):
                if isinstance(request, self.pb.PredictRequest):
                    msg = self.pb.StreamRequest(id=key, predict=request)
                elif isinstance(request, self.pb.ExplainRequest):
                    msg = self.pb.StreamRequest(id=key, explain=request)
                else:
                    raise TypeError(f"stream items are PredictRequest or ExplainRequest, got {type(request).__name__}")
                if n == 0:
                    msg.window = int(window)
                yield msg

        return self.stub.Stream(messages(), timeout=timeout, metadata=self._metadata)

    def region(self, mask_png: bytes | None = None, box: Sequence[float] | None = None,
               points: Iterable[Sequence[float]] | None = None, radius: float = 0.0):
        """A ``Region`` message from exactly one of a mask (encoded PNG), a box (x0, y0, x1, y1) or points."""
        given = [x is not None for x in (mask_png, box, points)]
        if sum(given) != 1:
            raise ValueError("give exactly one of mask_png, box, points")
        if mask_png is not None:
            return self.pb.Region(mask_png=mask_png)
        if box is not None:
            x0, y0, x1, y1 = box
            return self.pb.Region(box=self.pb.Box(x0=x0, y0=y0, x1=x1, y1=y1))
        return self.pb.Region(points=self.pb.Points(points=[self.pb.Point(x=x, y=y) for x, y in points], radius=radius))

    def explain_region(self, region, explanation_id: str = "", image: bytes = b"", top_k: int = 0,
                       timeout: float | None = None):
        req = self.pb.ExplainRegionRequest(explanation_id=explanation_id, image=image, region=region, top_k=top_k)
        return self._call(self.stub.ExplainRegion, req, timeout, affinity=self.affinity_for(explanation_id, image))

    def edit(self, region, beta: float, concept: str | int):
        """A ``ConceptEdit``: concept by name (str) or index (int)."""
        e = self.pb.ConceptEdit(region=region, beta=beta)
        if isinstance(concept, str):
            e.concept_name = concept
        else:
            e.concept_index = int(concept)
        return e

    def intervene(self, edits: list, explanation_id: str = "", image: bytes = b"", top_k: int = 0,
                  timeout: float | None = None):
        req = self.pb.InterveneRequest(explanation_id=explanation_id, image=image, edits=edits, top_k=top_k)
        return self._call(self.stub.Intervene, req, timeout, affinity=self.affinity_for(explanation_id, image))


def by_explanation_id(call, explanation_id: str, image: bytes):
    """``call(explanation_id, image)`` with the id alone; once more with the image when the gateway no
    longer holds the id (expired, evicted, restarted: NOT_FOUND). No id: with the image at once."""
    if explanation_id:
        try:
            return call(explanation_id, b"")
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
    return call(explanation_id, image)
