"""Concept drift in the gateway (``salf/contract/drift.py`` has the definition): a sliding window of the
last ``window`` requests' standardised concept scores, compared per concept with the training
distribution; only the ``top`` most drifting concept names reach Prometheus (bounded series even with
thousands of concepts), next to a per-request histogram of mean |z| and a counter of requests whose mean
|z| is above ``threshold``.

Per request the gateway only copies M floats into the window (and updates the two per-request
series); the per-concept comparison runs every couple of seconds off the request path
(:meth:`DriftTracker.publish`).

Many replicas: a replica's PSI describes its own window and does not add up across replicas. What does
is counts: for ``tracked`` concepts (the same on every replica: :func:`salf.contract.drift.tracked_concepts`)
each request increments ``salf_gateway_drift_bin_requests_total{concept, bin}``, and the training shares are
exported as ``salf_gateway_drift_train_share{concept, bin}``; summed over instances they give the deployment's
PSI (deploy/prometheus/rules.yml, docs/monitoring.md).
"""
from __future__ import annotations

import threading

import numpy as np

from salf.contract import drift


class DriftTracker:
    def __init__(self, concepts: tuple[str, ...], reference: np.ndarray | None, window: int = 256, top: int = 5,
                 threshold: float = 2.0, tracked: list[int] | tuple[int, ...] = (), metrics=None) -> None:
        self.concepts = concepts
        m = len(concepts)
        self.reference = np.asarray(reference, np.float64) if reference is not None else drift.normal_reference(m)
        self.reference_kind = "training" if reference is not None else "standard normal"
        self.window = np.zeros((window, m), np.float32)
        self.top, self.threshold = int(top), float(threshold)
        self._n = 0
        self._lock = threading.Lock()
        self.tracked = np.asarray(tracked, np.int64)
        self._bin_counters = None  # [tracked][bin] counter children, looked up once
        if metrics is not None and len(self.tracked):
            metrics.drift_bins.clear()
            metrics.drift_train_share.clear()
            self._bin_counters = []
            for m in self.tracked:
                name = concepts[m]
                self._bin_counters.append([metrics.drift_bins.labels(name, str(b)) for b in range(drift.BINS)])
                for b in range(drift.BINS):
                    metrics.drift_train_share.labels(name, str(b)).set(float(self.reference[m, b]))

    def observe(self, scores: np.ndarray, metrics=None) -> None:
        """One request's standardised concept scores ``[M]``."""
        mean_abs = float(np.abs(scores).mean())
        with self._lock:
            self.window[self._n % len(self.window)] = scores
            self._n += 1
        if metrics is not None:
            metrics.concept_abs_z.observe(mean_abs)
            if mean_abs > self.threshold:
                metrics.concept_shifted.inc()
        if self._bin_counters is not None:
            for counters, b in zip(self._bin_counters, drift.bin_index(scores[self.tracked])):
                counters[b].inc()

    def report(self) -> list[tuple[str, float, float]]:
        """The ``top`` concepts by PSI over the window: ``(name, psi, window mean z)``, largest first."""
        with self._lock:
            rows = self.window[: min(self._n, len(self.window))].copy()
        if len(rows) == 0:
            return []
        scores = drift.psi(self.reference, drift.live_shares(self.reference, rows))
        mean_z = rows.mean(axis=0)
        order = np.argsort(-scores, kind="stable")[: self.top]
        return [(self.concepts[i], float(scores[i]), float(mean_z[i])) for i in order]

    def publish(self, metrics) -> None:
        """Replace the top-N series with the current ones (series of concepts that left the top go)."""
        with self._lock:
            filled = min(self._n, len(self.window))
        metrics.drift_window.set(filled)
        metrics.drift_psi.clear()
        metrics.drift_mean_z.clear()
        for rank, (name, value, mean_z) in enumerate(self.report(), 1):
            metrics.drift_psi.labels(str(rank), name).set(value)
            metrics.drift_mean_z.labels(str(rank), name).set(mean_z)
