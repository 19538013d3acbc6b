"""`salfctl eval`: the evaluation harness on a trained bundle (training/quality/protocols/)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from salf.cli import command
from training.commands import training_errors


def register(app: typer.Typer) -> None:
    @command(app, "eval", training_errors)
    def evaluate(
        bundle: Path = typer.Argument(..., help="bundle folder, or a training run folder holding bundle/"),
        data: Optional[Path] = typer.Option(None, "--data", help="dataset (train/, test/, optional val/; masks for "
                                                                 "localisation); needed unless --imagenet-seg"),
        imagenet_seg: Optional[Path] = typer.Option(
            None, "--imagenet-seg", help="the ImageNet-segmentation file (gtsegs_ijcv.mat) of the paper's Table 2: "
                                         "class heatmaps of the predicted class against its objects; alone (without "
                                         "--data) the baselines explain the SALF-CBM itself"),
        out: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="eval.json and figures go here"),
        limit: Optional[int] = typer.Option(None, "--limit", help="test images for localisation (default all)"),
        train_limit: Optional[int] = typer.Option(
            None, "--train-limit", help="train images for the fit of the standard models and the dense heads (and "
                                        "the concept neurons' channel baseline): a random draw of N over the "
                                        "train split seeded by --seed, like --limit's of test, so not only the "
                                        "first classes (default all)"),
        baselines: str = typer.Option(",".join(_baselines()), "--baselines",
                                      help="comma-separated heatmap baselines, or 'none'"),
        seed: int = typer.Option(0, "--seed"),
        device: str = typer.Option("auto", "--device", help="auto / cpu / cuda[:k] for the feature passes over "
                                                            "the splits (torchrun: cuda:LOCAL_RANK); the "
                                                            "heatmap protocols run on the CPU"),
        workers: int = typer.Option(0, "--workers", help="image-decoding workers of the feature passes"),
    ) -> None:
        """Classification (Table 1 shape), class-heatmap localisation against GradCAM & co. and trivial maps
        (Table 2 shape), concept localisation, rules and the cost of an explanation; prints the tables,
        writes OUT/eval.json and OUT/localisation.png.

        Under torchrun the ranks share the feature passes over the splits; rank 0 runs the protocols,
        prints the tables and writes the files."""
        from training.runtime import resolve_device

        from .protocols.run import run_eval
        from .report import tables, write

        if not (bundle / "bundle.json").is_file() and (bundle / "bundle" / "bundle.json").is_file():
            bundle = bundle / "bundle"
        chosen = [] if baselines.strip().lower() == "none" else [b.strip() for b in baselines.split(",") if b.strip()]
        unknown = [b for b in chosen if b not in _baselines()]
        if unknown:
            raise typer.BadParameter(f"unknown baseline(s) {unknown}; choose from {', '.join(_baselines())}")
        if data is None and imagenet_seg is None:
            raise typer.BadParameter("give a dataset (--data) or the ImageNet-segmentation file (--imagenet-seg)")
        try:
            resolve_device(device)  # a name torch does not know is a usage error here, not deep in a pass
        except RuntimeError as exc:
            raise typer.BadParameter(f"--device {device!r}: {exc}") from exc
        if data is not None:
            doc = run_eval(bundle, data, limit=limit, baselines=tuple(chosen), seed=seed, train_limit=train_limit,
                           imagenet_seg=imagenet_seg, device=device, num_workers=workers)
        elif _rank() == 0:  # nothing to share between ranks: rank 0 alone
            from .protocols.run import run_imagenet_segmentation

            doc = run_imagenet_segmentation(bundle, imagenet_seg, limit=limit, baselines=tuple(chosen), seed=seed)
        else:
            doc = None
        if doc is None:  # a rank other than 0 under torchrun: rank 0 reports
            return
        from training.data.folder import ImageFolderSplit

        paths = write(doc, out, ImageFolderSplit(data, "test") if data is not None else None)
        # Markdown tables, as docs/results.md has them: stable to read, diff and paste, whatever the terminal.
        typer.echo(f"supervision of the concept maps: {doc['supervision']}")
        for title, lines in tables(doc).items():
            typer.echo("\n".join(["", f"## {title}", "", *lines]))
        for path in paths.values():
            typer.echo(f"wrote {path}", err=True)


def _rank() -> int:
    """This process's rank under torchrun (0 without a launcher)."""
    import os

    return int(os.environ.get("RANK", "0"))


def _baselines() -> tuple[str, ...]:
    from .baselines import BASELINES

    return BASELINES
