"""Metric functions of the evaluation harness (issue 14): pure numpy, one image or one accumulator at a
time, tested against hand-computed cases and scikit-learn (tests/unit/test_quality_metrics.py).

Heatmap segmentation (paper 4.2, Table 2): a heatmap at the image's size is min-max normalised and
thresholded at its own mean; pixel accuracy and the IoU of background and foreground are accumulated
over the whole dataset (``sum I / sum U`` per class, then their mean: mIoU); average precision is per
image over the normalised scores (every pixel a sample, the mask the labels), and mAP their mean over
the images with a foreground. A constant heatmap points nowhere: it predicts all background (the
mean rule, ``norm >= mean``, would otherwise select every pixel of it), and its AP is the image's
foreground share, as scikit-learn computes for tied scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def normalise(heat: np.ndarray) -> np.ndarray | None:
    """``heat`` min-max normalised to [0, 1] (float64), or None when it is constant (or not finite)."""
    h = np.asarray(heat, dtype=np.float64)
    lo, hi = float(np.min(h)), float(np.max(h))
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return None
    return (h - lo) / (hi - lo)


def threshold_at_mean(heat: np.ndarray) -> np.ndarray:
    """The paper's rule: bool mask of the pixels at or above the normalised map's mean; all False for
    a constant map."""
    norm = normalise(heat)
    if norm is None:
        return np.zeros(np.shape(heat), dtype=bool)
    return norm >= norm.mean()


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of ``scores`` for the boolean ``labels`` (any shape, flattened), defined as
    scikit-learn's ``average_precision_score``: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score
    thresholds from high to low (tied scores enter together), no interpolation. NaN without positives."""
    y = np.asarray(labels, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    positives = int(y.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last index of each run of equal scores
    tp = np.cumsum(y)[last].astype(np.float64)
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def pointing_hit(heat: np.ndarray, mask: np.ndarray) -> bool:
    """Pointing game: is the heatmap's maximum (the first one, row-major) inside ``mask``?"""
    return bool(np.asarray(mask, dtype=bool).ravel()[int(np.argmax(np.asarray(heat).ravel()))])


@dataclass
class SegmentationScores:
    """Accumulates heatmaps against foreground masks over a dataset (module docstring)."""
    correct: int = 0
    pixels: int = 0
    inter: np.ndarray = field(default_factory=lambda: np.zeros(2))  # [background, foreground]
    union: np.ndarray = field(default_factory=lambda: np.zeros(2))
    aps: list[float] = field(default_factory=list)
    hits: list[bool] = field(default_factory=list)

    def add(self, heat: np.ndarray, mask: np.ndarray) -> None:
        gt = np.asarray(mask, dtype=bool)
        if np.shape(heat) != gt.shape:
            raise ValueError(f"heatmap {np.shape(heat)} and mask {gt.shape} differ in size")
        pred = threshold_at_mean(heat)
        self.correct += int((pred == gt).sum())
        self.pixels += gt.size
        for k, (p, g) in enumerate(((~pred, ~gt), (pred, gt))):
            self.inter[k] += float((p & g).sum())
            self.union[k] += float((p | g).sum())
        if gt.any():
            norm = normalise(heat)
            self.aps.append(average_precision(gt, np.zeros(gt.shape) if norm is None else norm))
            self.hits.append(pointing_hit(heat, gt))

    def result(self) -> dict:
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(self.union > 0, self.inter / np.maximum(self.union, 1e-12), np.nan)
        return {"pixel_accuracy": self.correct / self.pixels if self.pixels else float("nan"),
                "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
                "iou_background": float(iou[0]), "iou_foreground": float(iou[1]),
                "map": float(np.mean(self.aps)) if self.aps else float("nan"),
                "pointing": float(np.mean(self.hits)) if self.hits else float("nan"),
                "images": len(self.aps)}


def trivial_maps(size: tuple[int, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The maps every localisation table carries as a floor: ``all background`` (constant), a
    ``centred Gaussian`` (sigma a quarter of each side) and ``uniform random`` noise."""
    h, w = size
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    gauss = np.exp(-0.5 * (((yy - (h - 1) / 2) / (h / 4)) ** 2 + ((xx - (w - 1) / 2) / (w / 4)) ** 2))
    return {"all background": np.zeros((h, w)), "centred Gaussian": gauss, "uniform random": rng.random((h, w))}


def weight_share(weight: np.ndarray, defining: dict[int, list[int]]) -> dict[int, float]:
    """Per class ``l``: the share of ``sum_m |W[l, m]|`` on its defining concepts ``defining[l]``
    (NaN for a class with no non-zero weight)."""
    w = np.abs(np.asarray(weight, dtype=np.float64))
    out = {}
    for cls, concepts in defining.items():
        total = float(w[cls].sum())
        out[cls] = float(w[cls, concepts].sum()) / total if total > 0 else float("nan")
    return out


def curve_auc(fractions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Area under ``values [..., K]`` over ``fractions [K]`` (0 to 1), trapezoidal."""
    f = np.asarray(fractions, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    return ((v[..., 1:] + v[..., :-1]) / 2 * np.diff(f)).sum(axis=-1)


def deletion_order(heat: np.ndarray) -> np.ndarray:
    """Pixel indices (row-major) from the hottest to the coldest; ties in index order (stable)."""
    return np.argsort(-np.asarray(heat, dtype=np.float64).ravel(), kind="stable")
