"""What the gateway reads from an exported model repository (docs/DESIGN.md, "Triton model
repository"): ``salf_model.json`` (metadata) and ``head.safetensors`` (head weights, for
contributions and rules). The gateway needs nothing else; the ONNX graphs are the backends' business.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

META_FILE = "salf_model.json"
HEAD_FILE = "head.safetensors"
CBM_MODEL = "salf_cbm"
HEAD_MODEL = "salf_head"
SUPPORTED_FORMAT_VERSIONS = (1,)


class RepositoryError(ValueError):
    """The model repository is missing, of an unsupported format, or inconsistent."""


@dataclass(frozen=True)
class ModelSpec:
    """The served model. Head arrays: ``weight [L, M]``, ``bias [L]``, ``concept_mean [M]``,
    ``concept_std [M]``, float32."""
    root: Path
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

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def onnx_path(self, model: str) -> Path:
        return self.root / model / "1" / "model.onnx"


def _pair(value, key: str, path: Path) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise RepositoryError(f"{path}: {key!r} must be [height, width], got {value!r}") from exc
    if a < 1 or b < 1:
        raise RepositoryError(f"{path}: {key!r} must be positive, got {value!r}")
    return a, b


def _read_meta(root: Path) -> dict:
    path = root / META_FILE
    if not path.is_file():
        raise RepositoryError(f"{root} is not a SALF-CBM model repository: {path} does not exist "
                              f"(write one with `salfctl export BUNDLE --out {root}`)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RepositoryError(f"{path} is not valid JSON: {exc}") from exc
    version = doc.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise RepositoryError(f"{path} has format_version {version!r}; this gateway reads {SUPPORTED_FORMAT_VERSIONS}")
    for key in ("input_size", "grid", "pooling", "concepts", "classes"):
        if key not in doc:
            raise RepositoryError(f"{path} lacks the key {key!r}")
    return doc


def _read_head(root: Path, m: int, l: int) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = root / HEAD_FILE
    if not path.is_file():
        raise RepositoryError(f"{path} does not exist; re-export the model repository")
    tensors = load_file(str(path))
    expected = {"head.weight": (l, m), "head.bias": (l,), "concept_mean": (m,), "concept_std": (m,)}
    for name, shape in expected.items():
        if name not in tensors:
            raise RepositoryError(f"{path} lacks tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise RepositoryError(f"{path}: {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} "
                                  f"({m} concepts, {l} classes in {META_FILE})")
    arrays = {k: np.ascontiguousarray(tensors[k], dtype=np.float32) for k in expected}
    for a in arrays.values():
        a.setflags(write=False)
    return arrays


def load_model_spec(root: str | Path) -> ModelSpec:
    """Read and validate ``root/salf_model.json`` and ``root/head.safetensors``."""
    root = Path(root).resolve()
    doc = _read_meta(root)
    path = root / META_FILE
    concepts = tuple(str(c) for c in doc["concepts"])
    classes = tuple(str(c) for c in doc["classes"])
    if not concepts or not classes:
        raise RepositoryError(f"{path}: concepts and classes must be non-empty")
    head = _read_head(root, len(concepts), len(classes))
    spec = ModelSpec(
        root=root,
        format_version=int(doc["format_version"]),
        flavour=str(doc.get("flavour", "")),
        input_size=_pair(doc["input_size"], "input_size", path),
        grid=_pair(doc["grid"], "grid", path),
        radius=float(doc.get("radius", 0.0)),
        pooling=str(doc["pooling"]),
        concepts=concepts,
        classes=classes,
        bundle_sha256=str((doc.get("bundle") or {}).get("weights_sha256", "")),
        weight=head["head.weight"],
        bias=head["head.bias"],
        concept_mean=head["concept_mean"],
        concept_std=head["concept_std"],
    )
    log.info("model repository %s: %d concepts, %d classes, input %s, grid %s, %s pooling",
             root, spec.num_concepts, spec.num_classes, spec.input_size, spec.grid, spec.pooling)
    return spec
