"""ImageFolder datasets in the DESIGN layout: ``DATA/<split>/<class>/*.(png|jpg|jpeg|webp)``.

Index order (used by feature caches, similarity sources and embedding caches): sorted by
(class index, file name). Classes come from ``classes.txt`` when present (index = label), else from
the sorted union of class folder names over all splits, so labels agree between splits.
Images are decoded and preprocessed by ``salf.contract.images`` (the gateway's and export's path too):
upright (EXIF), RGB, bilinear resize to ``input_size`` ``(H, W)``, uint8 ``[H, W, 3]``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from salf.contract.images import image_size, load_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """The dataset on disk does not match the expected layout."""


@dataclass
class DatasetInfo:
    """Metadata of a dataset root: ``dataset.json`` / ``classes.txt`` / ``concepts.txt`` where present."""

    root: Path
    classes: list[str]
    concepts: list[str] | None  # None: no concepts.txt (bring a concept list of your own)
    has_masks: bool
    name: str
    image_size: tuple[int, int] | None  # native size from dataset.json, if recorded
    seed: int | None
    splits: dict[str, int] | None


def _read_lines(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DatasetError(f"{path} is empty")
    if len(set(lines)) != len(lines):
        dupes = sorted({x for x in lines if lines.count(x) > 1})
        raise DatasetError(f"{path} lists duplicates: {dupes}")
    return lines


def _folder_classes(root: Path) -> list[str]:
    names = {p.name for split in SPLITS if (root / split).is_dir() for p in (root / split).iterdir() if p.is_dir()}
    return sorted(names)


def read_dataset_info(root: str | Path) -> DatasetInfo:
    """Read a dataset root's metadata. Raises :class:`DatasetError` if it is not a dataset."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    meta: dict = {}
    if (root / "dataset.json").is_file():
        try:
            meta = json.loads((root / "dataset.json").read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{root / 'dataset.json'}: invalid JSON: {exc}") from exc
    if (root / "classes.txt").is_file():
        classes = _read_lines(root / "classes.txt")
    elif meta.get("classes"):
        classes = [str(c) for c in meta["classes"]]
    else:
        classes = _folder_classes(root)
    if not classes:
        raise DatasetError(f"{root}: no classes.txt and no class folders under {'/'.join(SPLITS)}")
    if meta.get("classes") and list(meta["classes"]) != classes:
        raise DatasetError(f"{root}: dataset.json classes disagree with classes.txt")
    if (root / "concepts.txt").is_file():
        concepts = _read_lines(root / "concepts.txt")
        if meta.get("concepts") and list(meta["concepts"]) != concepts:
            raise DatasetError(f"{root}: dataset.json concepts disagree with concepts.txt")
    else:
        concepts = list(meta["concepts"]) if meta.get("concepts") else None
    has_masks = bool(meta.get("has_masks", (root / "masks").is_dir()))
    size = meta.get("image_size")
    return DatasetInfo(root=root, classes=classes, concepts=concepts, has_masks=has_masks,
                       name=str(meta.get("name", root.name)), image_size=tuple(size) if size else None,
                       seed=meta.get("seed"), splits=meta.get("splits"))


def resize_masks_nearest(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of bool ``[M, h, w]`` to ``[M, H, W]`` (pixel-centre sampling,
    the convention of ``F.interpolate(mode="nearest-exact")``)."""
    h, w = masks.shape[-2:]
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return masks
    ys = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return masks[:, ys[:, None], xs[None, :]]


class ImageFolderSplit(Dataset):
    """One split of an ImageFolder dataset.

    ``dataset[i] -> (uint8 tensor [H, W, 3], label int)``; ``input_size`` ``(H, W)`` or None (keep the
    file's size). ``load_masks(i)`` returns the concept masks bool ``[M, H, W]`` at the input size.
    """

    def __init__(self, root: str | Path, split: str, input_size: tuple[int, int] | None = None) -> None:
        self.info = read_dataset_info(root)
        self.root = self.info.root
        self.split = split
        self.input_size = tuple(int(v) for v in input_size) if input_size is not None else None
        if self.input_size is not None and (len(self.input_size) != 2 or min(self.input_size) < 1):
            raise ValueError(f"input_size must be (H, W) with positive sides, got {input_size}")
        split_dir = self.root / split
        if not split_dir.is_dir():
            present = [s for s in SPLITS if (self.root / s).is_dir()]
            raise DatasetError(f"split folder {split_dir} does not exist (splits present: {present or 'none'})")
        self._paths, self._labels = self._scan(split_dir)
        if not self._paths:
            raise DatasetError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders")
        log.debug("%s/%s: %d images, %d classes", self.root, split, len(self._paths), len(self.classes))

    def _scan(self, split_dir: Path) -> tuple[list[Path], list[int]]:
        index = {name: i for i, name in enumerate(self.info.classes)}
        unknown = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in index)
        if unknown:
            raise DatasetError(f"{split_dir}: class folder(s) {unknown} are not in the class list {self.info.classes}")
        paths: list[Path] = []
        labels: list[int] = []
        for label, name in enumerate(self.info.classes):
            folder = split_dir / name
            if not folder.is_dir():
                continue
            files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            paths += files
            labels += [label] * len(files)
        return paths, labels

    @property
    def classes(self) -> list[str]:
        return list(self.info.classes)

    @property
    def concepts(self) -> list[str] | None:
        return None if self.info.concepts is None else list(self.info.concepts)

    @property
    def paths(self) -> list[Path]:
        return list(self._paths)

    @property
    def labels(self) -> list[int]:
        return list(self._labels)

    @property
    def has_masks(self) -> bool:
        return self.info.has_masks

    def __len__(self) -> int:
        return len(self._paths)

    def _check_index(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images in split {self.split!r}")
        return i % len(self)

    def image(self, i: int) -> np.ndarray:
        """uint8 ``[H, W, 3]`` numpy image ``i`` (preprocessed)."""
        return load_image(self._paths[self._check_index(i)], self.input_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = self._check_index(int(i))
        return torch.from_numpy(self.image(i)), self._labels[i]

    def mask_path(self, i: int) -> Path:
        path = self._paths[self._check_index(i)]
        return self.root / "masks" / self.split / path.parent.name / f"{path.stem}.npz"

    def load_masks(self, i: int) -> np.ndarray:
        """Concept masks of image ``i``: bool ``[M, H, W]`` at the input size (nearest resize)."""
        if not self.has_masks:
            raise DatasetError(f"dataset {self.root} has no concept masks (dataset.json has_masks is false "
                               f"or there is no masks/ folder); use the clip similarity source instead")
        path = self.mask_path(i)
        if not path.is_file():
            raise DatasetError(f"mask file {path} for image {self._paths[i]} is missing")
        with np.load(path, allow_pickle=False) as npz:
            if "masks" not in npz.files:
                raise DatasetError(f"{path} has no 'masks' array (keys: {npz.files})")
            masks = npz["masks"]
        if masks.ndim != 3 or masks.dtype != np.bool_:
            raise DatasetError(f"{path}: masks must be bool [M, H, W], got {masks.dtype} {list(masks.shape)}")
        if self.info.concepts is not None and masks.shape[0] != len(self.info.concepts):
            raise DatasetError(f"{path}: {masks.shape[0]} masks but {len(self.info.concepts)} concepts in concepts.txt")
        size = self.input_size or self._image_size(i)
        return resize_masks_nearest(masks, size)

    def load_objects(self, i: int) -> tuple[list[int], np.ndarray] | None:
        """A multi-object image's objects (the synthetic ``shifted-pairs`` split): ``(class indices,
        bool silhouettes [K, H, W] at the input size)``; None when the mask file has none."""
        path = self.mask_path(i)
        with np.load(path, allow_pickle=False) as npz:
            if "objects" not in npz.files:
                return None
            objects, classes = npz["objects"], npz["classes"]
        if objects.ndim != 3 or objects.dtype != np.bool_ or classes.shape != (objects.shape[0],):
            raise DatasetError(f"{path}: objects must be bool [K, H, W] with K class indices, got "
                               f"{objects.dtype} {list(objects.shape)} and classes {list(classes.shape)}")
        return [int(c) for c in classes], resize_masks_nearest(objects, self.input_size or self._image_size(i))

    def _image_size(self, i: int) -> tuple[int, int]:
        return image_size(self._paths[i])
