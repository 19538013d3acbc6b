"""The features stage: carve the CBL's validation part from the train split, then cache the backbone's grid
features of each part (``RUN/features/train`` and ``RUN/features/val``), keyed by what made them."""
from __future__ import annotations

from pathlib import Path

from ..backbones import BackboneSpec, build_backbone
from .backbone import backbone_spec
from .context import Context, cbl_train_split, split_dataset, timed, views_key


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
        from ..runtime import sha256_file

        return sha256_file(Path(spec.weights))
    return spec.weights


def train_split(ctx: Context):
    """The CBL's seeded, stratified validation part of the train split (its views: training/augment.py); a
    pure function of the labels, the fraction and the seed, so every rank carves the same one."""
    import torch

    from ..cbl import carve_validation

    base = split_dataset(ctx, "train")
    views = int(ctx.cfg.cbl.views)
    labels = torch.tensor(base.labels, dtype=torch.long).repeat_interleave(views)
    return carve_validation(len(labels), ctx.cfg.cbl.val_fraction, ctx.cfg.seed, labels, views=views)


def stage_features(ctx: Context, split: str, backbone=None, parts=None):
    """Cache the grid features of ``split``: ``train`` and ``val`` are the CBL's parts of the train split
    (:func:`train_split`; ``parts``: a ValSplit already carved), anything else a dataset split. Rows are
    in a seeded random order; the cache is reused when the key matches. Returns a FeatureCache."""
    from ..features import build_feature_cache

    with timed(ctx, f"features_{split}"):
        spec = backbone_spec(ctx)
        backbone = backbone or build_backbone(spec).to(ctx.device)
        items = None
        if split in ("train", "val"):
            dataset = cbl_train_split(ctx)
            parts = parts or train_split(ctx)
            items = parts.train_indices if split == "train" else parts.val_indices
        else:
            dataset = split_dataset(ctx, split)
        # The image fingerprint is in the key: the path and count alone reused a stale cache after the
        # dataset at the same path was regenerated (e.g. `data synth` with another seed).
        key = {"backbone": {**spec.to_dict(), "weights": _weights_digest(spec)}, "split": split,
               "data": str(ctx.data.resolve()), "images": images_fingerprint(dataset.paths)}
        if split in ("train", "val") and views_key(ctx):
            key["views"] = views_key(ctx)
        return build_feature_cache(backbone, dataset, ctx.cfg.grid, ctx.run.features / split, key,
                                   batch_size=ctx.cfg.cbl.feature_batch_size, shard_size=ctx.cfg.cbl.shard_size,
                                   dtype=ctx.cfg.cbl.feature_cache_dtype, num_workers=ctx.cfg.num_workers,
                                   progress=ctx.progress, items=items, order_seed=ctx.cfg.seed)
