"""Commands of this part for `salfctl` (see training/cli.py): `salfctl data synth`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Dataset root to create (ImageFolder layout + masks)."),
    seed: int = typer.Option(0, "--seed", "-s", help="Seed: the same seed writes byte-identical files."),
    size: str = typer.Option("default", "--size", help="Images-per-class preset: default (200/40/80), "
                                                       "small (48/12/24) or tiny (12/4/6)."),
    train_per_class: Optional[int] = typer.Option(None, "--train-per-class", help="Override the preset."),
    val_per_class: Optional[int] = typer.Option(None, "--val-per-class", help="Override the preset."),
    test_per_class: Optional[int] = typer.Option(None, "--test-per-class", help="Override the preset."),
    image_size: int = typer.Option(112, "--image-size", help="Square image side in pixels."),
    workers: int = typer.Option(1, "--workers", "-j", help="Processes rendering in parallel (same files)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a dataset already in --out (one with "
                                                              "the same parameters is otherwise kept as is)."),
) -> None:
    """Generate the synthetic shapes dataset: coloured, textured shapes, per-image concept masks."""
    from . import synth as synth_lib

    if size not in synth_lib.SIZE_PRESETS:
        raise typer.BadParameter(f"unknown size preset {size!r}; choose from {sorted(synth_lib.SIZE_PRESETS)}",
                                 param_hint="--size")
    per_class = dict(zip(synth_lib.SPLITS, synth_lib.SIZE_PRESETS[size]))
    for split, value in zip(synth_lib.SPLITS, (train_per_class, val_per_class, test_per_class)):
        if value is not None:
            per_class[split] = value
    try:
        summary = synth_lib.generate(out, seed=seed, per_class=per_class, image_size=image_size,
                                     workers=max(1, workers), overwrite=overwrite)
    except (ValueError, FileExistsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    counts = summary.counts
    verb = "kept (same parameters)" if summary.extra.get("reused") else "wrote"
    typer.echo(f"{verb} {summary.root}: {summary.num_classes} classes, {summary.num_concepts} concepts, "
               f"train/val/test = {counts['train']}/{counts['val']}/{counts['test']} images at "
               f"{summary.image_size[0]}x{summary.image_size[1]}, seed {summary.seed}, {summary.seconds:.1f} s")


def register(train_app: typer.Typer, data_app: typer.Typer) -> None:
    """Add this part's commands to the `train` and `data` apps."""
    data_app.command("synth")(synth)
