"""Similarity sources: the targets ``P [B, M, Gh, Gw]`` the concept bottleneck is trained against.

``SimilaritySource`` is the contract (docs/DESIGN.md). This module implements the annotated-masks
source; the CLIP red-circle source (paper 3.2, Algorithm 1) lives with the CLIP stages.

``MaskSimilarity``: for a dataset that ships per-image concept masks, ``P[n, m, h, w]`` is the
fraction of the disk of radius ``r`` around grid centre ``(h, w)`` (clipped to the image) that
concept ``m``'s mask covers: the ground-truth analogue of "how well does concept m describe the
region the red circle highlights".
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from .data.folder import DatasetError, ImageFolderSplit
from salf.contract.grid import disk_matrix

log = logging.getLogger(__name__)


@runtime_checkable
class SimilaritySource(Protocol):
    """Per-batch local image-concept similarities, indexed like the dataset split."""

    concepts: list[str]
    grid: tuple[int, int]

    def similarities(self, indices: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
        """``P`` for the images ``indices`` of the split: float32 ``[B, M, Gh, Gw]`` on ``device`` (default
        CPU; a source that can forms it there, e.g. the CLIP product)."""
        ...


def disk_fractions(masks: torch.Tensor, disks: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
    """Fraction of each disk covered by each mask: one ``[K, HW] @ [HW, G]`` product.

    ``masks`` bool/float ``[..., H, W]`` (any leading dims, e.g. ``[B, M]``), ``disks`` float32
    ``[H*W, G]`` (0/1), ``areas`` float32 ``[G]`` (pixels per disk) -> float32 ``[..., G]`` in ``[0, 1]``.
    """
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, masks.shape[-2] * masks.shape[-1]).to(torch.float32)
    # torch's matmul, not numpy's: numpy's BLAS was ~10x slower for this shape on the project machines.
    return ((flat @ disks) / areas).reshape(*lead, disks.shape[1])


def class_prompts(template: str, classes: Sequence[str]) -> list[str]:
    """The concept list of the class-concept mode: ``template`` with ``{class}`` replaced by each class
    name (underscores as spaces, as CLIP reads them)."""
    if "{class}" not in template:
        raise ValueError(f"the class-concept template {template!r} has no {{class}} placeholder")
    return [template.replace("{class}", c.replace("_", " ")) for c in classes]


class MaskSimilarity:
    """``SimilaritySource`` from annotated masks (``DATA/masks/<split>/<class>/<id>.npz``).

    ``grid`` ``(Gh, Gw)`` and ``radius`` (pixels) are at ``input_size`` ``(H, W)`` (default: the
    dataset's native image size), the resolution the masks are resized to (nearest). ``concepts`` picks
    a subset of the annotated concepts, in the given order (default: all of ``concepts.txt``).
    Results are cached per image in memory (``N * M * Gh * Gw`` float32: ~6 MB for 1600 images,
    19 concepts, 7x7).
    """

    _CHUNK = 64  # images per matrix product when filling the cache

    def __init__(self, root: str | Path, split: str, grid: tuple[int, int] = (7, 7), radius: float = 32,
                 input_size: tuple[int, int] | None = None, concepts: Sequence[str] | None = None,
                 dataset=None, placement: str = "stride") -> None:
        """``dataset``: the split already opened (e.g. its augmented views, training/augment.py), indexed
        as the features are; default ``ImageFolderSplit(root, split, input_size)``."""
        self.dataset = dataset if dataset is not None else ImageFolderSplit(root, split, input_size)
        self._objects: list[int] | None = None
        if not self.dataset.has_masks:
            raise DatasetError(f"dataset {self.dataset.root} has no concept masks: the masks similarity source "
                               f"needs DATA/masks/<split>/...; use the clip source for this dataset")
        if self.dataset.concepts is None:
            raise DatasetError(f"dataset {self.dataset.root} has masks but no concepts.txt naming them")
        self._mask_concepts = self.dataset.concepts
        self.concepts: list[str] = list(concepts) if concepts is not None else list(self._mask_concepts)
        self._select = self._concept_rows(self.concepts)
        self.grid: tuple[int, int] = (int(grid[0]), int(grid[1]))
        self.radius = float(radius)
        size = self.dataset.input_size or self.dataset.info.image_size or self.dataset.load_masks(0).shape[-2:]
        self.input_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.placement = placement
        self._disks = torch.from_numpy(disk_matrix(self.input_size, self.grid, self.radius, placement))
        self._areas = self._disks.sum(dim=0)
        if bool((self._areas == 0).any()):
            raise ValueError(f"radius {radius} gives an empty disk at some grid cell")
        g = self.grid[0] * self.grid[1]
        self._cache = torch.zeros(len(self.dataset), len(self.concepts), g, dtype=torch.float32)
        self._done = torch.zeros(len(self.dataset), dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.dataset)

    def _concept_rows(self, names: list[str]) -> list[int]:
        """Mask rows of ``names`` (a subset of the dataset's concepts, in any order)."""
        if not names:
            raise ValueError("the concept list is empty")
        index = {name: k for k, name in enumerate(self._mask_concepts)}
        missing = [name for name in names if name not in index]
        if missing:
            raise DatasetError(f"concept(s) {missing} have no masks in {self.dataset.root}; "
                               f"annotated concepts: {self._mask_concepts}")
        if len(set(names)) != len(names):
            raise ValueError(f"the concept list repeats names: {names}")
        return [index[name] for name in names]

    def _masks(self, i: int) -> np.ndarray:
        masks = self.dataset.load_masks(i)
        if tuple(masks.shape[-2:]) != self.input_size:
            raise DatasetError(f"masks of image {i} are {list(masks.shape[-2:])}, expected {list(self.input_size)}; "
                               f"pass input_size to resize them")
        if masks.shape[0] != len(self._mask_concepts):
            raise DatasetError(f"image {i} has {masks.shape[0]} masks for {len(self._mask_concepts)} concepts")
        return masks[self._select]

    @classmethod
    def for_classes(cls, template: str, object_concepts: Sequence[str], root: str | Path, split: str,
                    grid: tuple[int, int] = (7, 7), radius: float = 32, input_size: tuple[int, int] | None = None,
                    dataset=None, placement: str = "stride") -> "MaskSimilarity":
        """The class-concept mode (paper 4.2) on annotated masks: concept k is ``template`` for class k,
        and its mask in an image is the union of ``object_concepts``' masks when the image is of class k,
        empty otherwise."""
        self = cls(root, split, grid, radius, input_size, concepts=list(object_concepts), dataset=dataset,
                   placement=placement)
        self._objects = self._select
        self._labels = list(self.dataset.labels)
        self.concepts = class_prompts(template, self.dataset.classes)
        self._cache = torch.zeros(len(self.dataset), len(self.concepts), self.grid[0] * self.grid[1])
        return self

    def _class_masks(self, i: int) -> np.ndarray:
        obj = self._masks(i).any(axis=0)
        out = np.zeros((len(self.concepts), *obj.shape), dtype=bool)
        out[self._labels[i]] = obj
        return out

    def _compute(self, indices: list[int]) -> None:
        pick = self._masks if self._objects is None else self._class_masks
        masks = torch.from_numpy(np.stack([pick(i) for i in indices]))
        self._cache[indices] = disk_fractions(masks, self._disks, self._areas)
        self._done[indices] = True

    def similarities(self, indices: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
        """``P`` float32 ``[B, M, Gh, Gw]`` for the split's images ``indices`` (dataset order), on ``device``."""
        idx = torch.as_tensor(list(indices), dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"similarity indices must lie in [0, {len(self)}), got {idx.tolist()[:8]}...")
        missing = idx[~self._done[idx]].unique().tolist()
        for start in range(0, len(missing), self._CHUNK):
            self._compute(missing[start:start + self._CHUNK])
        return self._cache[idx].view(len(idx), len(self.concepts), *self.grid).to(device or "cpu", copy=True)

    def precompute(self) -> torch.Tensor:
        """Fill the cache for the whole split; returns ``P`` float32 ``[N, M, Gh, Gw]``."""
        return self.similarities(range(len(self)))
