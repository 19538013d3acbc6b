"""``config.pbtxt`` for the two Triton models, generated from the real shapes of the exported graphs.

One export, two flavours (the graph files are identical; only the config and ``model.py`` differ):

- ``onnxruntime``: ``backend: "onnxruntime"``, for NVIDIA's Triton images. GPU instances may use the
  TensorRT execution accelerator (``--tensorrt fp16|fp32``); the onnxruntime backend applies
  ``gpu_execution_accelerator`` only on GPU instances, so the same file serves CPU hosts.
- ``python``: ``backend: "python"`` with ``1/model.py`` (``export/python_backend_model.py``) running the
  same ``model.onnx`` with onnxruntime, for Triton builds that ship only the Python backend (the
  ``nvidia-pytriton`` binary used by the tests).

Instance groups default to ``KIND_AUTO``: Triton places the instance on each visible GPU and falls
back to the CPU on a host without one (checked with the pytriton binary here). ``--instance-kind cpu``
pins it to the CPU (e.g. a GPU host whose python-backend environment has only CPU onnxruntime).

The text is written by a small emitter below, not by protobuf, so that ``export`` does not depend on
tritonclient; tests (and export itself, when tritonclient is installed) parse every file with
Triton's own ``model_config_pb2``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FLAVOURS = ("onnxruntime", "python")
INSTANCE_KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
TENSORRT_PRECISIONS = ("fp32", "fp16")
_NP_TO_TRITON = {"uint8": "TYPE_UINT8", "float16": "TYPE_FP16", "float32": "TYPE_FP32"}


class Enum(str):
    """A protobuf enum value: written without quotes."""


class Comment(str):
    """Comment lines (``# ...``) written where the key stands; the key itself is not written."""


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, numpy dtype name, dims *without* the batch axis."""

    name: str
    dtype: str
    dims: tuple[int, ...]

    def triton_type(self) -> str:
        try:
            return _NP_TO_TRITON[self.dtype]
        except KeyError as exc:
            raise ValueError(f"tensor {self.name!r} has dtype {self.dtype!r}; supported: {sorted(_NP_TO_TRITON)}") from exc


# Written above dynamic_batching in every config.pbtxt whose delay is the default (make bench-batching).
BATCHING_REASON = """dynamic_batching, measured at the paper's size on 2 CPU cores (make bench-batching, docs/batching.md):
max_queue_delay_microseconds 0: requests that arrive while a batch runs (tens of ms on a CPU) queue and
merge into the next batch without any delay (see the mean batch at 32 clients); a delay did not raise
images/s beyond the run-to-run noise and a lone request waits all of it. No preferred_batch_size: the
cost per image falls smoothly with the batch size, no size is special. Rerun on a GPU before changing."""


@dataclass
class TritonOptions:
    """Serving knobs that go into both ``config.pbtxt`` files.

    ``max_queue_delay_us``: how long the dynamic batcher holds a request to merge it with later ones;
    default 0, from measurements (``BATCHING_REASON``, docs/batching.md).
    ``intra_op_threads``: onnxruntime threads per instance (0 = onnxruntime's default).
    """

    max_batch_size: int = 32
    max_queue_delay_us: int = 0
    instance_kind: str = "auto"
    instance_count: int = 1
    tensorrt: str | None = None
    intra_op_threads: int = 0
    warmup: bool = True

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 (dynamic batching needs it), got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.instance_kind not in INSTANCE_KINDS:
            raise ValueError(f"instance_kind must be one of {sorted(INSTANCE_KINDS)}, got {self.instance_kind!r}")
        if self.instance_count < 1:
            raise ValueError(f"instance_count must be >= 1, got {self.instance_count}")
        if self.tensorrt is not None and self.tensorrt not in TENSORRT_PRECISIONS:
            raise ValueError(f"tensorrt precision must be one of {TENSORRT_PRECISIONS}, got {self.tensorrt!r}")
        if self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {self.intra_op_threads}")


# --------------------------------------------------------------------------- text-format emitter
def _scalar(value) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    raise TypeError(f"cannot write {type(value).__name__} into a config.pbtxt")


def to_pbtxt(message: dict, indent: int = 0) -> str:
    """Protobuf text format of a nested dict: dict = message, list of dicts = repeated message,
    list of scalars = repeated scalar, :class:`Enum` = enum value."""
    pad = "  " * indent
    lines: list[str] = []
    for key, value in message.items():
        if value is None:
            continue
        if isinstance(value, Comment):
            lines.extend(f"{pad}# {line}".rstrip() for line in value.splitlines())
        elif isinstance(value, dict):
            lines.append(f"{pad}{key} {{")
            lines.append(to_pbtxt(value, indent + 1))
            lines.append(f"{pad}}}")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines.append(f"{pad}{key} {{")
                lines.append(to_pbtxt(item, indent + 1))
                lines.append(f"{pad}}}")
        elif isinstance(value, (list, tuple)):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


# --------------------------------------------------------------------------- configs
def _tensor(spec: TensorSpec) -> dict:
    return {"name": spec.name, "data_type": Enum(spec.triton_type()), "dims": list(spec.dims)}


def _warmup(inputs: list[TensorSpec]) -> list[dict]:
    """One batch-1 request of zeros, so the first client request does not pay session start-up."""
    return [{
        "name": "zeros_batch_1",
        "batch_size": 1,
        "inputs": [{"key": t.name, "value": {"data_type": Enum(t.triton_type()), "dims": list(t.dims),
                                              "zero_data": True}} for t in inputs],
    }]


def _tensorrt(precision: str) -> dict:
    return {"execution_accelerators": {"gpu_execution_accelerator": [{
        "name": "tensorrt",
        "parameters": [
            {"key": "precision_mode", "value": precision.upper()},
            {"key": "max_workspace_size_bytes", "value": str(1 << 30)},
            {"key": "trt_engine_cache_enable", "value": "true"},
        ],
    }]}}


def model_config(name: str, flavour: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 options: TritonOptions | None = None) -> dict:
    """The ``config.pbtxt`` of one model as a nested dict (see :func:`to_pbtxt`)."""
    opts = options or TritonOptions()
    opts.validate()
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {FLAVOURS}")
    cfg: dict = {
        "name": name,
        "backend": flavour,
        "max_batch_size": int(opts.max_batch_size),
        # The newest two: while a new version loads, the gateway's requests in flight on the previous one
        # still find it (serving/server.py switches versions once the new one is ready).
        "version_policy": {"latest": {"num_versions": 2}},
        "input": [_tensor(t) for t in inputs],
        "output": [_tensor(t) for t in outputs],
        "instance_group": [{"count": int(opts.instance_count), "kind": Enum(INSTANCE_KINDS[opts.instance_kind])}],
        "# batching": Comment(BATCHING_REASON if opts.max_queue_delay_us == TritonOptions.max_queue_delay_us else
                              f"max_queue_delay_microseconds set by salfctl export --max-queue-delay-us (the "
                              f"measured default is {TritonOptions.max_queue_delay_us}: docs/batching.md)"),
        "dynamic_batching": {"max_queue_delay_microseconds": int(opts.max_queue_delay_us)},
    }
    if flavour == "onnxruntime":
        cfg["default_model_filename"] = "model.onnx"
        if opts.tensorrt:
            cfg["optimization"] = _tensorrt(opts.tensorrt)
    # Same key for both flavours: the onnxruntime backend reads it, and so does our model.py.
    cfg["parameters"] = [{"key": "intra_op_thread_count", "value": {"string_value": str(opts.intra_op_threads)}}]
    if opts.warmup:
        cfg["model_warmup"] = _warmup(inputs)
    return cfg


def write_config(model_dir: Path, cfg: dict) -> Path:
    """Write ``model_dir/config.pbtxt``; validated with Triton's protobuf when tritonclient is installed."""
    text = to_pbtxt(cfg) + "\n"
    validate_pbtxt(text, where=str(model_dir / "config.pbtxt"))
    path = model_dir / "config.pbtxt"
    path.write_text(text)
    return path


def validate_pbtxt(text: str, where: str = "config.pbtxt"):
    """Parse ``text`` as Triton's ``ModelConfig``; returns the message, or None without tritonclient."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:  # export environments without the serve extra: the tests still validate
        log.debug("tritonclient not installed: %s not validated against ModelConfig", where)
        return None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(f"{where} is not a valid Triton ModelConfig: {exc}") from exc
