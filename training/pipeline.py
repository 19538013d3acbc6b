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

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .backbones import BackboneSpec, build_backbone
from .config import SalfConfig

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
        from .head import resolve_device

        return resolve_device(self.cfg.device)


def make_context(cfg: SalfConfig, data: str | Path | None, out: str | Path, progress: bool = True) -> Context:
    root = data or cfg.data
    if root is None:
        raise PipelineError("no dataset: pass --data DATA or set \"data\" in the config")
    from .data.folder import read_dataset_info

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


def _json_write(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def _split(ctx: Context, split: str):
    from .data.folder import ImageFolderSplit

    return ImageFolderSplit(ctx.data, split, ctx.cfg.backbone.input_size)


# ----------------------------------------------------------------------------- backbone
def stage_backbone(ctx: Context) -> Path:
    """Train the backbone on the train split (stand-in for pre-training); returns the weights path."""
    from .backbone_train import train_backbone

    t = time.perf_counter()
    ds = _split(ctx, "train")
    result = train_backbone(ctx.cfg.backbone, ds, len(ds.classes), ctx.cfg.backbone_train, ctx.run.backbone,
                            ctx.cfg.seed, ctx.device, ctx.cfg.num_workers, ctx.progress)
    ctx.timings["backbone"] = time.perf_counter() - t
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
        from .bundle import sha256_file

        return sha256_file(Path(spec.weights))
    return spec.weights


# ----------------------------------------------------------------------------- features
def stage_features(ctx: Context, split: str, backbone=None):
    """Cache the grid features of ``split`` (reused when the key matches); returns a FeatureCache."""
    from .features import build_feature_cache

    t = time.perf_counter()
    spec = backbone_spec(ctx)
    backbone = backbone or build_backbone(spec).to(ctx.device)
    dataset = _split(ctx, split)
    # The image fingerprint is in the key: the path and count alone reused a stale cache after the
    # dataset at the same path was regenerated (e.g. `data synth` with another seed).
    key = {"backbone": {**spec.to_dict(), "weights": _weights_digest(spec)}, "split": split,
           "data": str(ctx.data.resolve()), "images": images_fingerprint(dataset.paths)}
    cache = build_feature_cache(backbone, dataset, ctx.cfg.grid, ctx.run.features / split, key,
                                batch_size=ctx.cfg.cbl.feature_batch_size, shard_size=ctx.cfg.cbl.shard_size,
                                dtype=ctx.cfg.cbl.feature_cache_dtype, num_workers=ctx.cfg.num_workers,
                                progress=ctx.progress)
    ctx.timings[f"features_{split}"] = time.perf_counter() - t
    return cache


# ----------------------------------------------------------------------------- similarity source
def stage_similarity(ctx: Context):
    """The SimilaritySource for the train split: ``(source, clip_info or None)``."""
    cfg = ctx.cfg
    if cfg.similarity.source == "masks":
        from .similarity import MaskSimilarity

        source = MaskSimilarity(ctx.data, "train", cfg.grid, cfg.radius, cfg.backbone.input_size)
        return source, None
    if cfg.similarity.source == "clip":
        from .clip.pipeline import build_clip_source  # lazy: open_clip only when asked for

        t = time.perf_counter()
        source, _kept = build_clip_source(cfg, ctx.data, ctx.run.root)
        ctx.timings["similarities"] = time.perf_counter() - t
        return source, {"model": cfg.clip.model, "pretrained": cfg.clip.pretrained}
    raise PipelineError(f"unknown similarity source {cfg.similarity.source!r}")


# ----------------------------------------------------------------------------- cbl
def stage_cbl(ctx: Context, train_cache=None):
    """Train the CBL and write ``RUN/cbl``; returns the CBLResult."""
    from safetensors.torch import save_file

    from .cbl import carve_validation, train_cbl

    cache = train_cache or stage_features(ctx, "train")
    source, clip_info = stage_similarity(ctx)
    if len(source.concepts) == 0:
        raise PipelineError("the similarity source has no concepts")
    t = time.perf_counter()
    split = carve_validation(len(cache), ctx.cfg.cbl.val_fraction, ctx.cfg.seed, cache.labels())
    result = train_cbl(cache, source, split, ctx.cfg.cbl, ctx.cfg.seed, ctx.device, ctx.progress)
    ctx.timings["cbl"] = time.perf_counter() - t
    ctx.run.cbl.mkdir(parents=True, exist_ok=True)
    tmp = ctx.run.cbl / "cbl.safetensors.tmp"
    save_file({"weight": result.weight.contiguous()}, str(tmp))
    tmp.replace(ctx.run.cbl / "cbl.safetensors")
    _json_write(ctx.run.cbl / "cbl.json", {
        "concepts": result.concepts, "all_concepts": list(source.concepts), "kept": result.kept,
        "val_indices": split.val_indices, "train_indices": split.train_indices,
        "features_key": cache.manifest["key"],
        "similarity": {"source": ctx.cfg.similarity.source, "radius": ctx.cfg.radius},
        "clip": clip_info, **result.record()})
    return result


def _load_cbl(ctx: Context) -> tuple[torch.Tensor, dict]:
    from safetensors.torch import load_file

    path = ctx.run.cbl / "cbl.safetensors"
    if not path.is_file() or not (ctx.run.cbl / "cbl.json").is_file():
        raise PipelineError(f"no trained CBL in {ctx.run.cbl}; run `salfctl train cbl` first")
    return load_file(str(path))["weight"], json.loads((ctx.run.cbl / "cbl.json").read_text())


# ----------------------------------------------------------------------------- head + bundle + evaluation
def stage_head(ctx: Context, train_cache=None) -> dict:
    """Fit the head, build and save the bundle, evaluate on the test split, write report.json."""
    from .bundle import BundleMeta, save_bundle
    from .evaluate import concept_activations, evaluate, pooled_cache_features
    from .explain import explain_maps
    from .head import fit_dense, fit_path, standardisation
    from .model import SalfCBM

    cfg = ctx.cfg
    weight, info = _load_cbl(ctx)
    cache = train_cache or stage_features(ctx, "train")
    # The CBL's split indices and weights belong to the features it was trained on: a cache rebuilt
    # since (other images, backbone or grid) would silently pair them with other images.
    if info.get("features_key") is not None and info["features_key"] != cache.manifest["key"]:
        raise PipelineError(f"the train features changed since `salfctl train cbl` ran (other images, backbone or "
                            f"grid); rerun `salfctl train cbl` before `train head`")
    tr, va = info["train_indices"], info["val_indices"]
    t = time.perf_counter()
    c_all, y_all, mean_map, _ = concept_activations(cache, weight, cfg.pooling, device=ctx.device)
    mean, std = standardisation(c_all[tr])
    x_tr, x_va = (c_all[tr] - mean) / std, (c_all[va] - mean) / std
    num_classes = len(_split(ctx, "train").classes)
    hc = cfg.head
    if hc.dense:
        head = fit_dense(x_tr, y_all[tr], num_classes, hc.dense_lam, x_va, y_all[va], hc.max_iters, hc.tol, ctx.device)
    elif hc.lam is not None:
        from .head import HeadFit, accuracy, fit_elastic_net

        res = fit_elastic_net(x_tr, y_all[tr], num_classes, hc.lam, hc.alpha, None, hc.max_iters, hc.tol, ctx.device)
        head = HeadFit(res.weight, res.bias, hc.lam, hc.alpha, False, accuracy(x_tr, y_all[tr], res.weight, res.bias),
                       accuracy(x_va, y_all[va], res.weight, res.bias))
    else:
        head = fit_path(x_tr, y_all[tr], num_classes, hc.alpha, hc.target_nonzero_per_class, hc.path_length,
                        hc.path_min_ratio, x_va, y_all[va], hc.max_iters, hc.tol, ctx.device, ctx.progress)
    ctx.timings["head"] = time.perf_counter() - t

    # dense baseline: same backbone, dense linear head on pooled backbone features (same split)
    t = time.perf_counter()
    f_all, _ = pooled_cache_features(cache)
    f_mean, f_std = standardisation(f_all[tr])
    dense = fit_dense((f_all[tr] - f_mean) / f_std, y_all[tr], num_classes, hc.dense_lam,
                      (f_all[va] - f_mean) / f_std, y_all[va], hc.max_iters, hc.tol, ctx.device)
    ctx.timings["dense_baseline"] = time.perf_counter() - t

    spec = backbone_spec(ctx)
    backbone = build_backbone(spec)
    model = SalfCBM(backbone, cache.feature_dim, len(info["concepts"]), num_classes, cfg.grid, cfg.pooling)
    with torch.no_grad():
        model.cbl.conv.weight.copy_(weight)
        model.head.linear.weight.copy_(head.weight)
        model.head.linear.bias.copy_(head.bias)
        model.head.concept_mean.copy_(mean)
        model.head.concept_std.copy_(std)
    model.eval()

    t = time.perf_counter()
    test = _split(ctx, "test")
    ev = evaluate(model, info["concepts"], test, dense, (f_mean, f_std), mean_map,
                  batch_size=cfg.cbl.feature_batch_size, num_workers=cfg.num_workers, device=ctx.device,
                  progress=ctx.progress)
    ctx.timings["evaluate"] = time.perf_counter() - t
    ex = ev.example
    explanation = explain_maps(ex["maps"], ex["scores"], ex["logits"], head.weight, info["concepts"], test.classes,
                               spec.input_size, k=3)
    explanation_doc = {"image": str(test.paths[ex["index"]]), "true_class": test.classes[ex["label"]],
                       **explanation.to_dict()}

    nz_per_class = [int(v) for v in (head.weight != 0).sum(dim=1)]
    metrics = {**ev.to_dict(), "head_val_accuracy": head.val_accuracy, "head_train_accuracy": head.train_accuracy,
               "dense_baseline_val_accuracy": dense.val_accuracy,
               "nonzero_weights": head.nonzero, "nonzero_per_class": nz_per_class,
               "concepts_kept": len(info["concepts"]), "concepts_total": len(info["all_concepts"])}
    training = {"seed": cfg.seed, "config": cfg.to_dict(), "data": str(ctx.data),
                "validation_split": info["validation_split"], "dropped_concepts": info["dropped"],
                "cbl": {k: info[k] for k in ("best_epoch", "epochs_run", "val_similarity")},
                "head": {k: v for k, v in head.summary().items() if k != "path"}, "head_path": head.summary()["path"]}
    meta = BundleMeta(backbone=spec, feature_dim=cache.feature_dim, concepts=info["concepts"], classes=test.classes,
                      grid=cfg.grid, radius=cfg.radius, pooling=cfg.pooling, clip=info.get("clip"),
                      similarity=info["similarity"], training=training, metrics=_finite(metrics))
    save_bundle(ctx.run.bundle, model, meta)
    report = {"bundle": str(ctx.run.bundle), **_finite(metrics), "dropped_concepts": info["dropped"],
              "explanation": explanation_doc, "timings_s": {k: round(v, 2) for k, v in ctx.timings.items()},
              "config": cfg.to_dict()}
    _json_write(ctx.run.report, report)
    report["_explanation_text"] = explanation.describe()
    return report


def _finite(doc):
    """JSON has no NaN: map non-finite floats to None, recursively."""
    if isinstance(doc, dict):
        return {k: _finite(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_finite(v) for v in doc]
    if isinstance(doc, float) and doc != doc:
        return None
    return doc


def run_all(ctx: Context) -> dict:
    """`train all`: backbone (if the preset asks) -> features -> similarities -> CBL -> head -> bundle ->
    evaluation -> report. Returns the report (also in RUN/report.json)."""
    start = time.perf_counter()
    if ctx.cfg.backbone_train.enabled:
        stage_backbone(ctx)
    cache = stage_features(ctx, "train")
    stage_cbl(ctx, cache)
    report = stage_head(ctx, cache)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    _json_write(ctx.run.report, {k: v for k, v in report.items() if not k.startswith("_")})
    return report


def summary_line(report: dict) -> str:
    """The one-line summary `salfctl train` prints at the end."""
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


__all__ = ["Context", "PipelineError", "RunPaths", "backbone_spec", "make_context", "run_all", "stage_backbone",
           "stage_cbl", "stage_features", "stage_head", "stage_similarity", "summary_line"]
