"""The similarity-source stage: the CBL's targets for the train split, from concept masks or CLIP."""
from __future__ import annotations

from ..data.folder import read_dataset_info
from .context import Context, PipelineError, cbl_train_split, timed


def _object_concepts(ctx: Context) -> list[str]:
    """The mask concepts whose union is a class's object (class-concept mode, masks source)."""
    if ctx.cfg.similarity.object_concepts:
        return list(ctx.cfg.similarity.object_concepts)
    if read_dataset_info(ctx.data).name == "salf-synth":
        from ..data.world import KEY_SHAPES

        return list(KEY_SHAPES)
    raise PipelineError("similarity.class_concepts with the masks source needs similarity.object_concepts: the mask "
                        "concepts whose union is a class's object in this dataset")


def stage_similarity(ctx: Context):
    """The SimilaritySource for the train split: ``(source, clip_info or None)``."""
    cfg = ctx.cfg
    if cfg.similarity.source == "masks":
        from ..similarity import MaskSimilarity

        if cfg.similarity.class_concepts:
            source = MaskSimilarity.for_classes(cfg.similarity.class_concepts, _object_concepts(ctx), ctx.data, "train",
                                                cfg.grid, cfg.radius, cfg.backbone.input_size,
                                                dataset=cbl_train_split(ctx), placement=cfg.grid_placement)
        else:
            source = MaskSimilarity(ctx.data, "train", cfg.grid, cfg.radius, cfg.backbone.input_size,
                                    dataset=cbl_train_split(ctx), placement=cfg.grid_placement)
        return source, None
    if cfg.similarity.source == "clip":
        from ..clip.pipeline import build_clip_source  # lazy: open_clip only when asked for

        with timed(ctx, "similarities"):
            source, _kept = build_clip_source(cfg, ctx.data, ctx.run.root)
        return source, {"model": cfg.clip.model, "pretrained": cfg.clip.pretrained}
    raise PipelineError(f"unknown similarity source {cfg.similarity.source!r}")
