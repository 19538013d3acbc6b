"""What every stage shares: the run folder's layout, the run context and the datasets the stages read."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import SalfConfig
from ..data.folder import read_dataset_info
from ..runtime import resolve_device


class PipelineError(RuntimeError):
    """A stage cannot run: missing input from an earlier stage, or a bad dataset/config combination."""


@dataclass
class RunPaths:
    root: Path

    @property
    def backbone(self) -> Path:
        return self.root / "backbone"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def similarities(self) -> Path:
        return self.root / "similarities"

    @property
    def cbl(self) -> Path:
        return self.root / "cbl"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def report(self) -> Path:
        return self.root / "report.json"


@dataclass
class Context:
    cfg: SalfConfig
    data: Path
    run: RunPaths
    progress: bool = True
    timings: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return resolve_device(self.cfg.device)


def make_context(cfg: SalfConfig, data: str | Path | None, out: str | Path, progress: bool = True) -> Context:
    root = data or cfg.data
    if root is None:
        raise PipelineError("no dataset: pass --data DATA or set \"data\" in the config")
    info = read_dataset_info(root)  # fails early with a clear DatasetError
    missing = [s for s in ("train", "test") if not (Path(root) / s).is_dir()]
    if missing:
        raise PipelineError(f"dataset {root} has no {' and no '.join(missing)} split folder; training needs "
                            f"train/ and the evaluation test/ (docs/DESIGN.md dataset layout)")
    if cfg.similarity.source == "masks" and not info.has_masks:
        raise PipelineError(f"the masks similarity source needs per-image concept masks, and dataset {root} has none "
                            f"(no masks/ folder); use a preset with \"similarity\": {{\"source\": \"clip\"}}")
    run = RunPaths(Path(out))
    run.root.mkdir(parents=True, exist_ok=True)
    return Context(cfg, Path(root), run, progress)


@contextlib.contextmanager
def timed(ctx: Context, name: str):
    """Adds the block's wall time to ``ctx.timings[name]`` (report.json's ``timings_s``)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        ctx.timings[name] = time.perf_counter() - t


def split_dataset(ctx: Context, split: str):
    from ..data.folder import ImageFolderSplit

    return ImageFolderSplit(ctx.data, split, ctx.cfg.backbone.input_size)


def cbl_train_split(ctx: Context):
    """What the CBL and the head train on: the train split, or its cached views (``cbl.views > 1``,
    training/augment.py)."""
    ds = split_dataset(ctx, "train")
    views = int(ctx.cfg.cbl.views)
    if views == 1:
        return ds
    if ctx.cfg.similarity.source != "masks":
        raise PipelineError(f"cbl.views = {views} needs the masks similarity source: the {ctx.cfg.similarity.source} "
                            f"source computes its similarities from the image files, and warped views are not "
                            f"files; set cbl.views to 1")
    from ..augment import AffineRange, AugmentedViews

    return AugmentedViews(ds, views, ctx.cfg.seed, AffineRange(zoom=tuple(ctx.cfg.cbl.view_zoom)))


def views_key(ctx: Context) -> dict | None:
    c = ctx.cfg.cbl
    return None if c.views == 1 else {"views": c.views, "zoom": list(c.view_zoom), "seed": ctx.cfg.seed}
