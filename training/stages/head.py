"""The head stage: fit the sparse head on the CBL's concept scores, assemble and save the bundle, evaluate
on the test split and write ``report.json``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones import build_backbone
from ..data.folder import read_dataset_info
from .backbone import backbone_spec
from .cbl import check_cbl_features, load_cbl
from .context import Context, split_dataset, timed
from .features import stage_features
from .report import TrainReport, build_report, finite


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


def stage_head(ctx: Context, train_cache=None) -> TrainReport:
    """Fit the head, build and save the bundle, evaluate on the test split, write report.json."""
    weight, info = load_cbl(ctx)
    cache = train_cache or stage_features(ctx, "train")
    check_cbl_features(info, cache)
    with timed(ctx, "head"):
        data = _concept_data(ctx, cache, weight, info)
        head = _fit_head(ctx, data)
    with timed(ctx, "dense_baseline"):
        dense, feature_norm = _dense_baseline(ctx, cache, data)
    model = _assemble(ctx, cache, weight, head, data, len(info["concepts"]))
    test = split_dataset(ctx, "test")
    with timed(ctx, "evaluate"):
        from ..evaluate import evaluate

        ev = evaluate(model, info["concepts"], test, dense, feature_norm, data.mean_map,
                      batch_size=ctx.cfg.cbl.feature_batch_size, num_workers=ctx.cfg.num_workers,
                      device=ctx.device, progress=ctx.progress)
    metrics = _metrics(ev, head, dense, info)
    _save_bundle(ctx, model, cache, info, head, test.classes, metrics, _concept_hist(data))
    report = build_report(ctx, ev, head, info, test, metrics)
    report.write(ctx.run.report)
    return report


def _concept_data(ctx: Context, cache, weight: torch.Tensor, info: dict) -> ConceptData:
    from ..features import concept_activations
    from ..head import standardisation

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
    from ..head import HeadFit, accuracy, fit_dense, fit_elastic_net, fit_path

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
    from ..features import pooled_cache_features
    from ..head import fit_dense, standardisation

    hc = ctx.cfg.head
    f_all, _ = pooled_cache_features(cache)
    f_mean, f_std = standardisation(f_all[d.train])
    f_all = (f_all - f_mean) / f_std
    fit = fit_dense(f_all[d.train], d.labels[d.train], _num_classes(ctx), hc.dense_lam, f_all[d.val],
                    d.labels[d.val], hc.max_iters, hc.tol, ctx.device)
    return fit, (f_mean, f_std)


def _assemble(ctx: Context, cache, weight: torch.Tensor, head, d: ConceptData, num_concepts: int):
    """The SALF-CBM: backbone, trained CBL, head and standardisation, in eval mode."""
    from ..model import SalfCBM

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
    return finite({**ev.to_dict(), "head_val_accuracy": head.val_accuracy,
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
    from ..bundle import BundleMeta, save_bundle

    cfg = ctx.cfg
    training = {"seed": cfg.seed, "config": cfg.to_dict(), "data": str(ctx.data),
                "validation_split": info["validation_split"], "dropped_concepts": info["dropped"],
                "cbl": {k: info[k] for k in ("best_epoch", "epochs_run", "val_similarity")},
                "head": {k: v for k, v in head.summary().items() if k != "path"}, "head_path": head.summary()["path"]}
    meta = BundleMeta(backbone=backbone_spec(ctx), feature_dim=cache.feature_dim, concepts=info["concepts"],
                      classes=classes, grid=cfg.grid, radius=cfg.radius, pooling=cfg.pooling, clip=info.get("clip"),
                      similarity=info["similarity"], training=training, metrics=metrics)
    return save_bundle(ctx.run.bundle, model, meta, extra)
