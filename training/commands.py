"""`salfctl train {backbone,cbl,head,all}` (see training/cli.py). Heavy imports happen inside the commands."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

CONFIG_HELP = "Preset name from training/configs (e.g. tiny-cpu) or a path to a JSON config."
DATA_HELP = "Dataset root (ImageFolder layout, docs/DESIGN.md); overrides the config's \"data\"."
OUT_HELP = "Run folder: backbone/, features/, cbl/, bundle/, report.json."


def _context(config: str, data: Optional[Path], out: Path, device: Optional[str], quiet: bool):
    from .config import load_config
    from .pipeline import make_context

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(config)
    if device:
        cfg.device = device
    return make_context(cfg, data, out, progress=not quiet)


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2) from exc


def _expected_errors() -> tuple[type[Exception], ...]:
    from .backbones import WeightsNotFoundError
    from .data.folder import DatasetError
    from .features import FeatureCacheError
    from .pipeline import PipelineError

    return (PipelineError, DatasetError, WeightsNotFoundError, FeatureCacheError, FileNotFoundError, ValueError)


def _print_report(report: dict) -> None:
    from .pipeline import summary_line

    typer.echo(f"bundle: {report['bundle']}")
    if report.get("iou_mean") is not None:
        typer.echo(f"concept-map IoU on the test split (half-max threshold): {report['iou_mean']:.3f} (trained maps) "
                   f"vs {report['iou_baseline_mean']:.3f} (position-blind baseline); with the paper's mean threshold: "
                   f"{report['iou_mean_paper_rule']:.3f} vs {report['iou_baseline_mean_paper_rule']:.3f}")
    ex = report["explanation"]
    typer.echo(f"explanation of {ex['image']} (true class {ex['true_class']!r}):")
    typer.echo(report["_explanation_text"])
    typer.echo(summary_line(report))


ConfigOpt = Annotated[str, typer.Option("--config", "-c", help=CONFIG_HELP)]
DataOpt = Annotated[Optional[Path], typer.Option("--data", "-d", help=DATA_HELP)]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help=OUT_HELP)]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 or auto.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info logs.")]


def _run_stage(stage: str, config: str, data: Optional[Path], out: Path, device: Optional[str], quiet: bool):
    """Build the run context and run ``training.pipeline.<stage>``; expected errors exit 2 with a message."""
    try:
        from . import pipeline

        ctx = _context(config, data, out, device, quiet)
        return ctx, getattr(pipeline, stage)(ctx)
    except _expected_errors() as exc:
        _fail(exc)


def backbone(config: ConfigOpt, out: OutOpt, data: DataOpt = None, device: DeviceOpt = None,
             quiet: QuietOpt = False) -> None:
    """Train the backbone with a linear classifier on the train split (stand-in for pre-trained weights)."""
    ctx, path = _run_stage("stage_backbone", config, data, out, device, quiet)
    typer.echo(f"backbone weights: {path} ({ctx.timings['backbone']:.0f} s)")


def cbl(config: ConfigOpt, out: OutOpt, data: DataOpt = None, device: DeviceOpt = None,
        quiet: QuietOpt = False) -> None:
    """Cache backbone features and train the concept bottleneck layer (with the interpretability cutoff)."""
    _, result = _run_stage("stage_cbl", config, data, out, device, quiet)
    typer.echo(f"cbl: {len(result.kept)}/{len(result.val_similarity)} concepts kept, best epoch "
               f"{result.best_epoch}, dropped {[d['concept'] for d in result.dropped]}")


def head(config: ConfigOpt, out: OutOpt, data: DataOpt = None, device: DeviceOpt = None,
         quiet: QuietOpt = False) -> None:
    """Fit the sparse final layer, write the bundle, evaluate on the test split, write report.json."""
    _, report = _run_stage("stage_head", config, data, out, device, quiet)
    _print_report(report)


def all_(config: ConfigOpt, out: OutOpt, data: DataOpt = None, device: DeviceOpt = None,
         quiet: QuietOpt = False) -> None:
    """Everything: backbone (if the preset trains one) -> features -> similarities -> CBL -> head -> bundle -> report."""
    _, report = _run_stage("run_all", config, data, out, device, quiet)
    _print_report(report)
    typer.echo(f"wall time {report['wall_seconds']:.0f} s")


def register(train_app: typer.Typer, data_app: typer.Typer) -> None:
    """Add this part's commands to the `train` and `data` apps."""
    train_app.command("backbone")(backbone)
    train_app.command("cbl")(cbl)
    train_app.command("head")(head)
    train_app.command("all")(all_)
