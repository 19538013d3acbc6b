"""Training presets as data: ``training/configs/*.json`` -> a typed ``SalfConfig`` (STYLE.md point 1).

Unknown keys are rejected (not dropped) so that a typo in a preset is an error, not a silent default.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .backbones import BackboneSpec

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class BackboneTrainCfg:
    """`salfctl train backbone`: trains the backbone with a linear classifier (stand-in for pre-training)."""
    epochs: int = 8
    lr: float = 2e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    enabled: bool = False  # `train all` runs `train backbone` first (no pre-trained weights at hand)
    augment: bool = True  # random crops (pad + crop) and horizontal flips
    # [min, max] magnification of a random affine per image (with aspect change, shift and flips;
    # training/augment.py) instead of pad + crop: the backbone then sees objects at other scales.
    zoom: list[float] | None = None
    # A broader pre-training task: also predict which of the dataset's concepts each image shows
    # (image-level, from its masks; training/backbone_train.py says why).
    concept_presence: bool = False


@dataclass
class SimilarityCfg:
    source: str = "masks"  # "masks" (annotated datasets) or "clip" (red-circle prompts)
    # The paper's zero-shot localisation mode (4.2): the concept list is this template for every class
    # ("An image of a {class}", class names with "_" as spaces), the CLIP concept filters and the
    # interpretability cut-off are skipped (one map per class is the point), and a class's heatmap is
    # its concept's map. None: the ordinary concept list.
    class_concepts: str | None = None
    # masks source with class_concepts: the mask concepts whose union is a class's object (default for
    # the synthetic set: its key shapes); concept k's target is that object in images of class k.
    object_concepts: list[str] | None = None


@dataclass
class CBLCfg:
    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 256
    weight_decay: float = 0.0
    val_fraction: float = 0.1  # carved from TRAIN, seeded, recorded in the bundle
    patience: int = 5
    interpretability_cutoff: float = 0.45  # drop concepts whose val similarity is below this
    feature_cache_dtype: str = "float16"
    shard_size: int = 1024
    feature_batch_size: int = 64  # images per backbone forward while caching features
    # Cached views per train image (training/augment.py): view 0 is the image, the others random affines
    # of it with their masks warped alike, so the targets move with the image. 1 = the paper's setting.
    views: int = 1
    view_zoom: list[float] = field(default_factory=lambda: [0.6, 1.6])


@dataclass
class HeadCfg:
    alpha: float = 0.99  # elastic-net mixing: lam * (alpha*|W|_1 + (1-alpha)/2*|W|_2^2)
    lam: float | None = None  # fixed strength; None -> regularisation path
    # path points are eligible with at most target * classes non-zero weights in total (a per-class average,
    # as fit_path does); the path stops after the first point over that budget
    target_nonzero_per_class: int = 5
    path_length: int = 20
    max_iters: int = 2000
    tol: float = 1e-6
    dense: bool = False  # plain (non-sparse) multinomial regression instead
    path_min_ratio: float = 1e-3  # the path ends at lam_max * path_min_ratio
    dense_lam: float = 1e-4  # ridge strength of the dense head and of the dense baseline
    # Out of core (training/activations.py): rows per block of the fp16 activation files, and how many
    # MB of a rank's activations stay on the device between solver passes (above it, every pass streams
    # the blocks from the file, so host memory does not grow with the dataset).
    block_rows: int = 16384
    resident_mb: float = 2048.0


@dataclass
class ClipCfg:
    """CLIP stages (training/clip): concept filtering and red-circle prompt embeddings."""
    model: str = "ViT-B-16"  # any open_clip architecture, or a config in training/clip/configs
    pretrained: str | None = None  # local weights path or locally cached tag; None: random init (tests only)
    batch_size: int = 256  # prompts per forward pass
    precision: str = "auto"  # "auto": bf16 autocast on GPU, fp32 on CPU
    shard_size: int = 1024  # images per embedding shard
    device: str = "auto"
    num_workers: int | None = None  # image-decoding workers; None: 0 on CPU, up to 8 with a GPU
    compile: bool = False  # torch.compile the image encoder (GPU)
    max_concept_length: int = 30
    class_similarity_cutoff: float = 0.85
    concept_similarity_cutoff: float = 0.9
    top5_cutoff: float | None = 0.25  # Label-free CBM's CLIP cut-off; None skips the image filter


@dataclass
class SalfConfig:
    name: str = "custom"
    seed: int = 0
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    grid: tuple[int, int] = (7, 7)
    # Where the prompts' centres sit (salf/contract/grid.py): "cells" (the grid cells' centres, where the
    # bottleneck's resize samples) localised better than the paper's "stride" on every measure of
    # `make bench-quality` (docs/results.md, "Grid placement"), so it is the default; "stride" stays.
    grid_placement: str = "cells"
    radius: int = 32
    pooling: str = "avg"
    device: str = "auto"  # "auto": CUDA when available, else CPU
    num_workers: int = 0  # DataLoader worker processes for image decoding
    data: str | None = None  # dataset root (ImageFolder layout); CLI --data overrides
    concepts: str | None = None  # concept list file; default: <data>/concepts.txt
    backbone_train: BackboneTrainCfg = field(default_factory=BackboneTrainCfg)
    similarity: SimilarityCfg = field(default_factory=SimilarityCfg)
    cbl: CBLCfg = field(default_factory=CBLCfg)
    head: HeadCfg = field(default_factory=HeadCfg)
    clip: ClipCfg = field(default_factory=ClipCfg)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["backbone"] = self.backbone.to_dict()
        d["grid"] = list(self.grid)
        return d


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    if cls is BackboneSpec:
        try:
            return BackboneSpec.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{where}.{key}")
        elif key == "grid":
            kwargs[key] = tuple(int(v) for v in value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: dict, where: str = "config") -> SalfConfig:
    cfg = _build(SalfConfig, data, where)
    if cfg.pooling not in ("avg", "softmax"):
        raise ValueError(f"{where}.pooling must be 'avg' or 'softmax', got {cfg.pooling!r}")
    if cfg.grid_placement not in ("stride", "cells"):
        raise ValueError(f"{where}.grid_placement must be 'stride' or 'cells', got {cfg.grid_placement!r}")
    if cfg.similarity.source not in ("masks", "clip"):
        raise ValueError(f"{where}.similarity.source must be 'masks' or 'clip', got {cfg.similarity.source!r}")
    return cfg


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str) -> SalfConfig:
    """A preset name from ``training/configs`` (``tiny-cpu``) or a path to a JSON file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config file {name_or_path!r} and no preset of that name; "
                                f"presets: {', '.join(available_presets())}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from exc
    return config_from_dict(data, where=str(path))
