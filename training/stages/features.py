"""The features stage: cache the backbone's grid features of a split, keyed by what made them."""
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


def stage_features(ctx: Context, split: str, backbone=None):
    """Cache the grid features of ``split`` (reused when the key matches); returns a FeatureCache."""
    from ..features import build_feature_cache

    with timed(ctx, f"features_{split}"):
        spec = backbone_spec(ctx)
        backbone = backbone or build_backbone(spec).to(ctx.device)
        dataset = cbl_train_split(ctx) if split == "train" else split_dataset(ctx, split)
        # The image fingerprint is in the key: the path and count alone reused a stale cache after the
        # dataset at the same path was regenerated (e.g. `data synth` with another seed).
        key = {"backbone": {**spec.to_dict(), "weights": _weights_digest(spec)}, "split": split,
               "data": str(ctx.data.resolve()), "images": images_fingerprint(dataset.paths)}
        if split == "train" and views_key(ctx):
            key["views"] = views_key(ctx)
        return build_feature_cache(backbone, dataset, ctx.cfg.grid, ctx.run.features / split, key,
                                   batch_size=ctx.cfg.cbl.feature_batch_size, shard_size=ctx.cfg.cbl.shard_size,
                                   dtype=ctx.cfg.cbl.feature_cache_dtype, num_workers=ctx.cfg.num_workers,
                                   progress=ctx.progress)
