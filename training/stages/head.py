"""The head stage: fit the sparse head on the CBL's concept scores, assemble and save the bundle, evaluate
on the test split and write ``report.json``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones import build_backbone
from ..data.folder import read_dataset_info
from .backbone import backbone_spec
from ..activations import FileDesign
from ..distributed import barrier, rank_world
from .cbl import check_cbl_features, load_cbl
from .context import Context, split_dataset, timed
from .features import stage_features, train_split
from .report import TrainReport, build_report, finite


@dataclass
class ConceptData:
    """The head's inputs, out of core: standardised concept scores of the train rows (view 0 of the CBL's
    train images) and of the validation part, as block designs over fp16 activation files."""
    train: FileDesign
    val: FileDesign
    mean: torch.Tensor  # [M] train mean of the pooled scores
    std: torch.Tensor  # [M] train std
    mean_map: torch.Tensor  # [M, Gh, Gw] mean training map (position-blind baseline)


def stage_head(ctx: Context, caches=None) -> TrainReport | None:
    """Fit the head, build and save the bundle, evaluate on the test split, write report.json. Under
    torchrun every rank takes part in the activations and the solver; rank 0 alone evaluates and writes
    the bundle and the report (the others return None)."""
    weight, info = load_cbl(ctx)
    split = train_split(ctx)
    cache, val_cache = caches or (stage_features(ctx, "train", parts=split), stage_features(ctx, "val", parts=split))
    check_cbl_features(info, cache, val_cache)
    with timed(ctx, "head"):
        data = _concept_data(ctx, cache, val_cache, weight, info)
        head = _fit_head(ctx, data)
        hist = _concept_hist(data)
    with timed(ctx, "dense_baseline"):
        dense, feature_norm = _dense_baseline(ctx, cache, val_cache, info)
    rank = rank_world()[0]
    report = None
    if rank == 0:
        report = _evaluate_and_save(ctx, cache, weight, head, data, info, dense, feature_norm, hist)
    barrier()
    return report


def _evaluate_and_save(ctx: Context, cache, weight, head, data: ConceptData, info: dict, dense, feature_norm,
                       hist) -> TrainReport:
    model = _assemble(ctx, cache, weight, head, data, len(info["concepts"]))
    test = split_dataset(ctx, "test")
    with timed(ctx, "evaluate"):
        from ..evaluate import evaluate

        ev = evaluate(model, info["concepts"], test, dense, feature_norm, data.mean_map,
                      batch_size=ctx.cfg.cbl.feature_batch_size, num_workers=ctx.cfg.num_workers,
                      device=ctx.device, progress=ctx.progress)
    metrics = _metrics(ev, head, dense, info)
    _save_bundle(ctx, model, cache, info, head, test.classes, metrics, hist)
    report = build_report(ctx, ev, head, info, test, metrics)
    report.write(ctx.run.report)
    return report


def head_rows(cache, views: int) -> torch.Tensor | None:
    """Cache positions the head trains on: view 0 of each train image (a zoomed view may have cropped the
    object out); None (every row) without views."""
    if views <= 1:
        return None
    return (cache.items % views == 0).nonzero().flatten()


def _designs(ctx: Context, cache, val_cache, name: str, weight, views: int):
    """Activation files ``RUN/head/<name>-{train,val}`` (written once, reused by key) as block designs."""
    from ..activations import FileDesign, write_activations

    hc = ctx.cfg.head
    root = ctx.run.root / "head"
    _, mean_map = write_activations(cache, root / f"{name}-train", {"features": cache.manifest["key"]}, weight,
                                    ctx.cfg.pooling, head_rows(cache, views), hc.block_rows, ctx.device, ctx.progress)
    write_activations(val_cache, root / f"{name}-val", {"features": val_cache.manifest["key"]}, weight,
                      ctx.cfg.pooling, None, hc.block_rows, ctx.device, ctx.progress)
    resident = int(hc.resident_mb * 2**20)
    tr = FileDesign(root / f"{name}-train", ctx.device, resident)
    va = FileDesign(root / f"{name}-val", ctx.device, resident)
    # the validation rows are standardised with the train part's statistics
    va.offset = (torch.tensor(tr.meta["mean"], dtype=torch.float64)
                 - torch.tensor(va.meta["shift"], dtype=torch.float64)).float().to(ctx.device)
    va.std = tr.std
    return tr, va, mean_map


def _concept_data(ctx: Context, cache, val_cache, weight: torch.Tensor, info: dict) -> ConceptData:
    tr, va, mean_map = _designs(ctx, cache, val_cache, "concepts", weight, int(info.get("views", 1)))
    return ConceptData(tr, va, torch.tensor(tr.meta["mean"], dtype=torch.float32),
                       tr.std.detach().cpu().clone(), mean_map)


def _num_classes(ctx: Context) -> int:
    return len(read_dataset_info(ctx.data).classes)


def _fit_head(ctx: Context, d: ConceptData):
    """The preset's head: dense, a fixed lambda, or the regularisation path to a sparsity budget (with a
    checkpoint after every lambda in ``RUN/head/path``)."""
    from ..head import HeadFit, accuracy, fit_dense, fit_elastic_net, fit_path

    hc, n = ctx.cfg.head, _num_classes(ctx)
    if hc.dense:
        return fit_dense(d.train, None, n, hc.dense_lam, d.val, None, hc.max_iters, hc.tol, ctx.device)
    if hc.lam is not None:
        res = fit_elastic_net(d.train, None, n, hc.lam, hc.alpha, None, hc.max_iters, hc.tol, ctx.device)
        return HeadFit(res.weight, res.bias, hc.lam, hc.alpha, False, accuracy(d.train, None, res.weight, res.bias),
                       accuracy(d.val, None, res.weight, res.bias))
    return fit_path(d.train, None, n, hc.alpha, hc.target_nonzero_per_class, hc.path_length, hc.path_min_ratio,
                    d.val, None, hc.max_iters, hc.tol, ctx.device, ctx.progress,
                    checkpoint=ctx.run.root / "head" / "path",
                    checkpoint_key={"train": d.train.meta["key"], "val": d.val.meta["key"]})


def _dense_baseline(ctx: Context, cache, val_cache, info: dict):
    """Same backbone, dense linear head on pooled backbone features, same split: ``(fit, (mean, std))``."""
    from ..head import fit_dense

    hc = ctx.cfg.head
    tr, va, _ = _designs(ctx, cache, val_cache, "features", None, int(info.get("views", 1)))
    fit = fit_dense(tr, None, _num_classes(ctx), hc.dense_lam, va, None, hc.max_iters, hc.tol, ctx.device)
    return fit, (torch.tensor(tr.meta["mean"], dtype=torch.float32), tr.std.detach().cpu().clone())


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
    the gateway can tell how far live traffic sits from training, per concept; built block by block
    (training/activations.py ``block_histogram``)."""
    from salf.contract.repository import CONCEPT_HIST

    from ..activations import block_histogram

    return {CONCEPT_HIST: torch.from_numpy(block_histogram(d.train).astype("float32"))}


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
