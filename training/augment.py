"""Geometric augmentation that keeps the concept supervision aligned: one random affine (zoom, aspect
change, translation, horizontal flip) applied to an image and, with the same parameters, to its
concept masks, so the similarity targets move with the image.

Used twice: `train backbone` warps each batch on the fly (:func:`warp_batch`), and the CBL trains on
*cached views* (:class:`AugmentedViews`): every train image plus ``views - 1`` warped copies, each with
its own features in the cache and its own targets from its own warped masks (the ``masks`` source) or
its own pixels (the ``clip`` source). Why cached views rather than features computed on the fly: the
CBL's epochs run over cached features in seconds; on-the-fly views would run the backbone every epoch
(50 epochs x the train split), which at the paper's size is the cost of the whole feature cache each
epoch. ``views`` is a config knob (``cbl.views``): 1 reproduces the paper's setting.

No vertical flips and no rotation: some classes are defined by where an object is (balloon up, ball
down). Outside the source image a zoomed-out view shows a constant fill (the mean colour for
normalised batches, mid-grey for uint8 views) that carries no concept.

Determinism: view ``v`` of image ``i`` draws from ``SeedSequence([seed, i, v])``, whatever the order
or the number of workers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AffineRange:
    """Ranges of the random affine. ``zoom``: magnification (above 1 zooms in); ``aspect``: the ratio of
    horizontal to vertical magnification; ``shift``: extra translation as a share of the frame."""

    zoom: tuple[float, float] = (0.6, 1.6)
    aspect: tuple[float, float] = (0.75, 1.33)
    shift: float = 0.1
    flip: bool = True


def draw_theta(n: int, rng: np.random.Generator, r: AffineRange) -> np.ndarray:
    """``n`` affine matrices ``[n, 2, 3]`` in ``F.affine_grid``'s convention (output -> input, in [-1, 1]
    coordinates). Zoom and aspect are log-uniform; the translation keeps a zoomed-in view inside the
    image plus ``shift`` and a zoomed-out image inside the view plus ``shift``."""
    zoom = np.exp(rng.uniform(math.log(r.zoom[0]), math.log(r.zoom[1]), n))
    aspect = np.exp(rng.uniform(math.log(r.aspect[0]), math.log(r.aspect[1]), n))
    sx, sy = zoom * np.sqrt(aspect), zoom / np.sqrt(aspect)
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0) if r.flip else np.ones(n)
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0] = flip / sx
    theta[:, 1, 1] = 1.0 / sy
    for k, s in ((0, sx), (1, sy)):
        room = np.abs(1.0 - 1.0 / s) + r.shift
        theta[:, k, 2] = rng.uniform(-room, room)
    return theta


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``x`` float ``[B, C, H, W]`` through ``theta`` ``[B, 2, 3]``; outside the source: 0."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp_batch(x: torch.Tensor, generator: torch.Generator, r: AffineRange, masks: torch.Tensor | None = None):
    """A normalised batch ``[B, 3, H, W]``, each image through its own random affine (training the
    backbone); the fill outside is 0, the normalised mean colour. With ``masks`` (float ``[B, M, h, w]``,
    any resolution: the affine is in normalised coordinates) returns ``(x, masks)`` warped alike."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    theta = torch.from_numpy(draw_theta(len(x), np.random.default_rng(seed), r))
    if masks is None:
        return warp(x, theta)
    return warp(x, theta), warp(masks, theta, mode="nearest")


def warp_view(image: np.ndarray, masks: np.ndarray | None, theta: np.ndarray, fill: float = 128.0
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """One uint8 image ``[H, W, 3]`` (bilinear) and its bool masks ``[M, H, W]`` (nearest) through the
    same ``theta`` ``[2, 3]``."""
    t = torch.from_numpy(theta[None]).float()
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() - fill
    out = (warp(x, t)[0] + fill).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return out, (None if masks is None else warp_masks(masks, theta))


def warp_masks(masks: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Bool masks ``[M, H, W]`` through ``theta`` ``[2, 3]`` (nearest; outside the source: False)."""
    t = torch.from_numpy(theta[None]).float()
    return (warp(torch.from_numpy(masks)[None].float(), t, mode="nearest")[0] > 0.5).numpy()


class AugmentedViews(torch.utils.data.Dataset):
    """``views`` views of every image of a split (an :class:`ImageFolderSplit`): item ``i * views + v``
    is view ``v`` of image ``i``; view 0 is the image itself. Offers what the training stages use of a
    split (items, ``labels``, ``paths``, ``classes``, ``concepts``, ``has_masks``, ``load_masks``,
    ``input_size``, ``info``, ``root``), so feature caches and similarity sources index views as they
    index images. ``source_index(k)`` is the image a view comes from (validation splits group by it)."""

    def __init__(self, split, views: int, seed: int, r: AffineRange = AffineRange()) -> None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        if split.input_size is None:
            raise ValueError("augmented views need a split with an input size (views are warped at it)")
        self.split, self.views, self.seed, self.range = split, int(views), int(seed), r
        self.info, self.root, self.input_size = split.info, split.root, split.input_size

    def __len__(self) -> int:
        return len(self.split) * self.views

    def source_index(self, k: int) -> int:
        return int(k) // self.views

    def theta(self, k: int) -> np.ndarray | None:
        i, v = divmod(int(k), self.views)
        if v == 0:
            return None
        return draw_theta(1, np.random.default_rng(np.random.SeedSequence([self.seed, i, v])), self.range)[0]

    @property
    def classes(self) -> list[str]:
        return self.split.classes

    @property
    def concepts(self) -> list[str] | None:
        return self.split.concepts

    @property
    def has_masks(self) -> bool:
        return self.split.has_masks

    @property
    def labels(self) -> list[int]:
        return [y for y in self.split.labels for _ in range(self.views)]

    @property
    def paths(self):
        return [p for p in self.split.paths for _ in range(self.views)]

    def image(self, k: int) -> np.ndarray:
        base = self.split.image(self.source_index(k))
        theta = self.theta(k)
        return base if theta is None else warp_view(base, None, theta)[0]

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.image(k)), self.split.labels[self.source_index(k)]

    def load_masks(self, k: int) -> np.ndarray:
        masks = self.split.load_masks(self.source_index(k))
        theta = self.theta(k)
        return masks if theta is None else warp_masks(masks, theta)


__all__ = ["AffineRange", "AugmentedViews", "draw_theta", "warp", "warp_batch", "warp_masks", "warp_view"]
