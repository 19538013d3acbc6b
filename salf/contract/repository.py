"""The exported model repository: layout, tensor names, metadata schema and format version.

Export writes it (``export/repository.py``), the gateway reads it (``serving/``), Triton serves it;
all three take every name from here, and :func:`validate_metadata` is the one check of
``salf_model.json``, run by the writer before it writes and by the reader when it loads.

```
REPO/
  salf_cbm/config.pbtxt
  salf_cbm/<v>/model.onnx [model.py: python flavour]  salf_model.json  head.safetensors
  salf_head/config.pbtxt
  salf_head/<v>/model.onnx [model.py]
  salf_model.json  concepts.json  classes.json  head.safetensors      (copies of the latest version's)
```

Model versions: every export adds version ``v`` = latest + 1 (1 for a new repository) and keeps the
previous ones (:data:`KEEP_VERSIONS` in all). A version's metadata and head travel inside its
``salf_cbm/<v>/`` folder, so a version is complete or absent (export renames it into place), Triton
serves the latest two (``version_policy``) and a gateway that is still answering on ``v`` reads ``v``'s
own files while ``v + 1`` arrives. A repository written before versions existed (files at the top
level only, ``salf_cbm/1/``) reads as version 1.

- ``salf_cbm``: ``image`` UINT8 ``[-1, H, W, 3]`` -> ``concept_maps`` FP32 ``[-1, M, Gh, Gw]``,
  ``concept_scores`` FP32 ``[-1, M]``, ``logits`` FP32 ``[-1, L]``.
- ``salf_head``: ``concept_maps`` -> ``concept_scores``, ``logits`` (what intervention re-runs).
- ``head.safetensors``: ``head.weight [L, M]``, ``head.bias [L]``, ``concept_mean [M]``,
  ``concept_std [M]``, float32 (the gateway needs W for contributions and rules; read with
  ``safetensors.numpy``, no torch).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ContractError
from .files import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

CBM_MODEL = "salf_cbm"
HEAD_MODEL = "salf_head"
MODELS = (CBM_MODEL, HEAD_MODEL)
METADATA_FILE = "salf_model.json"
CONCEPTS_FILE = "concepts.json"
CLASSES_FILE = "classes.json"
HEAD_FILE = "head.safetensors"
ONNX_FILE = "model.onnx"
PYTHON_MODEL_FILE = "model.py"
CONFIG_FILE = "config.pbtxt"
KEEP_VERSIONS = 3  # versions an export keeps (Triton serves the latest 2; one more for rollback)

# Tensor names of the two graphs (ONNX, Triton config, gateway requests).
IMAGE = "image"
CONCEPT_MAPS = "concept_maps"
CONCEPT_SCORES = "concept_scores"
LOGITS = "logits"
CBM_INPUTS = (IMAGE,)
CBM_OUTPUTS = (CONCEPT_MAPS, CONCEPT_SCORES, LOGITS)
HEAD_INPUTS = (CONCEPT_MAPS,)
HEAD_OUTPUTS = (CONCEPT_SCORES, LOGITS)

# head.safetensors
HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
CONCEPT_MEAN = "concept_mean"
CONCEPT_STD = "concept_std"
CONCEPT_HIST = "drift.concept_hist"  # optional [M, BINS]: training share per z bin (salf/contract/drift.py)

POOLINGS = ("avg", "softmax")
FLAVOURS = ("onnxruntime", "python")
REQUIRED_KEYS = ("format_version", "input_size", "grid", "pooling", "concepts", "classes")


class RepositoryError(ContractError):
    """The model repository is missing, of an unsupported format, or inconsistent."""


def onnx_relpath(model: str, version: int | str = 1) -> str:
    """``<model>/<version>/model.onnx``, relative to the repository root."""
    return f"{model}/{version}/{ONNX_FILE}"


def model_versions(root: str | Path) -> list[int]:
    """The complete versions of a repository, ascending: numeric folders of ``salf_cbm`` holding a
    ``model.onnx`` (and their ``salf_head`` counterpart)."""
    root = Path(root)
    found = []
    for entry in (root / CBM_MODEL).iterdir() if (root / CBM_MODEL).is_dir() else ():
        if entry.name.isdigit() and (entry / ONNX_FILE).is_file() and (root / onnx_relpath(HEAD_MODEL, entry.name)).is_file():
            found.append(int(entry.name))
    return sorted(found)


def latest_version(root: str | Path) -> int | None:
    versions = model_versions(root)
    return versions[-1] if versions else None


def version_dir(root: str | Path, version: int) -> Path:
    """Where version ``version``'s metadata and head live (``salf_cbm/<v>/``)."""
    return Path(root) / CBM_MODEL / str(version)


# --------------------------------------------------------------------------- metadata
def metadata_document(*, model_version: int, flavour: str, input_size, mean, std, grid, radius, pooling: str, concepts, classes,
                      backbone: dict, clip, max_batch_size: int, opset: int, models: dict, head_sha256: str,
                      bundle_weights_sha256: str, metrics: dict, parity: dict | None) -> dict:
    """``salf_model.json`` as export writes it (validated with :func:`validate_metadata`).

    ``models``: per model name, ``{"sha256", "exporter", "inputs", "outputs"}``.
    """
    doc = {
        "format_version": FORMAT_VERSION,
        "model_version": int(model_version),
        "flavour": flavour,
        "input": {"name": IMAGE, "dtype": "uint8", "layout": "NHWC"},
        "input_size": [int(v) for v in input_size],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "grid": [int(g) for g in grid],
        "radius": int(radius),
        "pooling": pooling,
        "concepts": [str(c) for c in concepts],
        "classes": [str(c) for c in classes],
        "backbone": backbone,
        "clip": clip,
        "max_batch_size": int(max_batch_size),
        "opset": int(opset),
        "models": {name: {"onnx": onnx_relpath(name, model_version), **info} for name, info in models.items()},
        "head": {"file": HEAD_FILE, "sha256": head_sha256},
        "bundle": {"weights_sha256": bundle_weights_sha256, "metrics": metrics},
        "parity": parity,
    }
    validate_metadata(doc)
    return doc


def _pair(doc: dict, key: str, where: str) -> tuple[int, int]:
    value = doc[key]
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise RepositoryError(f"{where}: {key!r} must be [height, width], got {value!r}") from exc
    if a < 1 or b < 1:
        raise RepositoryError(f"{where}: {key!r} must be positive, got {value!r}")
    return a, b


def _names(doc: dict, key: str, where: str) -> tuple[str, ...]:
    value = doc[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RepositoryError(f"{where}: {key!r} must be a non-empty list of names")
    if len(set(value)) != len(value):
        raise RepositoryError(f"{where}: {key!r} lists a name twice")
    return tuple(value)


# dtypes the concept maps may travel in (salf_cbm's output, salf_head's input); docs/DESIGN.md "Maps dtype".
MAPS_DTYPES = ("float32", "float16")


def maps_dtype(doc: dict, where: str = METADATA_FILE) -> str:
    """The concept maps' dtype, from the graphs' own I/O as export recorded it (float32 when absent);
    ``salf_cbm``'s maps output and ``salf_head``'s maps input must agree."""
    models = doc.get("models") or {}
    cbm = (((models.get(CBM_MODEL) or {}).get("outputs") or {}).get(CONCEPT_MAPS) or {}).get("dtype", "float32")
    head = (((models.get(HEAD_MODEL) or {}).get("inputs") or {}).get(CONCEPT_MAPS) or {}).get("dtype", cbm)
    if cbm not in MAPS_DTYPES or head != cbm:
        raise RepositoryError(f"{where}: concept maps are {cbm!r} out of {CBM_MODEL} and {head!r} into {HEAD_MODEL}; "
                              f"they must be the same, one of {MAPS_DTYPES}")
    return cbm


def validate_metadata(doc, where: str = METADATA_FILE) -> dict:
    """Check ``salf_model.json``'s content; returns it. Raises :class:`RepositoryError` naming the problem
    (an unsupported ``format_version`` included: a reader must never guess at another format)."""
    if not isinstance(doc, dict):
        raise RepositoryError(f"{where} must hold a JSON object, got {type(doc).__name__}")
    version = doc.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise RepositoryError(f"{where} has format_version {version!r}; this reader supports "
                              f"{SUPPORTED_FORMAT_VERSIONS} (re-export the bundle with this release's `salfctl export`)")
    for key in REQUIRED_KEYS:
        if key not in doc:
            raise RepositoryError(f"{where} lacks the key {key!r}")
    _pair(doc, "input_size", where)
    _pair(doc, "grid", where)
    _names(doc, "concepts", where)
    _names(doc, "classes", where)
    if doc["pooling"] not in POOLINGS:
        raise RepositoryError(f"{where}: pooling {doc['pooling']!r} is not one of {POOLINGS}")
    if doc.get("flavour", "") not in ("", *FLAVOURS):
        raise RepositoryError(f"{where}: flavour {doc['flavour']!r} is not one of {FLAVOURS}")
    version = doc.get("model_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RepositoryError(f"{where}: model_version must be a positive integer, got {version!r}")
    maps_dtype(doc, where)
    return doc


def write_metadata(root: str | Path, doc: dict) -> Path:
    """Validate and write ``root/salf_model.json`` (atomically)."""
    return atomic_write_json(Path(root) / METADATA_FILE, validate_metadata(doc, str(Path(root) / METADATA_FILE)))


def read_metadata(root: str | Path, version: int | None = None) -> dict:
    """Validated ``salf_model.json`` of ``version`` (``salf_cbm/<v>/``; a repository from before versions
    has it at the top level only), or the top-level copy (the latest version's) when ``version`` is None."""
    root = Path(root)
    path = root / METADATA_FILE
    if version is not None and (version_dir(root, version) / METADATA_FILE).is_file():
        path = version_dir(root, version) / METADATA_FILE
    if not path.is_file():
        raise RepositoryError(f"{root} is not a SALF-CBM model repository: {path} does not exist "
                              f"(write one with `salfctl export BUNDLE --out {root}`)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"{path} is not valid JSON: {exc}") from exc
    return validate_metadata(doc, str(path))


# --------------------------------------------------------------------------- head arrays
@dataclass(frozen=True)
class HeadArrays:
    """The linear head and standardisation, float32: ``weight [L, M]``, ``bias [L]``,
    ``concept_mean [M]``, ``concept_std [M]``."""
    weight: np.ndarray
    bias: np.ndarray
    concept_mean: np.ndarray
    concept_std: np.ndarray
    concept_hist: np.ndarray | None = None

    def tensors(self) -> dict[str, np.ndarray]:
        out = {HEAD_WEIGHT: self.weight, HEAD_BIAS: self.bias, CONCEPT_MEAN: self.concept_mean,
               CONCEPT_STD: self.concept_std}
        if self.concept_hist is not None:
            out[CONCEPT_HIST] = self.concept_hist
        return out


def write_head(path: str | Path, head: HeadArrays) -> None:
    """``head.safetensors`` (float32, contiguous), written atomically."""
    from safetensors.numpy import save

    atomic_write_bytes(path, save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in head.tensors().items()}))


def read_head(path: str | Path, num_concepts: int, num_classes: int) -> HeadArrays:
    """Read and shape-check ``head.safetensors``; the arrays are read-only."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise RepositoryError(f"{path} does not exist; re-export the model repository")
    tensors = load_file(str(path))
    m, l = num_concepts, num_classes
    expected = {HEAD_WEIGHT: (l, m), HEAD_BIAS: (l,), CONCEPT_MEAN: (m,), CONCEPT_STD: (m,)}
    for name, shape in expected.items():
        if name not in tensors:
            raise RepositoryError(f"{path} lacks tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise RepositoryError(f"{path}: {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} "
                                  f"({m} concepts, {l} classes in {METADATA_FILE})")
    arrays = {k: np.ascontiguousarray(tensors[k], dtype=np.float32) for k in expected}
    hist = tensors.get(CONCEPT_HIST)
    if hist is not None:
        from .drift import BINS

        if tuple(hist.shape) != (m, BINS):
            raise RepositoryError(f"{path}: {CONCEPT_HIST!r} has shape {tuple(hist.shape)}, expected {(m, BINS)}")
        arrays[CONCEPT_HIST] = np.ascontiguousarray(hist, dtype=np.float32)
    for a in arrays.values():
        a.setflags(write=False)
    return HeadArrays(arrays[HEAD_WEIGHT], arrays[HEAD_BIAS], arrays[CONCEPT_MEAN], arrays[CONCEPT_STD],
                      arrays.get(CONCEPT_HIST))


# --------------------------------------------------------------------------- the served model
@dataclass(frozen=True)
class ModelSpec:
    """One version of a repository as the gateway serves it: validated metadata and the head arrays."""
    root: Path
    version: int
    format_version: int
    flavour: str
    input_size: tuple[int, int]
    grid: tuple[int, int]
    radius: float
    pooling: str
    concepts: tuple[str, ...]
    classes: tuple[str, ...]
    bundle_sha256: str
    weight: np.ndarray
    bias: np.ndarray
    concept_mean: np.ndarray
    concept_std: np.ndarray
    concept_hist: np.ndarray | None = None  # [M, BINS] training shares per z bin, when training recorded them
    maps_dtype: str = "float32"  # of salf_cbm's concept_maps output and salf_head's input (MAPS_DTYPES)

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def onnx_path(self, model: str) -> Path:
        return self.root / onnx_relpath(model, self.version)


def load_model_spec(root: str | Path, version: int | None = None) -> ModelSpec:
    """Read and validate version ``version`` (default: the latest) of the repository at ``root``: its
    ``salf_model.json`` and ``head.safetensors``."""
    root = Path(root).resolve()
    if version is None:
        version = latest_version(root) or 1
    folder = version_dir(root, version)
    own = (folder / METADATA_FILE).is_file()
    doc = read_metadata(root, version)
    where = str((folder if own else root) / METADATA_FILE)
    if own and doc.get("model_version", 1) != version:
        raise RepositoryError(f"{where} says model_version {doc.get('model_version')!r} but lies in version {version}")
    concepts, classes = _names(doc, "concepts", where), _names(doc, "classes", where)
    head = read_head((folder if own else root) / HEAD_FILE, len(concepts), len(classes))
    spec = ModelSpec(root=root, version=int(version), format_version=int(doc["format_version"]),
                     flavour=str(doc.get("flavour", "")),
                     input_size=_pair(doc, "input_size", where), grid=_pair(doc, "grid", where),
                     radius=float(doc.get("radius", 0.0)), pooling=str(doc["pooling"]),
                     concepts=concepts, classes=classes,
                     bundle_sha256=str((doc.get("bundle") or {}).get("weights_sha256", "")),
                     weight=head.weight, bias=head.bias, concept_mean=head.concept_mean,
                     concept_std=head.concept_std, concept_hist=head.concept_hist, maps_dtype=maps_dtype(doc, where))
    log.info("model repository %s version %d: %d concepts, %d classes, input %s, grid %s, %s pooling",
             root, version, spec.num_concepts, spec.num_classes, spec.input_size, spec.grid, spec.pooling)
    return spec
