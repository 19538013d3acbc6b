"""Synthetic test bed on disk: the world of training/data/world.py, drawn by training/data/paint.py,
written as an ImageFolder dataset with per-image concept masks (``masks/<split>/<class>/*.npz``) and
``dataset.json``/``classes.txt``/``concepts.txt``.

Determinism: image ``(split, class, index)`` draws from
``np.random.default_rng(SeedSequence([seed, split_id, class_id, index]))``, so files are
byte-identical for a seed whatever the order or number of worker processes (for given NumPy,
zlib and Pillow versions: their algorithms define the bytes). PNGs carry no
timestamps; mask ``.npz`` files are written with a fixed zip date (``numpy.savez`` stamps the
current time).
"""
from __future__ import annotations

import io
import json
import logging
import shutil
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .paint import render, render_pair, render_shifted
from .world import CLASS_NAMES, CLASSES, CONCEPTS, SHIFT

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SHIFTED, PAIRS = "shifted", "shifted-pairs"
ALL_SPLITS = (*SPLITS, SHIFTED, PAIRS)
SPLIT_IDS = {name: i for i, name in enumerate(ALL_SPLITS)}  # appended: the first three's bytes never move

SIZE_PRESETS = {  # images per class: (train, val, test, shifted, shifted-pairs)
    "default": (200, 40, 80, 40, 10),
    "small": (48, 12, 24, 12, 4),
    "tiny": (12, 4, 6, 3, 2),
}
MIN_IMAGE_SIZE = 32


@dataclass
class SynthSummary:
    """What :func:`generate` wrote."""

    root: Path
    seed: int
    image_size: tuple[int, int]
    counts: dict[str, int]
    num_classes: int
    num_concepts: int
    seconds: float
    extra: dict = field(default_factory=dict)


def image_rng(seed: int, split: str, class_id: int, index: int) -> np.random.Generator:
    """The generator for one image: independent of generation order."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], class_id, index]))


# ----------------------------------------------------------------------------- files
def save_masks_npz(path: Path, masks: np.ndarray, **extra: np.ndarray) -> None:
    """Write ``masks`` (bool ``[M, H, W]``) as an ``.npz`` with key ``masks`` (and any ``extra`` arrays)
    and a fixed zip date."""
    arrays = {"masks": np.ascontiguousarray(masks, dtype=bool), **{k: np.ascontiguousarray(v) for k, v in extra.items()}}
    with zipfile.ZipFile(path, "w") as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, array, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def _write_one(job: tuple[str, int, int, int, tuple[int, int]], root: Path) -> None:
    split, class_id, index, seed, size = job
    rng = image_rng(seed, split, class_id, index)
    extra = {}
    if split == SHIFTED:
        image, masks = render_shifted(class_id, rng)
    elif split == PAIRS:
        image, masks, objects, classes = render_pair(class_id, rng)
        extra = {"objects": objects, "classes": classes}
    else:
        image, masks = render(class_id, size, rng)
    name = f"{index:05d}"
    cls = CLASS_NAMES[class_id]
    # zlib level 1: ~2x faster to encode than the default 6, files ~10% larger (noisy backgrounds)
    Image.fromarray(image).save(root / split / cls / f"{name}.png", format="PNG", compress_level=1)
    save_masks_npz(root / "masks" / split / cls / f"{name}.npz", masks, **extra)


def _write_chunk(jobs: list, root: str) -> int:
    for job in jobs:
        _write_one(job, Path(root))
    return len(jobs)


def _validate(seed: int, per_class: dict[str, int], image_size: int) -> None:
    unknown = sorted(set(per_class) - set(ALL_SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown} in per_class; splits are {list(ALL_SPLITS)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be >= {MIN_IMAGE_SIZE} px, got {image_size}")
    for split in ALL_SPLITS:
        if per_class.get(split, -1) < 0:
            raise ValueError(f"images per class for split {split!r} must be >= 0, got {per_class.get(split)}")
    if per_class["train"] < 1:
        raise ValueError("the train split needs at least one image per class")


def generate(root: str | Path, seed: int = 0, per_class: dict[str, int] | None = None, image_size: int = 112,
             workers: int = 1, overwrite: bool = False) -> SynthSummary:
    """Write the synthetic dataset to ``root`` in the DESIGN layout and return a summary.

    ``per_class``: images per class for ``train``/``val``/``test``/``shifted``/``shifted-pairs`` (missing
    keys from ``SIZE_PRESETS["default"]``; 0 leaves a split out). ``workers > 1`` renders in that many
    processes; the files are identical either way. ``dataset.json`` is written last, so its presence marks
    a complete dataset. If ``root`` already holds a dataset of the same world (seed, size, classes,
    concepts), only the splits whose counts differ or whose files are incomplete are written
    (``summary.extra["written"]``; none: ``extra["reused"]``): a dataset made before the shifted splits
    existed gains them without its other files moving. Another world is an error unless ``overwrite``.
    """
    per_class = dict(zip(ALL_SPLITS, SIZE_PRESETS["default"])) | dict(per_class or {})
    _validate(seed, per_class, image_size)
    root = Path(root)
    start = time.perf_counter()
    size = (image_size, image_size)
    counts = {split: per_class[split] * len(CLASSES) for split in ALL_SPLITS}
    meta = _metadata(seed, size, counts)
    todo = _splits_to_write(root, meta, overwrite)
    if not todo:
        log.info("synthetic dataset already present with the same parameters: %s", root)
        return SynthSummary(root, seed, size, counts, len(CLASSES), len(CONCEPTS), 0.0, {"reused": True, "written": []})
    (root / "dataset.json").unlink(missing_ok=True)  # incomplete until the last line below
    for split in todo:
        for base in (root / split, root / "masks" / split):
            shutil.rmtree(base, ignore_errors=True)
            if counts[split]:
                for cls in CLASS_NAMES:
                    (base / cls).mkdir(parents=True, exist_ok=True)
    jobs = [(split, c, i, seed, size) for split in todo for c in range(len(CLASSES)) for i in range(per_class[split])]
    if workers > 1 and len(jobs) > 1:
        chunks = [jobs[k::workers * 4] for k in range(workers * 4)]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            done = sum(pool.map(_write_chunk, chunks, [str(root)] * len(chunks)))
        assert done == len(jobs)
    else:
        _write_chunk(jobs, str(root))
    _write_metadata(root, meta)
    seconds = time.perf_counter() - start
    log.info("synthetic dataset: %s images in %.1f s at %s (wrote %s)", counts, seconds, root, todo)
    return SynthSummary(root, seed, size, counts, len(CLASSES), len(CONCEPTS), seconds,
                        {"reused": False, "written": todo})


WORLD_KEYS = ("name", "seed", "image_size", "classes", "concepts", "has_masks")


def _metadata(seed: int, size: tuple[int, int], counts: dict[str, int]) -> dict:
    return {
        "name": "salf-synth",
        "seed": seed,
        "image_size": list(size),
        "classes": list(CLASS_NAMES),
        "concepts": list(CONCEPTS),
        "splits": counts,
        "has_masks": True,
        "shift": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(SHIFT).items()},
    }


def _splits_to_write(root: Path, meta: dict, overwrite: bool) -> list[str]:
    """The splits :func:`generate` must (re)write into ``root`` for ``meta``."""
    if overwrite:
        for meta_file in ("dataset.json", "classes.txt", "concepts.txt"):
            (root / meta_file).unlink(missing_ok=True)
        for sub in (*ALL_SPLITS, "masks"):
            shutil.rmtree(root / sub, ignore_errors=True)
        return list(ALL_SPLITS)
    try:
        existing = json.loads((root / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError):
        existing = None
    if existing is None:
        if any((root / s).exists() for s in (*ALL_SPLITS, "masks")):
            raise FileExistsError(f"{root} already holds an incomplete dataset; overwrite it explicitly "
                                  f"(--overwrite) to replace it")
        return list(ALL_SPLITS)
    if any(existing.get(k) != meta[k] for k in WORLD_KEYS):
        raise FileExistsError(f"{root} already holds a different or incomplete dataset; "
                              f"overwrite it explicitly (--overwrite) to replace it")
    todo = []
    for split, n in meta["splits"].items():
        same = existing.get("splits", {}).get(split) == n
        if split in (SHIFTED, PAIRS) and n:
            same = same and existing.get("shift") == meta["shift"]
        if not (same and _complete(root, split, n)):
            todo.append(split)
    return todo


def _complete(root: Path, split: str, n: int) -> bool:
    return (len(list((root / split).glob("*/*.png"))) == n
            and len(list((root / "masks" / split).glob("*/*.npz"))) == n)


def _write_metadata(root: Path, meta: dict) -> None:
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in meta["classes"]))
    (root / "concepts.txt").write_text("".join(f"{c}\n" for c in meta["concepts"]))
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
