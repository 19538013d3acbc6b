"""Concept drift: how far live concept scores sit from the training distribution, per named concept.

The served concept scores ``c*`` are standardised with the training mean and std, so they are z-scores.
Training records, per concept, the share of training images in each z bin (:data:`EDGES`, 14 bins
from below -3 to above +3); the gateway histograms a sliding window of live requests the same way and
scores each concept with the population stability index
``PSI = sum_b (live_b - train_b) * ln(live_b / train_b)`` (shares floored at :data:`FLOOR`).
Rules of thumb: below 0.1 stable, 0.1-0.25 a shift worth a look, above 0.25 a real change. A window
of n live requests is first shrunk toward the training shares by :data:`PRIOR` pseudo-requests
(:func:`live_shares`): without it, a few dozen requests leave bins empty by chance and PSI reads large on
in-distribution traffic.
A bundle without training histograms is compared with the standard normal's shares.
"""
from __future__ import annotations

import math

import numpy as np

EDGES = np.array([-np.inf, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, np.inf])
BINS = len(EDGES) - 1
FLOOR = 1e-4
PRIOR = 32.0  # pseudo-requests of the training distribution mixed into a live window


def bin_counts(scores: np.ndarray) -> np.ndarray:
    """Standardised scores ``[N, M]`` -> how many of the N images fall in each z bin, per concept ``[M, BINS]``
    (float64 counts: blocks of rows add up to the counts of the whole matrix)."""
    scores = np.asarray(scores, dtype=np.float64)
    n, m = scores.shape
    idx = np.clip(np.searchsorted(EDGES, scores, side="right") - 1, 0, BINS - 1)  # [N, M]
    flat = (np.arange(m)[None, :] * BINS + idx).ravel()
    return np.bincount(flat, minlength=m * BINS).astype(np.float64).reshape(m, BINS)


def histogram(scores: np.ndarray) -> np.ndarray:
    """Standardised scores ``[N, M]`` -> each concept's share of the N images per z bin, ``[M, BINS]``."""
    scores = np.asarray(scores, dtype=np.float64)
    return bin_counts(scores) / max(scores.shape[0], 1)


def normal_reference(m: int) -> np.ndarray:
    """The standard normal's share per bin, for every concept ``[M, BINS]``."""
    cdf = np.array([0.5 * (1 + math.erf(e / math.sqrt(2))) if np.isfinite(e) else (0.0 if e < 0 else 1.0)
                    for e in EDGES])
    return np.tile(np.diff(cdf), (m, 1))


def live_shares(train: np.ndarray, scores: np.ndarray, prior: float = PRIOR) -> np.ndarray:
    """The live window's shares ``[M, BINS]`` from its scores ``[n, M]``, shrunk toward ``train``."""
    n = len(scores)
    return (histogram(scores) * n + prior * np.asarray(train, np.float64)) / (n + prior)


def psi(train: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Population stability index per concept of ``live`` against ``train`` shares (both ``[M, BINS]``)."""
    t = np.maximum(np.asarray(train, np.float64), FLOOR)
    s = np.maximum(np.asarray(live, np.float64), FLOOR)
    return ((s - t) * np.log(s / t)).sum(axis=1)


def bin_index(scores: np.ndarray) -> np.ndarray:
    """The z bin (0..BINS-1) of each score (the bins of :func:`bin_counts`)."""
    return np.clip(np.searchsorted(EDGES, np.asarray(scores, np.float64), side="right") - 1, 0, BINS - 1)


def tracked_concepts(weight: np.ndarray, n: int) -> list[int]:
    """The ``n`` concepts whose bin counts every replica exports (the same on all of them, from the model alone):
    the largest by total |weight| over the classes, the concepts the decisions lean on; ties by index."""
    w = np.abs(np.asarray(weight, np.float64)).sum(axis=0)
    order = np.argsort(-w, kind="stable")
    return [int(i) for i in order[: max(0, min(int(n), len(w)))]]


def psi_from_counts(train: np.ndarray, counts: np.ndarray, prior: float = PRIOR) -> np.ndarray:
    """PSI per concept from live bin counts ``[M, BINS]`` (summed over replicas: counts add up, shares do not),
    shrunk toward ``train`` like :func:`live_shares`: what deploy/prometheus/rules.yml computes in PromQL."""
    counts = np.asarray(counts, np.float64)
    n = counts.sum(axis=1, keepdims=True)
    return psi(train, (counts + prior * np.asarray(train, np.float64)) / (n + prior))
