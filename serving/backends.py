"""Inference backends of the gateway (docs/DESIGN.md, "Gateway"), numpy in and out:

``infer(images uint8 [B, H, W, 3]) -> (concept_maps [B, M, Gh, Gw], concept_scores [B, M], logits [B, L])``
``infer(images, maps=False) -> (None, concept_scores, logits)``: what Predict needs, without the maps (at the
paper's size 952 KB of the 976 KB Triton would send per image)
``infer_head(concept_maps float32 [B, M, Gh, Gw]) -> (concept_scores [B, M], logits [B, L])``

:class:`Backend` does the shared work (I/O names, deadline bookkeeping, latency metrics); each
family overrides one hook, ``_run``: :class:`EmbeddedBackend` runs onnxruntime in-process on the
repository's ONNX graphs, :class:`TritonBackend` sends the tensors to Triton with ``tritonclient.grpc``
and passes the request's remaining deadline as ``client_timeout``.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from salf.contract.repository import CBM_MODEL, CBM_OUTPUTS, CONCEPT_MAPS, HEAD_MODEL, HEAD_OUTPUTS, ModelSpec
from salf.contract.repository import CONCEPT_SCORES, LOGITS
from salf.contract.repository import CONCEPT_MAPS as HEAD_INPUT, IMAGE as CBM_INPUT

from .budget import ALARMS
from .errors import BackendUnavailable, DeadlineExceeded

log = logging.getLogger(__name__)

SCORE_OUTPUTS = (CONCEPT_SCORES, LOGITS)  # salf_cbm without its concept maps (Predict)

RECONNECT_CHANNEL_ARGS = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                          ("grpc.max_reconnect_backoff_ms", 1000)]

# (backend, model, seconds, bytes received): Triton's response message as it came over the wire, or the
# embedded session's output tensors.
LatencyObserver = Callable[[str, str, float, int], None]


class Backend:
    """Shared part of the backends. Subclasses set ``name`` and implement ``_run`` and ``ready``."""

    name = "abstract"

    def __init__(self, spec: ModelSpec, target: str, observe: LatencyObserver | None = None) -> None:
        self.spec = spec
        self.target = target
        self._observe = observe or (lambda backend, model, seconds, received: None)

    def infer(self, images: np.ndarray, timeout_s: float | None = None, maps: bool = True
              ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Full model on uint8 ``[B, H, W, 3]`` images at the model's input size. ``maps=False`` asks the
        backend for the scores and logits only (the maps come back as None)."""
        h, w = self.spec.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (h, w, 3):
            raise ValueError(f"backend input must be uint8 [B, {h}, {w}, 3], got {images.dtype} {images.shape}")
        if not maps:
            scores, logits = self._timed(CBM_MODEL, {CBM_INPUT: images}, SCORE_OUTPUTS, timeout_s)
            return None, scores, logits
        concept_maps, scores, logits = self._timed(CBM_MODEL, {CBM_INPUT: images}, CBM_OUTPUTS, timeout_s)
        return concept_maps, scores, logits

    def infer_head(self, maps: np.ndarray, timeout_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Head only (what intervention re-runs) on ``[B, M, Gh, Gw]`` concept maps, sent in the model's
        maps dtype (``spec.maps_dtype``)."""
        expected = (self.spec.num_concepts, *self.spec.grid)
        if maps.ndim != 4 or maps.shape[1:] != expected:
            raise ValueError(f"head input must be [B, {expected[0]}, {expected[1]}, {expected[2]}], got {maps.shape}")
        feed = np.ascontiguousarray(maps, dtype=self.spec.maps_dtype)
        scores, logits = self._timed(HEAD_MODEL, {HEAD_INPUT: feed}, HEAD_OUTPUTS, timeout_s)
        return scores, logits

    def _timed(self, model: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...],
               timeout_s: float | None) -> list[np.ndarray]:
        """The outputs in order: concept maps in ``spec.maps_dtype`` (float16 maps stay float16: half the
        cache), everything else float32."""
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded(f"the request's deadline passed before {model} ran")
        start = time.perf_counter()
        result, received = self._run(model, feeds, outputs, timeout_s)
        self._observe(self.name, model, time.perf_counter() - start, received)
        return [np.asarray(r, dtype=self.spec.maps_dtype if name == CONCEPT_MAPS else np.float32)
                for name, r in zip(outputs, result)]

    def _run(self, model: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...],
             timeout_s: float | None) -> tuple[list[np.ndarray], int]:
        """``outputs`` in order, and the bytes received for them."""
        raise NotImplementedError

    def ready(self, timeout_s: float = 1.0) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections/sessions (idempotent)."""


class EmbeddedBackend(Backend):
    """onnxruntime in the gateway's process on ``salf_cbm/1/model.onnx`` and ``salf_head/1/model.onnx``.

    ``device="cuda"`` asks for the CUDA execution provider first; onnxruntime falls back to the CPU
    provider when no GPU is usable. Deadlines: a timer sets ``RunOptions.terminate`` so a run that
    outlives the request's deadline is cancelled instead of occupying a worker.
    """

    name = "embedded"

    def __init__(self, spec: ModelSpec, device: str = "cpu", intra_op_threads: int = 0,
                 observe: LatencyObserver | None = None) -> None:
        import onnxruntime as ort

        super().__init__(spec, str(spec.root), observe)
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self._ort = ort
        self._sessions = {}
        for model in (CBM_MODEL, HEAD_MODEL):
            path = spec.onnx_path(model)
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist; re-export the model repository")
            self._sessions[model] = ort.InferenceSession(str(path), sess_options=self._options(model, intra_op_threads),
                                                         providers=providers)
        log.info("embedded backend: onnxruntime %s, providers %s", ort.__version__,
                 self._sessions[CBM_MODEL].get_providers())

    def _options(self, model: str, intra_op_threads: int):
        """Each session has its own intra-op thread pool, whose threads by default spin for a while after
        a run. Neither spins here: with two spinning pools on two cores, a Predict right after an
        Intervene took 130 ms instead of 95 ms, and an Intervene right after an Explain paid for the
        forward's spinning pool; without spinning the paper-size forward is the same (54.5 vs 55.0 ms)
        and the demo's 0.05 ms slower (measured). The head (a gather of ~30 weights per class, 0.65 ms
        at the paper's size) runs on one thread."""
        options = self._ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = 1 if model == HEAD_MODEL else intra_op_threads
        return options

    def _run(self, model, feeds, outputs, timeout_s):
        options = self._ort.RunOptions()
        timer = None
        if timeout_s is not None:
            timer = ALARMS.arm(timeout_s, lambda: setattr(options, "terminate", True))
        try:
            result = self._sessions[model].run(list(outputs), feeds, run_options=options)
            return result, sum(int(r.nbytes) for r in result)
        except Exception as exc:
            if options.terminate:
                raise DeadlineExceeded(f"{model} was cancelled: the request's deadline passed") from exc
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def ready(self, timeout_s: float = 1.0) -> bool:
        return bool(self._sessions)

    def close(self) -> None:
        self._sessions.clear()


class TritonBackend(Backend):
    """Triton Inference Server through ``tritonclient.grpc``; models ``salf_cbm`` and ``salf_head``.

    The gateway reads the model's metadata from its local copy of the repository, so it starts (and
    answers GetModelInfo/GetClassRules) while Triton is down; inference then fails with
    :class:`BackendUnavailable`.
    """

    name = "triton"

    def __init__(self, spec: ModelSpec, url: str, observe: LatencyObserver | None = None) -> None:
        import tritonclient.grpc as grpcclient

        super().__init__(spec, url, observe)
        self._grpcclient = grpcclient
        # gRPC's default reconnect backoff grows to 120 s, so recovery after a Triton outage took longer
        # the longer the outage (4.8 s after 10 s, 56 s after 118 s). Capped at 1 s, the channel is back
        # within ~1 s of Triton's return whatever the outage length.
        size = grpcclient.MAX_GRPC_MESSAGE_SIZE  # channel_args replaces tritonclient's defaults: keep its sizes
        self._client = grpcclient.InferenceServerClient(
            url=url, channel_args=[("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size),
                                   *RECONNECT_CHANNEL_ARGS])

    def _run(self, model, feeds, outputs, timeout_s):
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        inputs = []
        for name, array in feeds.items():
            inp = self._grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            inp.set_data_from_numpy(np.ascontiguousarray(array))
            inputs.append(inp)
        requested = [self._grpcclient.InferRequestedOutput(o) for o in outputs]
        try:
            result = self._client.infer(model, inputs, outputs=requested, client_timeout=timeout_s,
                                        model_version=str(self.spec.version))
        except InferenceServerException as exc:
            raise _translate(exc, model, self.target) from exc
        # Only the requested outputs come back (the python-backend model honours the request too): the
        # message's size is what the gateway received.
        return [result.as_numpy(o) for o in outputs], int(result.get_response().ByteSize())

    def ready(self, timeout_s: float = 1.0) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return all(self._client.is_model_ready(m, str(self.spec.version), client_timeout=timeout_s)
                       for m in (CBM_MODEL, HEAD_MODEL))
        except InferenceServerException:
            return False

    def close(self) -> None:
        self._client.close()


def _translate(exc: Exception, model: str, url: str) -> Exception:
    """Map a tritonclient error to the gateway's errors by its gRPC status."""
    status = str(exc.status() or "") if hasattr(exc, "status") else ""
    text = exc.message() if hasattr(exc, "message") else str(exc)
    if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in text:
        return DeadlineExceeded(f"Triton at {url} did not answer {model} before the request's deadline")
    if "UNAVAILABLE" in status or "NOT_FOUND" in status or "unknown model" in text or "not ready" in text:
        return BackendUnavailable(f"Triton at {url} cannot serve {model}: {text}")
    return RuntimeError(f"Triton at {url} failed on {model}: {status} {text}")
