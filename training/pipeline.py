"""The training pipeline: backbone -> features -> similarity source -> CBL -> head -> bundle -> evaluation.

Run layout (docs/DESIGN.md)::

    RUN/backbone/      backbone.safetensors + backbone.json   (when `train backbone` ran)
    RUN/features/      <split>/ fp16 feature shards + manifest.json
    RUN/similarities/  CLIP prompt-embedding shards (clip source only, written by training.clip)
    RUN/cbl/           cbl.safetensors (kept concepts' 1x1 conv) + cbl.json (concepts, split, history)
    RUN/bundle/        bundle.json + weights.safetensors
    RUN/report.json    accuracies, sparsity, concepts kept, IoU vs baseline, explanation, timings

Each stage reads what the previous one wrote, so `salfctl train cbl` and `salfctl train head` can
run separately; `train all` runs them in order.
"""
from __future__ import annotations

import contextlib
import json
import math
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .backbones import BackboneSpec, build_backbone
from .config import SalfConfig
from .data.folder import read_dataset_info
from .explain import Explanation
from .runtime import atomic_write_json, resolve_device, save_tensors

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A stage cannot run: missing input from an earlier stage, or a bad dataset/config combination."""


@dataclass
class RunPaths:
    root: Path

    @property
    def backbone(self) -> Path:
        return self.root / "backbone"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def similarities(self) -> Path:
        return self.root / "similarities"

    @property
    def cbl(self) -> Path:
        return self.root / "cbl"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def report(self) -> Path:
        return self.root / "report.json"


@dataclass
class Context:
    cfg: SalfConfig
    data: Path
    run: RunPaths
    progress: bool = True
    timings: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return resolve_device(self.cfg.device)


def make_context(cfg: SalfConfig, data: str | Path | None, out: str | Path, progress: bool = True) -> Context:
    root = data or cfg.data
    if root is None:
        raise PipelineError("no dataset: pass --data DATA or set \"data\" in the config")
    info = read_dataset_info(root)  # fails early with a clear DatasetError
    missing = [s for s in ("train", "test") if not (Path(root) / s).is_dir()]
    if missing:
        raise PipelineError(f"dataset {root} has no {' and no '.join(missing)} split folder; training needs "
                            f"train/ and the evaluation test/ (docs/DESIGN.md dataset layout)")
    if cfg.similarity.source == "masks" and not info.has_masks:
        raise PipelineError(f"the masks similarity source needs per-image concept masks, and dataset {root} has none "
                            f"(no masks/ folder); use a preset with \"similarity\": {{\"source\": \"clip\"}}")
    run = RunPaths(Path(out))
    run.root.mkdir(parents=True, exist_ok=True)
    return Context(cfg, Path(root), run, progress)


@contextlib.contextmanager
def _timed(ctx: Context, name: str):
    """Adds the block's wall time to ``ctx.timings[name]`` (report.json's ``timings_s``)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        ctx.timings[name] = time.perf_counter() - t


def _split(ctx: Context, split: str):
    from .data.folder import ImageFolderSplit

    return ImageFolderSplit(ctx.data, split, ctx.cfg.backbone.input_size)


def _cbl_train_split(ctx: Context):
    """What the CBL and the head train on: the train split, or its cached views (``cbl.views > 1``,
    training/augment.py)."""
    ds = _split(ctx, "train")
    views = int(ctx.cfg.cbl.views)
    if views == 1:
        return ds
    if ctx.cfg.similarity.source != "masks":
        raise PipelineError(f"cbl.views = {views} needs the masks similarity source: the {ctx.cfg.similarity.source} "
                            f"source computes its similarities from the image files, and warped views are not "
                            f"files; set cbl.views to 1")
    from .augment import AffineRange, AugmentedViews

    return AugmentedViews(ds, views, ctx.cfg.seed, AffineRange(zoom=tuple(ctx.cfg.cbl.view_zoom)))


def _views_key(ctx: Context) -> dict | None:
    c = ctx.cfg.cbl
    return None if c.views == 1 else {"views": c.views, "zoom": list(c.view_zoom), "seed": ctx.cfg.seed}


# ----------------------------------------------------------------------------- backbone
def stage_backbone(ctx: Context) -> Path:
    """Train the backbone on the train split (stand-in for pre-training); returns the weights path."""
    from .backbone_train import train_backbone

    ds = _split(ctx, "train")
    with _timed(ctx, "backbone"):
        result = train_backbone(ctx.cfg.backbone, ds, len(ds.classes), ctx.cfg.backbone_train, ctx.run.backbone,
                                ctx.cfg.seed, ctx.device, ctx.cfg.num_workers, ctx.progress)
    return result.path


def backbone_spec(ctx: Context) -> BackboneSpec:
    """The config's backbone, with the weights of `train backbone` when the preset asks for them."""
    spec = ctx.cfg.backbone
    if ctx.cfg.backbone_train.enabled:
        from .backbone_train import WEIGHTS_FILE

        path = ctx.run.backbone / WEIGHTS_FILE
        if not path.is_file():
            raise PipelineError(f"the preset trains its own backbone but {path} does not exist; "
                                f"run `salfctl train backbone` (or `train all`) first")
        spec = replace(spec, weights=str(path.resolve()))
    return spec


def images_fingerprint(paths) -> str:
    """SHA-256 over each image's (relative name, size, mtime_ns): a regenerated or edited dataset with
    the same image count gets a new feature cache. Only ``stat``s the files (cheap at ImageNet scale)."""
    import hashlib

    h = hashlib.sha256()
    for path in paths:
        st = Path(path).stat()
        h.update(f"{Path(path).parent.name}/{Path(path).name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _weights_digest(spec: BackboneSpec) -> str | None:
    if spec.weights and Path(spec.weights).is_file():
        from .runtime import sha256_file

        return sha256_file(Path(spec.weights))
    return spec.weights


# ----------------------------------------------------------------------------- features
def stage_features(ctx: Context, split: str, backbone=None):
    """Cache the grid features of ``split`` (reused when the key matches); returns a FeatureCache."""
    from .features import build_feature_cache

    with _timed(ctx, f"features_{split}"):
        spec = backbone_spec(ctx)
        backbone = backbone or build_backbone(spec).to(ctx.device)
        dataset = _cbl_train_split(ctx) if split == "train" else _split(ctx, split)
        # The image fingerprint is in the key: the path and count alone reused a stale cache after the
        # dataset at the same path was regenerated (e.g. `data synth` with another seed).
        key = {"backbone": {**spec.to_dict(), "weights": _weights_digest(spec)}, "split": split,
               "data": str(ctx.data.resolve()), "images": images_fingerprint(dataset.paths)}
        if split == "train" and _views_key(ctx):
            key["views"] = _views_key(ctx)
        return build_feature_cache(backbone, dataset, ctx.cfg.grid, ctx.run.features / split, key,
                                   batch_size=ctx.cfg.cbl.feature_batch_size, shard_size=ctx.cfg.cbl.shard_size,
                                   dtype=ctx.cfg.cbl.feature_cache_dtype, num_workers=ctx.cfg.num_workers,
                                   progress=ctx.progress)


# ----------------------------------------------------------------------------- similarity source
def _object_concepts(ctx: Context) -> list[str]:
    """The mask concepts whose union is a class's object (class-concept mode, masks source)."""
    if ctx.cfg.similarity.object_concepts:
        return list(ctx.cfg.similarity.object_concepts)
    if read_dataset_info(ctx.data).name == "salf-synth":
        from .data.synth import KEY_SHAPES

        return list(KEY_SHAPES)
    raise PipelineError("similarity.class_concepts with the masks source needs similarity.object_concepts: the mask "
                        "concepts whose union is a class's object in this dataset")


def stage_similarity(ctx: Context):
    """The SimilaritySource for the train split: ``(source, clip_info or None)``."""
    cfg = ctx.cfg
    if cfg.similarity.source == "masks":
        from .similarity import MaskSimilarity

        if cfg.similarity.class_concepts:
            source = MaskSimilarity.for_classes(cfg.similarity.class_concepts, _object_concepts(ctx), ctx.data, "train",
                                                cfg.grid, cfg.radius, cfg.backbone.input_size,
                                                dataset=_cbl_train_split(ctx), placement=cfg.grid_placement)
        else:
            source = MaskSimilarity(ctx.data, "train", cfg.grid, cfg.radius, cfg.backbone.input_size,
                                    dataset=_cbl_train_split(ctx), placement=cfg.grid_placement)
        return source, None
    if cfg.similarity.source == "clip":
        from .clip.pipeline import build_clip_source  # lazy: open_clip only when asked for

        with _timed(ctx, "similarities"):
            source, _kept = build_clip_source(cfg, ctx.data, ctx.run.root)
        return source, {"model": cfg.clip.model, "pretrained": cfg.clip.pretrained}
    raise PipelineError(f"unknown similarity source {cfg.similarity.source!r}")


# ----------------------------------------------------------------------------- cbl
def stage_cbl(ctx: Context, train_cache=None):
    """Train the CBL and write ``RUN/cbl``; returns the CBLResult."""
    from .cbl import carve_validation, train_cbl

    cache = train_cache or stage_features(ctx, "train")
    source, clip_info = stage_similarity(ctx)
    if len(source.concepts) == 0:
        raise PipelineError("the similarity source has no concepts")
    with _timed(ctx, "cbl"):
        split = carve_validation(len(cache), ctx.cfg.cbl.val_fraction, ctx.cfg.seed, cache.labels(),
                                 views=int(ctx.cfg.cbl.views))
        cbl_cfg = ctx.cfg.cbl
        if ctx.cfg.similarity.class_concepts:  # one map per class is the point: no interpretability cut-off
            cbl_cfg = replace(cbl_cfg, interpretability_cutoff=-math.inf)
        result = train_cbl(cache, source, split, cbl_cfg, ctx.cfg.seed, ctx.device, ctx.progress)
    _save_cbl(ctx, result, source, split, cache, clip_info)
    return result


def _save_cbl(ctx: Context, result, source, split, cache, clip_info) -> None:
    """``RUN/cbl``: the kept concepts' weights and ``cbl.json`` (so `train head` runs on its own)."""
    save_tensors(ctx.run.cbl / "cbl.safetensors", {"weight": result.weight})
    atomic_write_json(ctx.run.cbl / "cbl.json", {
        "concepts": result.concepts, "all_concepts": list(source.concepts), "kept": result.kept,
        "val_indices": split.val_indices, "train_indices": split.train_indices,
        "features_key": cache.manifest["key"], "views": int(ctx.cfg.cbl.views),
        "similarity": {"source": ctx.cfg.similarity.source, "radius": ctx.cfg.radius,
                       "grid_placement": ctx.cfg.grid_placement,
                       **({"class_concepts": ctx.cfg.similarity.class_concepts}
                          if ctx.cfg.similarity.class_concepts else {})},
        "clip": clip_info, **result.record()})


def _load_cbl(ctx: Context) -> tuple[torch.Tensor, dict]:
    """The trained CBL weight and its ``cbl.json``."""
    from safetensors.torch import load_file

    path = ctx.run.cbl / "cbl.safetensors"
    if not path.is_file() or not (ctx.run.cbl / "cbl.json").is_file():
        raise PipelineError(f"no trained CBL in {ctx.run.cbl}; run `salfctl train cbl` first")
    return load_file(str(path))["weight"], json.loads((ctx.run.cbl / "cbl.json").read_text())


def _check_cbl_features(info: dict, cache) -> None:
    """The CBL's split indices and weights belong to the features it was trained on: a cache rebuilt
    since (other images, backbone or grid) would silently pair them with other images."""
    if info.get("features_key") is not None and info["features_key"] != cache.manifest["key"]:
        raise PipelineError("the train features changed since `salfctl train cbl` ran (other images, backbone or "
                            "grid); rerun `salfctl train cbl` before `train head`")


# ----------------------------------------------------------------------------- head + bundle + evaluation
@dataclass
class ConceptData:
    """Standardised concept scores of the train-split features under the trained CBL."""
    scores: torch.Tensor  # [N, M] standardised c*
    labels: torch.Tensor  # [N] int64
    mean: torch.Tensor  # [M] train mean of the pooled scores
    std: torch.Tensor  # [M] train std
    mean_map: torch.Tensor  # [M, Gh, Gw] mean training map (position-blind baseline)
    train: list[int]  # indices of the head's train part (the CBL's split)
    val: list[int]  # indices of its validation part


@dataclass
class TrainReport:
    """What `train head` / `train all` measured and wrote; ``report.json`` is :meth:`to_json`."""
    bundle: Path
    metrics: dict  # accuracies, sparsity, concepts kept, IoU vs baseline (also in bundle.json)
    dropped_concepts: list[dict]
    explanation: Explanation
    explained_image: str
    true_class: str
    timings_s: dict[str, float]
    config: dict
    wall_seconds: float | None = None

    def to_json(self) -> dict:
        doc = {"bundle": str(self.bundle), **self.metrics, "dropped_concepts": self.dropped_concepts,
               "explanation": {"image": self.explained_image, "true_class": self.true_class,
                               **self.explanation.to_dict()},
               "timings_s": {k: round(v, 2) for k, v in self.timings_s.items()}, "config": self.config}
        if self.wall_seconds is not None:
            doc["wall_seconds"] = round(self.wall_seconds, 1)
        return _finite(doc)

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())


def stage_head(ctx: Context, train_cache=None) -> TrainReport:
    """Fit the head, build and save the bundle, evaluate on the test split, write report.json."""
    weight, info = _load_cbl(ctx)
    cache = train_cache or stage_features(ctx, "train")
    _check_cbl_features(info, cache)
    with _timed(ctx, "head"):
        data = _concept_data(ctx, cache, weight, info)
        head = _fit_head(ctx, data)
    with _timed(ctx, "dense_baseline"):
        dense, feature_norm = _dense_baseline(ctx, cache, data)
    model = _assemble(ctx, cache, weight, head, data, len(info["concepts"]))
    test = _split(ctx, "test")
    with _timed(ctx, "evaluate"):
        from .evaluate import evaluate

        ev = evaluate(model, info["concepts"], test, dense, feature_norm, data.mean_map,
                      batch_size=ctx.cfg.cbl.feature_batch_size, num_workers=ctx.cfg.num_workers,
                      device=ctx.device, progress=ctx.progress)
    metrics = _metrics(ev, head, dense, info)
    _save_bundle(ctx, model, cache, info, head, test.classes, metrics, _concept_hist(data))
    report = _report(ctx, ev, head, info, test, metrics)
    report.write(ctx.run.report)
    return report


def _concept_data(ctx: Context, cache, weight: torch.Tensor, info: dict) -> ConceptData:
    from .features import concept_activations
    from .head import standardisation

    c_all, y_all, mean_map, _ = concept_activations(cache, weight, ctx.cfg.pooling, device=ctx.device)
    tr, va = info["train_indices"], info["val_indices"]
    views = int(info.get("views", 1))
    if views > 1:  # the head trains on the images themselves: a zoomed view may have cropped the object out
        tr = [i for i in tr if i % views == 0]
    mean, std = standardisation(c_all[tr])
    return ConceptData((c_all - mean) / std, y_all, mean, std, mean_map, tr, va)


def _num_classes(ctx: Context) -> int:
    return len(read_dataset_info(ctx.data).classes)


def _fit_head(ctx: Context, d: ConceptData):
    """The preset's head: dense, a fixed lambda, or the regularisation path to a sparsity budget."""
    from .head import HeadFit, accuracy, fit_dense, fit_elastic_net, fit_path

    hc, n = ctx.cfg.head, _num_classes(ctx)
    x_tr, y_tr, x_va, y_va = d.scores[d.train], d.labels[d.train], d.scores[d.val], d.labels[d.val]
    if hc.dense:
        return fit_dense(x_tr, y_tr, n, hc.dense_lam, x_va, y_va, hc.max_iters, hc.tol, ctx.device)
    if hc.lam is not None:
        res = fit_elastic_net(x_tr, y_tr, n, hc.lam, hc.alpha, None, hc.max_iters, hc.tol, ctx.device)
        return HeadFit(res.weight, res.bias, hc.lam, hc.alpha, False, accuracy(x_tr, y_tr, res.weight, res.bias),
                       accuracy(x_va, y_va, res.weight, res.bias))
    return fit_path(x_tr, y_tr, n, hc.alpha, hc.target_nonzero_per_class, hc.path_length, hc.path_min_ratio,
                    x_va, y_va, hc.max_iters, hc.tol, ctx.device, ctx.progress)


def _dense_baseline(ctx: Context, cache, d: ConceptData):
    """Same backbone, dense linear head on pooled backbone features, same split: ``(fit, (mean, std))``."""
    from .features import pooled_cache_features
    from .head import fit_dense, standardisation

    hc = ctx.cfg.head
    f_all, _ = pooled_cache_features(cache)
    f_mean, f_std = standardisation(f_all[d.train])
    f_all = (f_all - f_mean) / f_std
    fit = fit_dense(f_all[d.train], d.labels[d.train], _num_classes(ctx), hc.dense_lam, f_all[d.val],
                    d.labels[d.val], hc.max_iters, hc.tol, ctx.device)
    return fit, (f_mean, f_std)


def _assemble(ctx: Context, cache, weight: torch.Tensor, head, d: ConceptData, num_concepts: int):
    """The SALF-CBM: backbone, trained CBL, head and standardisation, in eval mode."""
    from .model import SalfCBM

    model = SalfCBM(build_backbone(backbone_spec(ctx)), cache.feature_dim, num_concepts, _num_classes(ctx),
                    ctx.cfg.grid, ctx.cfg.pooling)
    with torch.no_grad():
        model.cbl.conv.weight.copy_(weight)
        model.head.linear.weight.copy_(head.weight)
        model.head.linear.bias.copy_(head.bias)
        model.head.concept_mean.copy_(d.mean)
        model.head.concept_std.copy_(d.std)
    return model.eval()


def _metrics(ev, head, dense, info: dict) -> dict:
    return _finite({**ev.to_dict(), "head_val_accuracy": head.val_accuracy,
                    "head_train_accuracy": head.train_accuracy, "dense_baseline_val_accuracy": dense.val_accuracy,
                    "nonzero_weights": head.nonzero,
                    "nonzero_per_class": [int(v) for v in (head.weight != 0).sum(dim=1)],
                    "concepts_kept": len(info["concepts"]), "concepts_total": len(info["all_concepts"])})


def _concept_hist(d: ConceptData) -> dict[str, torch.Tensor]:
    """The training split's concept-score histograms (``salf/contract/drift.py``), stored in the bundle so
    the gateway can tell how far live traffic sits from training, per concept."""
    from salf.contract.drift import histogram
    from salf.contract.repository import CONCEPT_HIST

    return {CONCEPT_HIST: torch.from_numpy(histogram(d.scores[d.train].numpy()).astype("float32"))}


def _save_bundle(ctx: Context, model, cache, info: dict, head, classes: list[str], metrics: dict,
                 extra: dict | None = None) -> Path:
    from .bundle import BundleMeta, save_bundle

    cfg = ctx.cfg
    training = {"seed": cfg.seed, "config": cfg.to_dict(), "data": str(ctx.data),
                "validation_split": info["validation_split"], "dropped_concepts": info["dropped"],
                "cbl": {k: info[k] for k in ("best_epoch", "epochs_run", "val_similarity")},
                "head": {k: v for k, v in head.summary().items() if k != "path"}, "head_path": head.summary()["path"]}
    meta = BundleMeta(backbone=backbone_spec(ctx), feature_dim=cache.feature_dim, concepts=info["concepts"],
                      classes=classes, grid=cfg.grid, radius=cfg.radius, pooling=cfg.pooling, clip=info.get("clip"),
                      similarity=info["similarity"], training=training, metrics=metrics)
    return save_bundle(ctx.run.bundle, model, meta, extra)


def _report(ctx: Context, ev, head, info: dict, test, metrics: dict) -> TrainReport:
    """The report, with the explanation of one test image (the gateway's ranking of concepts)."""
    from .explain import explain_maps

    ex = ev.example
    explanation = explain_maps(ex["maps"], ex["scores"], ex["logits"], head.weight, info["concepts"], test.classes,
                               ctx.cfg.backbone.input_size, k=3,
                               placement=(info.get("similarity") or {}).get("grid_placement", "stride"))
    return TrainReport(bundle=ctx.run.bundle, metrics=metrics, dropped_concepts=info["dropped"],
                       explanation=explanation, explained_image=str(test.paths[ex["index"]]),
                       true_class=test.classes[ex["label"]], timings_s=dict(ctx.timings), config=ctx.cfg.to_dict())


def _finite(doc):
    """JSON has no NaN: map non-finite floats to None, recursively."""
    if isinstance(doc, dict):
        return {k: _finite(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_finite(v) for v in doc]
    if isinstance(doc, float) and doc != doc:
        return None
    return doc


def run_all(ctx: Context) -> TrainReport:
    """`train all`: backbone (if the preset asks) -> features -> similarities -> CBL -> head -> bundle ->
    evaluation -> report. Returns the report (also in RUN/report.json)."""
    start = time.perf_counter()
    if ctx.cfg.backbone_train.enabled:
        stage_backbone(ctx)
    cache = stage_features(ctx, "train")
    stage_cbl(ctx, cache)
    report = stage_head(ctx, cache)
    report.wall_seconds = time.perf_counter() - start
    report.write(ctx.run.report)
    return report


def summary_line(report: dict) -> str:
    """The one-line summary `salfctl train` prints at the end (``report``: :meth:`TrainReport.to_json`)."""
    parts = [f"test accuracy {report['test_accuracy']:.3f}"]
    if report.get("dense_baseline_test_accuracy") is not None:
        parts[0] += f" (dense baseline {report['dense_baseline_test_accuracy']:.3f})"
    if report.get("iou_mean") is not None:
        base = report.get("iou_baseline_mean")
        parts.append(f"concept-map IoU {report['iou_mean']:.3f}" +
                     (f" (position-blind baseline {base:.3f})" if base is not None else ""))
    nz = report["nonzero_weights"]
    per = nz / max(len(report["nonzero_per_class"]), 1)
    parts.append(f"{report['concepts_kept']}/{report['concepts_total']} concepts kept")
    parts.append(f"{nz} non-zero weights ({per:.1f} per class)")
    return " | ".join(parts)


__all__ = ["ConceptData", "Context", "PipelineError", "RunPaths", "TrainReport", "backbone_spec", "make_context", "run_all", "stage_backbone",
           "stage_cbl", "stage_features", "stage_head", "stage_similarity", "summary_line"]
