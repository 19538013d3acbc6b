"""Model bundle: ``bundle.json`` (metadata) + ``weights.safetensors`` (all tensors). Never pickle.

Tensor names in ``weights.safetensors``:
``backbone.*`` (the adapter's state dict), ``cbl.weight`` ``[M, D, 1, 1]``, ``head.weight`` ``[L, M]``,
``head.bias`` ``[L]``, ``concept_mean`` ``[M]``, ``concept_std`` ``[M]``.

``bundle.json`` keys (format version 1):
``format_version``, ``backbone`` (BackboneSpec dict), ``feature_dim``, ``grid`` ``[Gh, Gw]``,
``radius``, ``pooling``, ``concepts``, ``classes``, ``clip`` (``{"model", "pretrained"}`` or null),
``similarity`` (``{"source": "masks"|"clip", ...}``), ``training`` (seed, splits, dropped concepts, ...),
``metrics`` (free-form numbers), ``weights`` (``{"file", "sha256"}``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbones import BackboneSpec, build_backbone
from .model import SalfCBM
from .runtime import atomic_write_json, save_tensors, sha256_file

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "bundle.json"


class BundleError(ValueError):
    """A bundle is missing, of another format version, or corrupted."""


@dataclass
class BundleMeta:
    backbone: BackboneSpec
    feature_dim: int
    concepts: list[str]
    classes: list[str]
    grid: tuple[int, int] = (7, 7)
    radius: int = 32
    pooling: str = "avg"
    clip: dict | None = None
    similarity: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def to_json(self, sha256: str) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone.to_dict(),
            "feature_dim": int(self.feature_dim),
            "grid": [int(g) for g in self.grid],
            "radius": int(self.radius),
            "pooling": self.pooling,
            "concepts": list(self.concepts),
            "classes": list(self.classes),
            "clip": self.clip,
            "similarity": self.similarity,
            "training": self.training,
            "metrics": self.metrics,
            "weights": {"file": WEIGHTS_FILE, "sha256": sha256},
        }

    @classmethod
    def from_json(cls, d: dict) -> "BundleMeta":
        return cls(
            backbone=BackboneSpec.from_dict(d["backbone"]),
            feature_dim=int(d["feature_dim"]),
            concepts=list(d["concepts"]),
            classes=list(d["classes"]),
            grid=tuple(d["grid"]),
            radius=int(d["radius"]),
            pooling=d["pooling"],
            clip=d.get("clip"),
            similarity=d.get("similarity") or {},
            training=d.get("training") or {},
            metrics=d.get("metrics") or {},
        )


def model_state(model: SalfCBM) -> dict[str, torch.Tensor]:
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    state["cbl.weight"] = model.cbl.conv.weight
    state["head.weight"] = model.head.linear.weight
    state["head.bias"] = model.head.linear.bias
    state["concept_mean"] = model.head.concept_mean
    state["concept_std"] = model.head.concept_std
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def build_model(meta: BundleMeta) -> SalfCBM:
    """An untrained SalfCBM with the architecture that ``meta`` describes (weights not loaded)."""
    spec = BackboneSpec.from_dict({**meta.backbone.to_dict(), "weights": None})
    return SalfCBM(build_backbone(spec), meta.feature_dim, len(meta.concepts), len(meta.classes),
                   tuple(meta.grid), meta.pooling)


def save_bundle(out_dir: str | Path, model: SalfCBM, meta: BundleMeta,
                extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the bundle atomically-per-file; returns ``out_dir``. ``extra``: optional tensors stored beside
    the model's (e.g. ``drift.concept_hist``, the training concept-score histograms)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m, l = len(meta.concepts), len(meta.classes)
    if tuple(model.head.linear.weight.shape) != (l, m):
        raise BundleError(f"head weight is {tuple(model.head.linear.weight.shape)}, metadata says ({l}, {m})")
    record = save_tensors(out / WEIGHTS_FILE, {**model_state(model), **(extra or {})},
                          metadata={"format_version": str(FORMAT_VERSION)})
    atomic_write_json(out / META_FILE, meta.to_json(record["sha256"]))
    return out


def read_meta(bundle_dir: str | Path) -> tuple[BundleMeta, dict]:
    """Parse and validate ``bundle.json``; returns the metadata and the raw document."""
    path = Path(bundle_dir) / META_FILE
    if not path.is_file():
        raise BundleError(f"not a SALF-CBM bundle: {path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BundleError(f"{path} must hold a JSON object, got {type(doc).__name__}")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path} has format_version {version!r}; this build reads version {FORMAT_VERSION}")
    weights = doc.get("weights")
    # The weights entry is what the SHA-256 check rests on: it must name a file inside the bundle.
    if (not isinstance(weights, dict) or not isinstance(weights.get("file"), str)
            or not isinstance(weights.get("sha256"), str) or Path(weights["file"]).name != weights["file"]
            or weights["file"] in ("", ".", "..")):
        raise BundleError(f"{path} needs \"weights\": {{\"file\": <a file name in the bundle folder>, "
                          f"\"sha256\": <hex digest>}}, got {weights!r}")
    try:
        return BundleMeta.from_json(doc), doc
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path} is missing or has a bad field: {exc}") from exc


def load_bundle(bundle_dir: str | Path, map_location: str = "cpu") -> tuple[SalfCBM, BundleMeta]:
    """Load and verify a bundle (SHA-256 of the weights, tensor names and shapes). Model in eval mode."""
    from safetensors.torch import load_file

    meta, doc = read_meta(bundle_dir)
    wpath = Path(bundle_dir) / doc["weights"]["file"]
    if not wpath.is_file():
        raise BundleError(f"bundle weights missing: {wpath}")
    digest = sha256_file(wpath)
    if digest != doc["weights"]["sha256"]:
        raise BundleError(f"{wpath} is corrupted: SHA-256 {digest} does not match bundle.json's "
                          f"{doc['weights']['sha256']}")
    state = load_file(str(wpath), device=map_location)
    try:
        model = build_model(meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{Path(bundle_dir) / META_FILE} describes a model that cannot be built: {exc}") from exc
    load_model_state(model, state)
    return model.to(map_location).eval(), meta


def load_model_state(model: SalfCBM, state: dict[str, torch.Tensor]) -> None:
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    try:
        model.backbone.load_state_dict(backbone, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys or shape mismatches: the metadata and weights disagree
        raise BundleError(f"bundle backbone weights do not fit the backbone bundle.json describes: {exc}") from exc
    with torch.no_grad():
        for name, target in (("cbl.weight", model.cbl.conv.weight), ("head.weight", model.head.linear.weight),
                             ("head.bias", model.head.linear.bias), ("concept_mean", model.head.concept_mean),
                             ("concept_std", model.head.concept_std)):
            if name not in state:
                raise BundleError(f"bundle weights lack tensor {name!r}")
            if tuple(state[name].shape) != tuple(target.shape):
                raise BundleError(f"tensor {name!r} has shape {tuple(state[name].shape)}, expected {tuple(target.shape)}")
            target.copy_(state[name])
