"""`salfctl train {backbone,cbl,head,all}` (see training/cli.py). Heavy imports happen inside the commands."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

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


def backbone(config: str = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
             data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP),
             out: Path = typer.Option(..., "--out", "-o", help=OUT_HELP),
             device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 or auto."),
             quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or info logs.")) -> None:
    """Train the backbone with a linear classifier on the train split (stand-in for pre-trained weights)."""
    try:
        from .pipeline import stage_backbone

        ctx = _context(config, data, out, device, quiet)
        path = stage_backbone(ctx)
    except _expected_errors() as exc:
        _fail(exc)
    typer.echo(f"backbone weights: {path} ({ctx.timings['backbone']:.0f} s)")


def cbl(config: str = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
        data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP),
        out: Path = typer.Option(..., "--out", "-o", help=OUT_HELP),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 or auto."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or info logs.")) -> None:
    """Cache backbone features and train the concept bottleneck layer (with the interpretability cutoff)."""
    try:
        from .pipeline import stage_cbl

        ctx = _context(config, data, out, device, quiet)
        result = stage_cbl(ctx)
    except _expected_errors() as exc:
        _fail(exc)
    typer.echo(f"cbl: {len(result.kept)}/{len(result.val_similarity)} concepts kept, best epoch "
               f"{result.best_epoch}, dropped {[d['concept'] for d in result.dropped]}")


def head(config: str = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
         data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP),
         out: Path = typer.Option(..., "--out", "-o", help=OUT_HELP),
         device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 or auto."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or info logs.")) -> None:
    """Fit the sparse final layer, write the bundle, evaluate on the test split, write report.json."""
    try:
        from .pipeline import stage_head

        ctx = _context(config, data, out, device, quiet)
        report = stage_head(ctx)
    except _expected_errors() as exc:
        _fail(exc)
    _print_report(report)


def all_(config: str = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
         data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP),
         out: Path = typer.Option(..., "--out", "-o", help=OUT_HELP),
         device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 or auto."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or info logs.")) -> None:
    """Everything: backbone (if the preset trains one) -> features -> similarities -> CBL -> head -> bundle -> report."""
    try:
        from .pipeline import run_all

        ctx = _context(config, data, out, device, quiet)
        report = run_all(ctx)
    except _expected_errors() as exc:
        _fail(exc)
    _print_report(report)
    typer.echo(f"wall time {report['wall_seconds']:.0f} s")


def register(train_app: typer.Typer, data_app: typer.Typer) -> None:
    """Add this part's commands to the `train` and `data` apps."""
    train_app.command("backbone")(backbone)
    train_app.command("cbl")(cbl)
    train_app.command("head")(head)
    train_app.command("all")(all_)
