"""One training stage on synthetic data in a process of its own, for `make bench-scale` and the memory test:
prints one JSON line with the stage's wall time, throughput and peak resident set.

    python -m tests.bench.scale_probe features --n N --dir D      # feature caches D/train (N), D/val (N/8)
    python -m tests.bench.scale_probe cbl --dir D --concepts M    # the CBL trainer on them
    python -m tests.bench.scale_probe head --dir D --concepts M   # activation files + head path + histograms
    python -m tests.bench.scale_probe head --in-memory ...        # control: the activations in RAM instead

The data are the real stages' inputs with synthetic content: seeded noise images through a real (tiny,
randomly initialised) backbone into a real feature cache; CBL targets from a seeded similarity source of
``M`` concepts (each image's targets drawn from a generator seeded by its index, so nothing of size N is
held); a random CBL for the head. Each stage runs in its own process so that ``VmHWM`` is that
stage's peak (plus the interpreter and torch: the ``baseline_mb`` field, measured before the stage).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

SIZE, GRID, CLASSES = (32, 32), (2, 2), 10


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    """The process's peak resident set, ``VmHWM`` (its own: ``ru_maxrss`` would carry a forking parent's peak
    across exec, e.g. a large pytest process)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


class NoiseImages(torch.utils.data.Dataset):
    """``n`` seeded uint8 images ``[H, W, 3]`` with labels ``i % CLASSES``; nothing of size n in memory."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randint(0, 256, (*SIZE, 3), generator=g, dtype=torch.uint8), i % CLASSES


class SeededSource:
    """CBL targets ``[B, M, Gh, Gw]`` drawn per image from a generator seeded by the image's index."""

    def __init__(self, n: int, concepts: int) -> None:
        self.n, self.concepts, self.grid = n, [f"c{k}" for k in range(concepts)], GRID

    def __len__(self) -> int:
        return self.n

    def similarities(self, indices) -> torch.Tensor:
        out = torch.empty(len(indices), len(self.concepts), *GRID)
        for row, i in enumerate(indices):
            out[row] = torch.rand(len(self.concepts), *GRID, generator=torch.Generator().manual_seed(int(i)))
        return out


def backbone():
    from training.backbones import BackboneSpec, build_backbone

    torch.manual_seed(0)
    return build_backbone(BackboneSpec(arch="salf_tinycnn", input_size=SIZE, width=8)).eval()


def split(n: int):
    from training.cbl import ValSplit

    n_val = max(64, n // 8)
    return ValSplit(list(range(n)), list(range(n, n + n_val)), n_val / (n + n_val), 0, n + n_val)


def stage_features(args) -> dict:
    from training.features import build_feature_cache

    n_val = max(64, args.n // 8)
    data = NoiseImages(args.n + n_val)
    t = time.perf_counter()
    for part, items in (("train", range(args.n)), ("val", range(args.n, args.n + n_val))):
        cache = build_feature_cache(backbone(), data, GRID, Path(args.dir) / part, {"probe": 1}, batch_size=256,
                                    shard_size=1024, items=list(items), order_seed=0, progress=False)
    return {"items": args.n + n_val, "wall_s": time.perf_counter() - t, "feature_dim": cache.feature_dim}


def _caches(args):
    from training.features import FeatureCache

    return FeatureCache(Path(args.dir) / "train"), FeatureCache(Path(args.dir) / "val")


def stage_cbl(args) -> dict:
    from training.cbl import train_cbl
    from training.config import CBLCfg

    cache, val = _caches(args)
    cfg = CBLCfg(epochs=args.epochs, patience=args.epochs + 1, batch_size=256, interpretability_cutoff=-1.0)
    t = time.perf_counter()
    train_cbl(cache, SeededSource(len(cache) + len(val), args.concepts), split(len(cache)), cfg, 0, "cpu",
              progress=False, val_cache=val)
    return {"items": args.epochs * len(cache), "wall_s": time.perf_counter() - t}


def stage_head(args) -> dict:
    from training.activations import FileDesign, TensorDesign, block_histogram, write_activations
    from training.head import fit_path

    cache, val = _caches(args)
    weight = torch.randn(args.concepts, cache.feature_dim, 1, 1, generator=torch.Generator().manual_seed(0))
    out = Path(args.dir) / "head"
    t = time.perf_counter()
    for name, c in (("train", cache), ("val", val)):
        write_activations(c, out / name, {"probe": name}, weight, "avg", block_rows=2048)
    dev = torch.device("cpu")
    tr, va = FileDesign(out / "train", dev, 0), FileDesign(out / "val", dev, 0)
    if args.in_memory:  # the control: what the head did before it went out of core
        xs, ys = zip(*((x.clone(), y.clone()) for x, y in tr.blocks()))
        tr = TensorDesign(torch.cat(xs), torch.cat(ys), dev)
    fit_path(tr, None, CLASSES, 0.99, 5, path_length=3, max_iters=args.iters, tol=1e-9, x_val=va, device=dev)
    block_histogram(tr)
    return {"items": len(cache), "wall_s": time.perf_counter() - t}


STAGES = {"features": stage_features, "cbl": stage_cbl, "head": stage_head}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--dir", required=True)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--concepts", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--in-memory", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import training.activations, training.cbl, training.features, training.head  # noqa: F401,E401 (in the baseline)

    baseline = rss_mb()
    doc = STAGES[args.stage](args)
    doc.update(stage=args.stage, baseline_mb=round(baseline, 1), peak_rss_mb=round(peak_mb(), 1),
               items_per_s=doc["items"] / doc["wall_s"], in_memory=args.in_memory)
    print(json.dumps(doc))


if __name__ == "__main__":
    main(sys.argv[1:])
