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

The stages live in training/stages/ (one module each); this module is the pipeline's public entry:
:func:`run_all`, and the names the CLI (training/commands.py: ``getattr(pipeline, stage)``) and the
tests use, re-exported from there.
"""
from __future__ import annotations

import time

from .stages.backbone import backbone_spec, stage_backbone
from .stages.cbl import stage_cbl
from .stages.context import Context, PipelineError, RunPaths, make_context
from .stages.features import stage_features, train_split
from .stages.head import ConceptData, stage_head
from .stages.report import TrainReport, summary_line
from .stages.similarity_source import stage_similarity


def run_all(ctx: Context) -> TrainReport | None:
    """`train all`: backbone (if the preset asks) -> features -> similarities -> CBL -> head -> bundle ->
    evaluation -> report. Returns the report (also in RUN/report.json; None on ranks other than 0)."""
    start = time.perf_counter()
    if ctx.cfg.backbone_train.enabled:
        stage_backbone(ctx)
    split = train_split(ctx)
    caches = stage_features(ctx, "train", parts=split), stage_features(ctx, "val", parts=split)
    stage_cbl(ctx, caches)
    report = stage_head(ctx, caches)
    if report is not None:
        report.wall_seconds = time.perf_counter() - start
        report.write(ctx.run.report)
    return report


__all__ = ["ConceptData", "Context", "PipelineError", "RunPaths", "TrainReport", "backbone_spec", "make_context", "run_all", "stage_backbone",
           "stage_cbl", "stage_features", "stage_head", "stage_similarity", "summary_line"]
