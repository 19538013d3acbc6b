"""The CBL stage: train the concept bottleneck layer and write ``RUN/cbl``; read it back for the head."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import torch

from ..runtime import atomic_write_json, save_tensors
from .context import Context, PipelineError, timed
from .features import stage_features, train_split
from .similarity_source import stage_similarity


def stage_cbl(ctx: Context, caches=None):
    """Train the CBL and write ``RUN/cbl`` (rank 0; every rank trains its part, training/cbl.py); returns
    the CBLResult. ``caches``: the ``(train, val)`` feature caches when already built."""
    from ..cbl import train_cbl
    from ..distributed import barrier, rank_world

    split = train_split(ctx)
    cache, val_cache = caches or (stage_features(ctx, "train", parts=split), stage_features(ctx, "val", parts=split))
    source, clip_info = stage_similarity(ctx)
    if len(source.concepts) == 0:
        raise PipelineError("the similarity source has no concepts")
    with timed(ctx, "cbl"):
        cbl_cfg = ctx.cfg.cbl
        if ctx.cfg.similarity.class_concepts:  # one map per class is the point: no interpretability cut-off
            cbl_cfg = replace(cbl_cfg, interpretability_cutoff=-math.inf)
        ctx.run.cbl.mkdir(parents=True, exist_ok=True)
        result = train_cbl(cache, source, split, cbl_cfg, ctx.cfg.seed, ctx.device, ctx.progress,
                           val_cache=val_cache, checkpoint=ctx.run.cbl / "checkpoint.pt")
    if rank_world()[0] == 0:
        _save_cbl(ctx, result, source, split, cache, clip_info)
    barrier()
    return result


def _save_cbl(ctx: Context, result, source, split, cache, clip_info) -> None:
    """``RUN/cbl``: the kept concepts' weights and ``cbl.json`` (so `train head` runs on its own)."""
    save_tensors(ctx.run.cbl / "cbl.safetensors", {"weight": result.weight})
    atomic_write_json(ctx.run.cbl / "cbl.json", {
        "concepts": result.concepts, "all_concepts": list(source.concepts), "kept": result.kept,
        "val_indices": split.val_indices, "train_indices": split.train_indices,
        "features_key": cache.manifest["key"], "val_features_key": val_cache_key(ctx), "views": int(ctx.cfg.cbl.views),
        "similarity": {"source": ctx.cfg.similarity.source, "radius": ctx.cfg.radius,
                       "grid_placement": ctx.cfg.grid_placement,
                       **({"class_concepts": ctx.cfg.similarity.class_concepts}
                          if ctx.cfg.similarity.class_concepts else {})},
        "clip": clip_info, **result.record()})


def val_cache_key(ctx: Context):
    from ..features import read_manifest

    doc = read_manifest(ctx.run.features / "val")
    return None if doc is None else doc.get("key")


def load_cbl(ctx: Context) -> tuple[torch.Tensor, dict]:
    """The trained CBL weight and its ``cbl.json``."""
    from safetensors.torch import load_file

    path = ctx.run.cbl / "cbl.safetensors"
    if not path.is_file() or not (ctx.run.cbl / "cbl.json").is_file():
        raise PipelineError(f"no trained CBL in {ctx.run.cbl}; run `salfctl train cbl` first")
    return load_file(str(path))["weight"], json.loads((ctx.run.cbl / "cbl.json").read_text())


def check_cbl_features(info: dict, cache, val_cache=None) -> None:
    """The CBL's split indices and weights belong to the features it was trained on: a cache rebuilt
    since (other images, backbone or grid) would silently pair them with other images."""
    stale = info.get("features_key") is not None and info["features_key"] != cache.manifest["key"]
    if val_cache is not None and info.get("val_features_key") is not None:
        stale = stale or info["val_features_key"] != val_cache.manifest["key"]
    if stale:
        raise PipelineError("the train features changed since `salfctl train cbl` ran (other images, backbone or "
                            "grid); rerun `salfctl train cbl` before `train head`")
