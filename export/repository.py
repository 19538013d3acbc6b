"""Bundle -> Triton model repository (docs/DESIGN.md, "Triton model repository").

```
OUT/
  salf_cbm/config.pbtxt  salf_cbm/1/model.onnx  [salf_cbm/1/model.py: python flavour]
  salf_head/config.pbtxt salf_head/1/model.onnx [salf_head/1/model.py]
  salf_model.json  concepts.json  classes.json  head.safetensors
```

Everything is written into a staging folder inside ``OUT`` first; only when the graphs pass the ONNX
checker and parity are they moved into place, so a failed export never leaves a half-valid
repository behind (and never touches other files in ``OUT``, e.g. its README.md). Triton ignores the
plain files at the top level (it loads only sub-directories; checked with the real server).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from salf.contract import repository as contract
from salf.contract.files import atomic_write_json, sha256_file
from salf.contract.repository import (CBM_MODEL, CLASSES_FILE, CONCEPTS_FILE, HEAD_FILE, HEAD_MODEL, MODEL_VERSION,
                                      MODELS, ONNX_FILE, PYTHON_MODEL_FILE, HeadArrays, read_metadata)
from training.bundle import BundleMeta, load_bundle, read_meta

from .onnx_graphs import OPSET, ExportError, export_cbm, export_head, graph_summary
from .triton_config import FLAVOURS, TensorSpec, TritonOptions, model_config, write_config

log = logging.getLogger(__name__)

_TEMPLATE = Path(__file__).with_name("python_backend_model.py")


@dataclass
class ExportReport:
    """What :func:`export_repository` wrote and measured."""

    out_dir: str
    flavour: str
    opset: int
    seconds: float
    parity: dict | None
    models: dict = field(default_factory=dict)  # name -> {"onnx", "sha256", "config", "graph"}

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- shapes
def _dims(value_info) -> tuple[str, tuple[int, ...]]:
    """``(numpy dtype name, dims without batch)`` of an ONNX value; every non-batch dim must be fixed."""
    import onnx

    tt = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    if len(dims) < 2 or any(d is None or d <= 0 for d in dims[1:]):
        raise ExportError(f"graph tensor {value_info.name!r} has shape {dims}: only the batch axis may be dynamic")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    return dtype, tuple(int(d) for d in dims[1:])


def graph_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of an ONNX graph, read from the file itself (after shape inference)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    ins = [TensorSpec(v.name, *_dims(v)) for v in model.graph.input]
    outs = [TensorSpec(v.name, *_dims(v)) for v in model.graph.output]
    return ins, outs


# --------------------------------------------------------------------------- metadata
def head_arrays(model) -> HeadArrays:
    """The head of a :class:`~training.model.SalfCBM` as the contract's float32 numpy arrays."""
    head = model.head
    return HeadArrays(*(t.detach().cpu().numpy() for t in (head.linear.weight, head.linear.bias,
                                                            head.concept_mean, head.concept_std)))


def _metadata(meta: BundleMeta, bundle_doc: dict, flavour: str, models: dict, head_sha: str,
              parity: dict | None, options: TritonOptions) -> dict:
    spec = meta.backbone
    return contract.metadata_document(
        flavour=flavour, input_size=spec.input_size, mean=spec.mean, std=spec.std, grid=meta.grid,
        radius=meta.radius, pooling=meta.pooling, concepts=meta.concepts, classes=meta.classes,
        backbone={"arch": spec.arch, "layer": spec.layer}, clip=meta.clip, max_batch_size=options.max_batch_size,
        opset=OPSET, models={name: {"sha256": info["sha256"], "exporter": info["exporter"], "inputs": info["inputs"],
                                    "outputs": info["outputs"]} for name, info in models.items()},
        head_sha256=head_sha, bundle_weights_sha256=bundle_doc["weights"]["sha256"], metrics=meta.metrics,
        parity=parity)


# --------------------------------------------------------------------------- flavours
def write_flavour(repo_dir: str | Path, flavour: str, options: TritonOptions | None = None) -> None:
    """(Re)write both ``config.pbtxt`` files (and ``model.py`` for the python flavour) of an exported
    repository: one export, either flavour. Shapes come from the ``model.onnx`` files themselves."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {FLAVOURS}")
    opts = options or TritonOptions()
    repo = Path(repo_dir)
    for name in MODELS:
        model_dir = repo / name
        onnx_path = model_dir / MODEL_VERSION / ONNX_FILE
        if not onnx_path.is_file():
            raise ExportError(f"{onnx_path} is missing: export the bundle first")
        inputs, outputs = graph_io(onnx_path)
        write_config(model_dir, model_config(name, flavour, inputs, outputs, opts))
        script = model_dir / MODEL_VERSION / PYTHON_MODEL_FILE
        if flavour == "python":
            shutil.copyfile(_TEMPLATE, script)
        elif script.exists():
            script.unlink()
    if (repo / contract.METADATA_FILE).is_file():
        doc = read_metadata(repo)
        doc["flavour"] = flavour
        contract.write_metadata(repo, doc)


# --------------------------------------------------------------------------- export
def _install(staging: Path, out: Path) -> None:
    """Move the staged models and files into ``out``, replacing earlier exports of them only."""
    for entry in sorted(staging.iterdir()):
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(entry, target)


def _real_images(paths, input_size):
    from .parity import find_images, load_images

    if paths is None:
        return None
    if isinstance(paths, (str, Path)):
        paths = find_images(paths)
    return load_images(paths, input_size)


def _model_entry(out: Path, name: str, path: Path, exporter: str) -> dict:
    """What the report and ``salf_model.json`` say about one exported graph."""
    specs_in, specs_out = graph_io(path)
    return {"onnx": str(out / name / MODEL_VERSION / ONNX_FILE), "sha256": sha256_file(path), "exporter": exporter,
            "config": str(out / name / "config.pbtxt"), "graph": graph_summary(path),
            "inputs": {t.name: {"dtype": t.dtype, "dims": [-1, *t.dims]} for t in specs_in},
            "outputs": {t.name: {"dtype": t.dtype, "dims": [-1, *t.dims]} for t in specs_out}}


def _write_side_files(staging: Path, model, meta: BundleMeta, bundle_doc: dict, flavour: str, models: dict,
                      parity: dict | None, options: TritonOptions) -> None:
    """``head.safetensors``, ``concepts.json``, ``classes.json`` and ``salf_model.json``."""
    contract.write_head(staging / HEAD_FILE, head_arrays(model))
    atomic_write_json(staging / CONCEPTS_FILE, list(meta.concepts))
    atomic_write_json(staging / CLASSES_FILE, list(meta.classes))
    contract.write_metadata(staging, _metadata(meta, bundle_doc, flavour, models, sha256_file(staging / HEAD_FILE),
                                               parity, options))


def export_repository(bundle_dir: str | Path, out_dir: str | Path, flavour: str = "onnxruntime",
                      parity: bool = True, parity_images=None, options: TritonOptions | None = None,
                      tolerance=None, exporter: str = "auto") -> ExportReport:
    """Export a bundle to a Triton model repository; returns an :class:`ExportReport`.

    ``flavour``: ``"onnxruntime"`` (native backend) or ``"python"`` (model.py + onnxruntime).
    ``parity``: compare torch and onnxruntime (batch sizes 1 and 7, random images and ``parity_images``,
    a folder or a list of image files) and raise :class:`ExportError` if a figure is over ``tolerance``
    (:class:`export.parity.Tolerance`, default atol = rtol = 1e-4); nothing in ``out_dir`` changes then.
    ``exporter``: ``auto`` (TorchScript, dynamo when tracing fails), ``torchscript`` or ``dynamo``.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {FLAVOURS}")
    opts = options or TritonOptions()
    opts.validate()
    started = time.perf_counter()
    model, meta = load_bundle(bundle_dir)
    _, bundle_doc = read_meta(bundle_dir)
    spec = meta.backbone
    real_images = _real_images(parity_images, spec.input_size) if parity else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".export-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        paths = {name: staging / name / MODEL_VERSION / ONNX_FILE for name in MODELS}
        exporters = {CBM_MODEL: export_cbm(model, spec.mean, spec.std, spec.input_size, paths[CBM_MODEL],
                                           exporter=exporter),
                     HEAD_MODEL: export_head(model.head, len(meta.concepts), meta.grid, paths[HEAD_MODEL],
                                             exporter=exporter)}
        figures = None
        if parity:
            from .parity import check_parity

            figures = check_parity(model, spec.mean, spec.std, spec.input_size, paths[CBM_MODEL], paths[HEAD_MODEL],
                                   real_images=real_images, tolerance=tolerance)
        write_flavour(staging, flavour, opts)
        models = {name: _model_entry(out, name, paths[name], exporters[name]) for name in MODELS}
        _write_side_files(staging, model, meta, bundle_doc, flavour, models, figures, opts)
        _install(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report = ExportReport(out_dir=str(out), flavour=flavour, opset=OPSET, seconds=time.perf_counter() - started,
                          parity=figures, models=models)
    log.info("exported %s -> %s (%s flavour) in %.1f s", bundle_dir, out, flavour, report.seconds)
    return report


def read_repository_metadata(repo_dir: str | Path) -> dict:
    """``salf_model.json`` of an exported repository, validated (what the gateway reads)."""
    return read_metadata(repo_dir)
