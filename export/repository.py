"""Bundle -> Triton model repository (docs/DESIGN.md, "Triton model repository").

```
OUT/
  salf_cbm/config.pbtxt  salf_cbm/<v>/model.onnx [model.py: python flavour] salf_model.json head.safetensors
  salf_head/config.pbtxt salf_head/<v>/model.onnx [model.py]
  salf_model.json  concepts.json  classes.json  head.safetensors   (the latest version's)
```

Each export adds the next model version ``v`` and keeps the newest ``KEEP_VERSIONS``
(``salf/contract/repository.py``). Everything is written into a staging folder inside ``OUT`` first; only when the graphs pass the ONNX
checker and parity are they moved into place, so a failed export never leaves a half-valid
repository behind (and never touches other files in ``OUT``, e.g. its README.md). Triton ignores the
plain files at the top level (it loads only sub-directories; checked with the real server).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from salf.contract import repository as contract
from salf.contract.files import atomic_write_json, sha256_file
from salf.contract.repository import (CBM_MODEL, CLASSES_FILE, CONCEPTS_FILE, CONFIG_FILE, HEAD_FILE, HEAD_MODEL,
                                      KEEP_VERSIONS, METADATA_FILE, MODELS, ONNX_FILE, PYTHON_MODEL_FILE, HeadArrays,
                                      latest_version, model_versions, read_metadata, version_dir)
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
    models: dict = field(default_factory=dict)
    version: int = 1  # the model version this export added  # name -> {"onnx", "sha256", "config", "graph"}

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
def head_arrays(model, concept_hist=None) -> HeadArrays:
    """The head of a :class:`~training.model.SalfCBM` as the contract's float32 numpy arrays (with the
    training drift histograms when the bundle has them)."""
    head = model.head
    return HeadArrays(*(t.detach().cpu().numpy() for t in (head.linear.weight, head.linear.bias,
                                                            head.concept_mean, head.concept_std)),
                      concept_hist=concept_hist)


def bundle_concept_hist(bundle_dir):
    """The bundle's ``drift.concept_hist`` ``[M, BINS]`` (numpy), or None for a bundle without it."""
    from safetensors import safe_open

    from training.bundle import WEIGHTS_FILE

    with safe_open(str(Path(bundle_dir) / WEIGHTS_FILE), framework="numpy") as fh:
        return fh.get_tensor(contract.CONCEPT_HIST) if contract.CONCEPT_HIST in fh.keys() else None


def _metadata(meta: BundleMeta, bundle_doc: dict, version: int, flavour: str, models: dict, head_sha: str,
              parity: dict | None, options: TritonOptions) -> dict:
    spec = meta.backbone
    return contract.metadata_document(
        model_version=version, flavour=flavour, input_size=spec.input_size, mean=spec.mean, std=spec.std, grid=meta.grid,
        radius=meta.radius, pooling=meta.pooling, concepts=meta.concepts, classes=meta.classes,
        backbone={"arch": spec.arch, "layer": spec.layer}, clip=meta.clip, max_batch_size=options.max_batch_size,
        opset=OPSET, models={name: {"sha256": info["sha256"], "exporter": info["exporter"], "inputs": info["inputs"],
                                    "outputs": info["outputs"]} for name, info in models.items()},
        head_sha256=head_sha, bundle_weights_sha256=bundle_doc["weights"]["sha256"], metrics=meta.metrics,
        parity=parity)


# --------------------------------------------------------------------------- flavours
def write_flavour(repo_dir: str | Path, flavour: str, options: TritonOptions | None = None) -> None:
    """(Re)write both ``config.pbtxt`` files (and ``model.py`` in every version for the python flavour)
    of an exported repository: one export, either flavour. Shapes come from the latest ``model.onnx``."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {FLAVOURS}")
    opts = options or TritonOptions()
    repo = Path(repo_dir)
    versions = model_versions(repo)
    if not versions:
        raise ExportError(f"{repo / CBM_MODEL} holds no version with a {ONNX_FILE}: export the bundle first")
    for name in MODELS:
        model_dir = repo / name
        inputs, outputs = graph_io(model_dir / str(versions[-1]) / ONNX_FILE)
        write_config(model_dir, model_config(name, flavour, inputs, outputs, opts))
    _sync_scripts(repo, flavour)
    for folder in (repo, *(version_dir(repo, v) for v in versions)):
        if (folder / METADATA_FILE).is_file():
            doc = contract.validate_metadata(json.loads((folder / METADATA_FILE).read_text()))
            doc["flavour"] = flavour
            atomic_write_json(folder / METADATA_FILE, doc)


# --------------------------------------------------------------------------- export
# Triton's python-backend stub imports model.py with bytecode writing on (it ignores
# PYTHONDONTWRITEBYTECODE) and would create __pycache__/ inside the version folder; Triton's repository
# polling takes that for a changed model and reloads it. A plain file of that name makes Python skip the
# cache silently.
PYCACHE_BLOCKER = "__pycache__"


def _sync_scripts(repo: Path, flavour: str) -> None:
    """Every version of both models gets the python flavour's ``model.py`` (and the ``__pycache__``
    blocker), or loses them: the config that says which backend runs them is one per model."""
    for version in model_versions(repo):
        for name in MODELS:
            folder = repo / name / str(version)
            script, blocker = folder / PYTHON_MODEL_FILE, folder / PYCACHE_BLOCKER
            if flavour == "python":
                if not script.is_file() or script.read_bytes() != _TEMPLATE.read_bytes():
                    shutil.copyfile(_TEMPLATE, script)
                if blocker.is_dir():
                    shutil.rmtree(blocker)
                blocker.touch()
            else:
                script.unlink(missing_ok=True)
                if blocker.is_file():
                    blocker.unlink()


def _same_io(out: Path, models: dict) -> bool:
    """Whether the new version's graphs have the latest installed version's inputs and outputs (Triton's
    config.pbtxt is per model, shared by its versions)."""
    previous = latest_version(out)
    if previous is None:
        return True
    try:
        doc = read_metadata(out, previous)
    except contract.RepositoryError:
        return False
    old = doc.get("models") or {}
    return all(old.get(name, {}).get(k) == models[name][k] for name in MODELS for k in ("inputs", "outputs"))


def _install(staging: Path, out: Path, version: int, models: dict) -> None:
    """Move the staged version into ``out`` beside the earlier ones (each version folder is renamed into
    place whole: a reader sees a version complete or not at all), then the configs and the top-level
    copies; keep the newest :data:`KEEP_VERSIONS` versions. When the graphs' inputs or outputs changed,
    the earlier versions go (one config cannot describe both)."""
    if not _same_io(out, models):
        log.warning("the new graphs' inputs/outputs differ from version %s's: earlier versions are removed "
                    "(Triton's config.pbtxt is shared by a model's versions)", latest_version(out))
        for old in model_versions(out):
            for name in MODELS:
                shutil.rmtree(out / name / str(old), ignore_errors=True)
    for name in (HEAD_MODEL, CBM_MODEL):  # salf_cbm last: its folder is what marks a version complete
        (out / name).mkdir(exist_ok=True)
        os.replace(staging / name / str(version), out / name / str(version))
        config = staging / name / CONFIG_FILE
        target = out / name / CONFIG_FILE
        if not target.is_file() or target.read_bytes() != config.read_bytes():
            os.replace(config, target)  # unchanged configs stay untouched: Triton does not reload for nothing
    for entry in (HEAD_FILE, CONCEPTS_FILE, CLASSES_FILE, METADATA_FILE):
        os.replace(staging / entry, out / entry)
    for old in model_versions(out)[:-KEEP_VERSIONS]:
        for name in MODELS:
            shutil.rmtree(out / name / str(old), ignore_errors=True)


def _real_images(paths, input_size):
    from .parity import find_images, load_images

    if paths is None:
        return None
    if isinstance(paths, (str, Path)):
        paths = find_images(paths)
    return load_images(paths, input_size)


def _model_entry(out: Path, name: str, version: int, path: Path, exporter: str) -> dict:
    """What the report and ``salf_model.json`` say about one exported graph."""
    specs_in, specs_out = graph_io(path)
    return {"onnx": str(out / name / str(version) / ONNX_FILE), "sha256": sha256_file(path), "exporter": exporter,
            "config": str(out / name / "config.pbtxt"), "graph": graph_summary(path),
            "inputs": {t.name: {"dtype": t.dtype, "dims": [-1, *t.dims]} for t in specs_in},
            "outputs": {t.name: {"dtype": t.dtype, "dims": [-1, *t.dims]} for t in specs_out}}


def _write_side_files(staging: Path, version: int, model, meta: BundleMeta, bundle_doc: dict, flavour: str,
                      models: dict, parity: dict | None, options: TritonOptions, concept_hist=None) -> None:
    """The version's ``head.safetensors`` and ``salf_model.json`` in ``salf_cbm/<v>/``, and the top-level
    copies with ``concepts.json`` and ``classes.json``."""
    own = version_dir(staging, version)
    contract.write_head(own / HEAD_FILE, head_arrays(model, concept_hist))
    doc = _metadata(meta, bundle_doc, version, flavour, models, sha256_file(own / HEAD_FILE), parity, options)
    contract.write_metadata(own, doc)
    shutil.copyfile(own / HEAD_FILE, staging / HEAD_FILE)
    contract.write_metadata(staging, doc)
    atomic_write_json(staging / CONCEPTS_FILE, list(meta.concepts))
    atomic_write_json(staging / CLASSES_FILE, list(meta.classes))


def export_repository(bundle_dir: str | Path, out_dir: str | Path, flavour: str = "onnxruntime",
                      parity: bool = True, parity_images=None, options: TritonOptions | None = None,
                      tolerance=None, exporter: str = "auto", maps_dtype: str = "float32") -> ExportReport:
    """Export a bundle to a Triton model repository; returns an :class:`ExportReport`.

    ``flavour``: ``"onnxruntime"`` (native backend) or ``"python"`` (model.py + onnxruntime).
    ``parity``: compare torch and onnxruntime (batch sizes 1 and 7, random images and ``parity_images``,
    a folder or a list of image files) and raise :class:`ExportError` if a figure is over ``tolerance``
    (:class:`export.parity.Tolerance`, default atol = rtol = 1e-4); nothing in ``out_dir`` changes then.
    ``exporter``: ``auto`` (TorchScript, dynamo when tracing fails), ``torchscript`` or ``dynamo``.
    ``maps_dtype``: ``float32`` or ``float16`` concept maps out of ``salf_cbm`` and into ``salf_head``
    (half the bytes on the Triton hop and in the gateway's cache; docs/DESIGN.md "Maps dtype").
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {FLAVOURS}")
    if maps_dtype not in contract.MAPS_DTYPES:
        raise ValueError(f"unknown maps dtype {maps_dtype!r}; choose one of {contract.MAPS_DTYPES}")
    if maps_dtype not in contract.MAPS_DTYPES:
        raise ValueError(f"unknown maps dtype {maps_dtype!r}; choose one of {contract.MAPS_DTYPES}")
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
    version = (latest_version(out) or 0) + 1
    try:
        paths = {name: staging / name / str(version) / ONNX_FILE for name in MODELS}
        exporters = {CBM_MODEL: export_cbm(model, spec.mean, spec.std, spec.input_size, paths[CBM_MODEL],
                                           exporter=exporter, maps_dtype=maps_dtype),
                     HEAD_MODEL: export_head(model.head, len(meta.concepts), meta.grid, paths[HEAD_MODEL],
                                             exporter=exporter, maps_dtype=maps_dtype)}
        figures = None
        if parity:
            from .parity import check_parity

            figures = check_parity(model, spec.mean, spec.std, spec.input_size, paths[CBM_MODEL], paths[HEAD_MODEL],
                                   real_images=real_images, tolerance=tolerance, maps_dtype=maps_dtype)
        write_flavour(staging, flavour, opts)
        models = {name: _model_entry(out, name, version, paths[name], exporters[name]) for name in MODELS}
        _write_side_files(staging, version, model, meta, bundle_doc, flavour, models, figures, opts,
                          bundle_concept_hist(bundle_dir))
        _install(staging, out, version, models)
        _sync_scripts(out, flavour)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report = ExportReport(out_dir=str(out), flavour=flavour, opset=OPSET, seconds=time.perf_counter() - started,
                          parity=figures, models=models, version=version)
    log.info("exported %s -> %s version %d (%s flavour) in %.1f s", bundle_dir, out, version, flavour,
             report.seconds)
    return report


def read_repository_metadata(repo_dir: str | Path) -> dict:
    """``salf_model.json`` of an exported repository, validated (what the gateway reads)."""
    return read_metadata(repo_dir)
