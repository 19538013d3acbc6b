"""`salfctl train {backbone,cbl,head,all}` (see training/cli.py). Heavy imports happen inside the commands."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from salf.cli import EXIT_USAGE, Quiet as QuietOpt, command, configure_logging

CONFIG_HELP = "Preset name from training/configs (e.g. tiny-cpu) or a path to a JSON config."
DATA_HELP = "Dataset root (ImageFolder layout, docs/DESIGN.md); overrides the config's \"data\"."
OUT_HELP = "Run folder: backbone/, features/, cbl/, bundle/, report.json."

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help=CONFIG_HELP)]
DataOpt = Annotated[Optional[Path], typer.Option("--data", "-d", help=DATA_HELP)]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help=OUT_HELP)]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 or auto.")]
PlacementOpt = Annotated[Optional[str], typer.Option(
    "--grid-placement", help="cells or stride: where the prompting grid's centres sit (overrides the config's "
                             "grid_placement; `train similarities` records its own, and a mismatch names this flag).")]
ClassConceptsOpt = Annotated[Optional[str], typer.Option(
    "--class-concepts", help="The paper's zero-shot localisation mode (4.2): one concept per class from this "
                             "template, e.g. 'An image of a {class}' (overrides the config's "
                             "similarity.class_concepts); its map is the class heatmap `salfctl eval` scores.")]


def training_errors() -> dict[type, int]:
    """What a training command reports as a usage/input error (exit 2) rather than a bug."""
    from .backbones import WeightsNotFoundError
    from .data.folder import DatasetError
    from .features import FeatureCacheError
    from .clip.shards import CacheError
    from .pipeline import PipelineError

    return {kind: EXIT_USAGE for kind in (PipelineError, DatasetError, WeightsNotFoundError, FeatureCacheError,
                                          CacheError, FileNotFoundError, ValueError)}


def _run_stage(stage: str, config: str, data: Optional[Path], out: Path, device: Optional[str], quiet: bool,
               class_concepts: Optional[str] = None, grid_placement: Optional[str] = None):
    """Build the run context and run ``training.pipeline.<stage>``; returns ``(ctx, result)``."""
    from . import pipeline
    from .config import load_config

    if quiet:
        configure_logging(-1)
    cfg = load_config(config)
    if device:
        cfg.device = device
    if class_concepts:
        from .similarity import class_prompts

        class_prompts(class_concepts, ["x"])  # a template without {class} is a usage error, before any work
        cfg.similarity.class_concepts = class_concepts
    if grid_placement:
        from salf.contract.grid import PLACEMENTS

        if grid_placement not in PLACEMENTS:
            raise ValueError(f"--grid-placement must be one of {', '.join(PLACEMENTS)}, got {grid_placement!r}")
        cfg.grid_placement = grid_placement
    from .distributed import process_group

    # The launcher rule (training/distributed.py): under torchrun the whole command is one process group;
    # every stage splits its work by rank, and only rank 0 prints.
    with process_group() as (rank, _world):
        ctx = pipeline.make_context(cfg, data, out, progress=not quiet and rank == 0)
        result = getattr(pipeline, stage)(ctx)
    return ctx, (result if rank == 0 else None)


def _print_report(report) -> None:
    from .pipeline import summary_line

    doc = report.to_json()
    typer.echo(f"bundle: {report.bundle}")
    if doc.get("iou_mean") is not None:
        typer.echo(f"concept-map IoU on the test split (half-max threshold): {doc['iou_mean']:.3f} (trained maps) "
                   f"vs {doc['iou_baseline_mean']:.3f} (position-blind baseline); with the paper's mean threshold: "
                   f"{doc['iou_mean_paper_rule']:.3f} vs {doc['iou_baseline_mean_paper_rule']:.3f}")
    typer.echo(f"explanation of {report.explained_image} (true class {report.true_class!r}):")
    typer.echo(report.explanation.describe())
    typer.echo(summary_line(doc))


def backbone(config: ConfigOpt, out: OutOpt, data: DataOpt = None, device: DeviceOpt = None,
             quiet: QuietOpt = False) -> None:
    """Train the backbone with a linear classifier on the train split (stand-in for pre-trained weights)."""
    ctx, path = _run_stage("stage_backbone", config, data, out, device, quiet)
    if path is not None:
        typer.echo(f"backbone weights: {path} ({ctx.timings['backbone']:.0f} s)")


def cbl(config: ConfigOpt, out: OutOpt, data: DataOpt = None, device: DeviceOpt = None,
        quiet: QuietOpt = False, class_concepts: ClassConceptsOpt = None, grid_placement: PlacementOpt = None) -> None:
    """Cache backbone features and train the concept bottleneck layer (with the interpretability cutoff)."""
    _, result = _run_stage("stage_cbl", config, data, out, device, quiet, class_concepts, grid_placement)
    if result is not None:
        typer.echo(f"cbl: {len(result.kept)}/{len(result.val_similarity)} concepts kept, best epoch "
               f"{result.best_epoch}, dropped {[d['concept'] for d in result.dropped]}")


def head(config: ConfigOpt, out: OutOpt, data: DataOpt = None, device: DeviceOpt = None,
         quiet: QuietOpt = False) -> None:
    """Fit the sparse final layer, write the bundle, evaluate on the test split, write report.json (the grid
    placement is the CBL's, from cbl/cbl.json)."""
    _, report = _run_stage("stage_head", config, data, out, device, quiet)
    if report is not None:
        _print_report(report)


def all_(config: ConfigOpt, out: OutOpt, data: DataOpt = None, device: DeviceOpt = None,
         quiet: QuietOpt = False, class_concepts: ClassConceptsOpt = None, grid_placement: PlacementOpt = None) -> None:
    """Everything: backbone (if the preset trains one) -> features -> similarities -> CBL -> head -> bundle -> report."""
    _, report = _run_stage("run_all", config, data, out, device, quiet, class_concepts, grid_placement)
    if report is not None:
        _print_report(report)
        typer.echo(f"wall time {report.wall_seconds:.0f} s")


def random(config: ConfigOpt = "imagenet-rn50",
           out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write."),
           classes: Optional[int] = typer.Option(None, "--classes", help="Classes (default: --class-names' count, "
                                                                          "else 1000)."),
           concepts: Optional[int] = typer.Option(None, "--concepts", help="Concepts (default: --concept-names' "
                                                                            "count, else 4741)."),
           nonzero: Optional[int] = typer.Option(None, "--nonzero-per-class",
                                                 help="Non-zero head weights per class (default: the preset's)."),
           weights: str = typer.Option("random", "--weights", help="Backbone weights: random, preset (the "
                                                                   "preset's own, from the local cache) or a path."),
           concept_names: Optional[Path] = typer.Option(None, "--concept-names", exists=True, dir_okay=False,
                                                        help="Concept names, one per line."),
           class_names: Optional[Path] = typer.Option(None, "--class-names", exists=True, dir_okay=False,
                                                      help="Class names, one per line."),
           seed: Optional[int] = typer.Option(None, "--seed", help="Default: the preset's seed.")) -> None:
    """A bundle at a preset's configuration with random weights and no data (serving and benchmarks at
    the paper's size: `salfctl train random --config imagenet-rn50 --out runs/rn50/bundle`)."""
    import time

    from .random_bundle import WEIGHT_CHOICES, from_config

    if weights not in WEIGHT_CHOICES and not Path(weights).exists():
        raise typer.BadParameter(f"--weights must be random, preset or an existing file, got {weights!r}")
    start = time.perf_counter()
    path = from_config(out, config, classes=classes, concepts=concepts, nonzero_per_class=nonzero, weights=weights,
                       seed=seed, concept_names=concept_names, class_names=class_names)
    from .bundle import read_meta

    meta, _ = read_meta(path)
    typer.echo(f"bundle: {path} ({meta.backbone.arch} {meta.backbone.layer or ''} {meta.backbone.input_size[0]} px, "
               f"{len(meta.concepts)} concepts, {len(meta.classes)} classes, grid {meta.grid[0]}x{meta.grid[1]}, "
               f"random weights, {time.perf_counter() - start:.1f} s)")


def register(train_app: typer.Typer, data_app: typer.Typer) -> None:
    """Add this part's commands to the `train` and `data` apps."""
    for name, fn in (("backbone", backbone), ("cbl", cbl), ("head", head), ("all", all_), ("random", random)):
        command(train_app, name, errors=training_errors)(fn)
