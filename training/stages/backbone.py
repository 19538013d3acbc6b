"""The backbone stage: train it on the train split when the preset asks, and the spec every later stage
builds the backbone from."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..backbones import BackboneSpec
from .context import Context, PipelineError, split_dataset, timed


def stage_backbone(ctx: Context) -> Path:
    """Train the backbone on the train split (stand-in for pre-training); returns the weights path. Under
    torchrun rank 0 trains it and the other ranks wait at a barrier: the stand-in is small, and a
    backbone at the paper's scale comes pre-trained (``backbone.weights``)."""
    from ..backbone_train import WEIGHTS_FILE, train_backbone
    from ..distributed import barrier, rank_world

    ds = split_dataset(ctx, "train")
    with timed(ctx, "backbone"):
        if rank_world()[0] == 0:
            train_backbone(ctx.cfg.backbone, ds, len(ds.classes), ctx.cfg.backbone_train, ctx.run.backbone,
                           ctx.cfg.seed, ctx.device, ctx.cfg.num_workers, ctx.progress)
        barrier()
    return ctx.run.backbone / WEIGHTS_FILE


def backbone_spec(ctx: Context) -> BackboneSpec:
    """The config's backbone, with the weights of `train backbone` when the preset asks for them."""
    spec = ctx.cfg.backbone
    if ctx.cfg.backbone_train.enabled:
        from ..backbone_train import WEIGHTS_FILE

        path = ctx.run.backbone / WEIGHTS_FILE
        if not path.is_file():
            raise PipelineError(f"the preset trains its own backbone but {path} does not exist; "
                                f"run `salfctl train backbone` (or `train all`) first")
        spec = replace(spec, weights=str(path.resolve()))
    return spec
