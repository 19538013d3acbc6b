"""Commands of this part for `salfctl` (see training/cli.py): `salfctl data synth` and `salfctl data roi`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from salf.cli import EXIT_USAGE, command


def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Dataset root to create (ImageFolder layout + masks)."),
    seed: int = typer.Option(0, "--seed", "-s", help="Seed: the same seed writes byte-identical files."),
    size: str = typer.Option("default", "--size", help="Images-per-class preset (train/val/test/shifted/"
                                                       "shifted-pairs): default (200/40/80/40/10), small "
                                                       "(48/12/24/12/4) or tiny (12/4/6/3/2)."),
    train_per_class: Optional[int] = typer.Option(None, "--train-per-class", help="Override the preset."),
    val_per_class: Optional[int] = typer.Option(None, "--val-per-class", help="Override the preset."),
    test_per_class: Optional[int] = typer.Option(None, "--test-per-class", help="Override the preset."),
    shifted_per_class: Optional[int] = typer.Option(
        None, "--shifted-per-class", help="Override the preset: images of the shifted split (other sizes, aspect "
                                          "ratios, object scales and backgrounds); 0 leaves it out."),
    pairs_per_class: Optional[int] = typer.Option(
        None, "--pairs-per-class", help="Override the preset: two-object images of shifted-pairs; 0 leaves it out."),
    image_size: int = typer.Option(112, "--image-size", help="Square image side in pixels."),
    workers: int = typer.Option(1, "--workers", "-j", help="Processes rendering in parallel (same files)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a dataset already in --out (one with "
                                                              "the same parameters is otherwise kept as is)."),
) -> None:
    """Generate the synthetic shapes dataset: coloured, textured shapes, per-image concept masks, and the
    shifted splits `salfctl eval` scores generalisation on."""
    from . import synth as synth_lib

    if size not in synth_lib.SIZE_PRESETS:
        raise typer.BadParameter(f"unknown size preset {size!r}; choose from {sorted(synth_lib.SIZE_PRESETS)}",
                                 param_hint="--size")
    per_class = dict(zip(synth_lib.ALL_SPLITS, synth_lib.SIZE_PRESETS[size]))
    overrides = (train_per_class, val_per_class, test_per_class, shifted_per_class, pairs_per_class)
    for split, value in zip(synth_lib.ALL_SPLITS, overrides):
        if value is not None:
            per_class[split] = value
    summary = synth_lib.generate(out, seed=seed, per_class=per_class, image_size=image_size,
                                 workers=max(1, workers), overwrite=overwrite)
    counts = summary.counts
    written = summary.extra.get("written", [])
    verb = ("kept (same parameters)" if summary.extra.get("reused") else
            "wrote" if set(written) == set(synth_lib.ALL_SPLITS) else f"added {'/'.join(written)} to")
    typer.echo(f"{verb} {summary.root}: {summary.num_classes} classes, {summary.num_concepts} concepts, "
               f"train/val/test = {counts['train']}/{counts['val']}/{counts['test']} images at "
               f"{summary.image_size[0]}x{summary.image_size[1]}, seed {summary.seed}; shifted/shifted-pairs = "
               f"{counts['shifted']}/{counts['shifted-pairs']} images (other sizes); {summary.seconds:.1f} s")


def roi(
    data: Path = typer.Argument(..., help="Dataset root with masks/ (e.g. made by `salfctl data synth`)."),
    split: str = typer.Option("test", "--split", help="Split of the image."),
    index: int = typer.Option(0, "--index", "-i", help="Image index in the split's order (class, file name)."),
    concept: Optional[list[str]] = typer.Option(None, "--concept", "-c",
                                                help="Concepts whose masks make the ROI (repeatable); "
                                                     "default: every object concept (not backgrounds, not grass)."),
    out: Path = typer.Option(..., "--out", "-o", help="Binary ROI mask PNG to write (the image's own size)."),
) -> None:
    """Write an ROI mask for one dataset image from its concept masks; print the image's path.

    The demo uses it to point Explain Anything / local intervention at the object of a synthetic image.
    """
    import numpy as np
    from PIL import Image

    from .folder import DatasetError, ImageFolderSplit

    ds = ImageFolderSplit(data, split)
    masks = ds.load_masks(index)
    names = ds.concepts or []
    wanted = concept or [n for n in names if "background" not in n and n != "grass"]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise DatasetError(f"unknown concept(s) {unknown}; the dataset has {names}")
    region = masks[[names.index(n) for n in wanted]].any(axis=0)
    if not region.any():
        raise DatasetError(f"concepts {wanted} are absent from {ds.paths[index]}: the ROI would be empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(region.astype(np.uint8) * 255).save(out)
    typer.echo(str(ds.paths[index]))


def register(train_app: typer.Typer, data_app: typer.Typer) -> None:
    """Add this part's commands to the `train` and `data` apps."""
    command(data_app, "synth", errors=lambda: {ValueError: EXIT_USAGE, FileExistsError: EXIT_USAGE})(synth)
    command(data_app, "roi", errors=lambda: {ValueError: EXIT_USAGE, IndexError: EXIT_USAGE})(roi)
